"""Losses and evaluation metrics: the contract, and the built-in tasks.

``LossFn = (params, batch) -> (loss, aux)``: ``batch`` is a dict of arrays
with a leading batch axis, "x" and "y" and any extra per-example arrays the
dataset carries; ``loss`` is the scalar mean over the batch, ``aux`` a dict
of scalars. Clients train on it.

``MetricsFn = (params, batch) -> {name: (sum, count)}``: the evaluation's
batches also carry "weight" [B] float32 (1 for a real row, 0 for padding);
each metric is a weighted sum and its weight total, and the evaluation
reports ``test_<name> = sum / count`` over the whole test set. "loss" and
"accuracy" are required.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax.numpy as jnp
import optax

from ftte_jax.core.typing import PyTree

LossFn = Callable[[PyTree, dict], tuple[jnp.ndarray, dict]]
MetricsFn = Callable[[PyTree, dict], dict]


class Task(NamedTuple):
  """A model's training loss and evaluation metrics."""

  loss: LossFn
  metrics: MetricsFn


def classification(apply_fn: Callable) -> Task:
  """Softmax cross-entropy of integer labels ``y`` [B], and accuracy."""

  def loss(params, batch):
    # float32 logits: under compute_dtype=bfloat16 the softmax and the
    # mean stay exact enough (a no-op in float32).
    logits = apply_fn(params, batch["x"]).astype(jnp.float32)
    return optax.softmax_cross_entropy_with_integer_labels(
        logits, batch["y"]).mean(), {}

  def metrics(params, batch):
    logits = apply_fn(params, batch["x"])
    w = batch["weight"]
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"])
    hit = (jnp.argmax(logits, -1) == batch["y"]).astype(jnp.float32)
    n = jnp.sum(w)
    return {"loss": (jnp.sum(w * ce), n), "accuracy": (jnp.sum(w * hit), n)}

  return Task(loss=loss, metrics=metrics)
