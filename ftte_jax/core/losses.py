"""A task's loss and metrics as two pure functions over batch dicts.

The contract the engine trains and evaluates through:

* ``LossFn = (params, batch) -> (loss, aux)``. ``batch`` is a dict of
  arrays with a leading batch axis: ``"x"``, ``"y"`` and any per-example
  extras of the dataset (``"mask"``: [B, T], 1 for real tokens). ``loss``
  is a scalar, the mean over the batch's real examples (real tokens for
  sequences); ``aux`` a dict of scalars.
* ``MetricsFn = (params, batch) -> {name: (sum, count)}``, for evaluation.
  ``batch`` also has ``"weight"``: [B] float32, 1 for real rows and 0 for
  padding rows. Each metric is a weighted sum and its weight total; over a
  test set the evaluation reports ``sum / count`` per name (the sums of all
  batches over the counts of all batches). Every task returns ``"loss"``
  and ``"accuracy"``.

``classification`` is today's engine loss and evaluation (mean softmax
cross-entropy of integer labels, top-1 accuracy); ``sequence`` is its
token-level form for logits [B, T, V] and labels [B, T].
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax.numpy as jnp
import optax

from ftte_jax.core.typing import ApplyFn, PyTree

Batch = dict
LossFn = Callable[[PyTree, Batch], tuple[jnp.ndarray, dict]]
MetricsFn = Callable[[PyTree, Batch], dict]
TASKS = ("classification", "sequence")


class Task(NamedTuple):
  """A task's training loss and evaluation metrics (module docstring)."""

  loss: LossFn
  metrics: MetricsFn


def _float32(logits: jnp.ndarray) -> jnp.ndarray:
  """Logits in float32: under compute_dtype=bfloat16 the softmax and the
  mean are taken in float32 (a no-op in float32)."""
  return logits.astype(jnp.float32)


def _masked_sum(values: jnp.ndarray, weight: jnp.ndarray) -> jnp.ndarray:
  """``sum(values * weight)`` where a zero weight drops its value even when
  it is not finite (a padding row's loss)."""
  return jnp.sum(jnp.where(weight > 0, values * weight, 0.0))


def classification(apply_fn: ApplyFn) -> Task:
  """Softmax cross-entropy of integer labels ``y`` [B] and accuracy.

  ``loss`` is ``client.cross_entropy``'s value (the same operations);
  ``metrics`` sums the loss and hits of real rows, as ``engine.evaluate``
  does.
  """

  def loss(params: PyTree, batch: Batch):
    logits = _float32(apply_fn(params, batch["x"]))
    return optax.softmax_cross_entropy_with_integer_labels(
        logits, batch["y"]).mean(), {}

  def metrics(params: PyTree, batch: Batch) -> dict:
    logits = apply_fn(params, batch["x"])
    w = batch["weight"].astype(jnp.float32)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"])
    hit = (jnp.argmax(logits, -1) == batch["y"]).astype(jnp.float32)
    total = jnp.sum(w)
    return {"loss": (_masked_sum(ce, w), total),
            "accuracy": (_masked_sum(hit, w), total)}

  return Task(loss, metrics)


def _token_mask(batch: Batch) -> jnp.ndarray:
  """[B, T] float32 weights of real tokens (all ones without a mask)."""
  if "mask" in batch:
    return batch["mask"].astype(jnp.float32)
  return jnp.ones(batch["y"].shape, jnp.float32)


def sequence(apply_fn: ApplyFn) -> Task:
  """Token-level cross-entropy and accuracy over real tokens.

  ``apply_fn(params, x)`` gives logits [B, T, V]; ``y`` is [B, T];
  ``batch["mask"]`` [B, T] marks real tokens (all real without one).
  ``loss`` is the mean over the batch's real tokens; ``aux["tokens"]`` their
  number. ``metrics`` weighs each token by mask x row weight: ``"loss"``
  (cross-entropy per token), ``"accuracy"`` (per token), and
  ``"last_token_accuracy"``: the prediction at each row's last real token
  (for LEAF's Shakespeare, the next character after the 80 given, LEAF's
  own metric).
  """

  def loss(params: PyTree, batch: Batch):
    logits = _float32(apply_fn(params, batch["x"]))
    mask = _token_mask(batch)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"])
    tokens = jnp.sum(mask)
    return _masked_sum(ce, mask) / jnp.maximum(tokens, 1.0), {
        "tokens": tokens}

  def metrics(params: PyTree, batch: Batch) -> dict:
    logits = apply_fn(params, batch["x"])
    mask = _token_mask(batch)
    w = mask * batch["weight"].astype(jnp.float32)[:, None]
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"])
    hit = (jnp.argmax(logits, -1) == batch["y"]).astype(jnp.float32)
    # The last real token of each row: the last position whose mask is on.
    t = mask.shape[1]
    last = (t - 1) - jnp.argmax(mask[:, ::-1] > 0, axis=1)
    has = (jnp.max(mask, axis=1) > 0).astype(jnp.float32)
    row_w = has * batch["weight"].astype(jnp.float32)
    last_hit = jnp.take_along_axis(hit, last[:, None], axis=1)[:, 0]
    total = jnp.sum(w)
    return {"loss": (_masked_sum(ce, w), total),
            "accuracy": (_masked_sum(hit, w), total),
            "last_token_accuracy": (_masked_sum(last_hit, row_w),
                                    jnp.sum(row_w))}

  return Task(loss, metrics)


def for_task(name: str, apply_fn: ApplyFn) -> Task:
  """The ``Task`` of a dataset's task name ('classification' or
  'sequence', ``DatasetInfo.task``)."""
  if name == "classification":
    return classification(apply_fn)
  if name == "sequence":
    return sequence(apply_fn)
  raise ValueError(f"task: unknown {name!r}; valid: {list(TASKS)}")


def evaluate(metrics_fn: MetricsFn, params: PyTree, batches) -> dict:
  """``sum / count`` per metric over a sequence of batches (host loop; a
  reference for tests and scripts, the engine batches under jit)."""
  sums: dict = {}
  for batch in batches:
    for name, (s, c) in metrics_fn(params, batch).items():
      a, b = sums.get(name, (0.0, 0.0))
      sums[name] = (a + s, b + c)
  return {name: s / c for name, (s, c) in sums.items()}
