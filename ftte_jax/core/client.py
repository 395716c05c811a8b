"""Local client training, and the contract a client update keeps.

A client update is a pure function

    client_update(key, params, mask, data, state) -> ClientResult

of a PRNG key, the global parameters the device pulled, its 0/1 mask (the
coordinates it may train), its data (``LocalData``: a view of its rows in
the fleet's CSR arrays, with its step count) and, when the run keeps
per-device state, a ``PerDevice`` (the device's own state and the fleet's
mean of it; None otherwise). It returns the locally trained parameters,
its mean training loss and its new state. The engine turns the result into
the update ``mask * (w_local - w_pulled)``, so coordinates off the mask
never leave the device. The engine vmaps or maps it over a step's clients
and jits it; it must be traceable with fixed shapes.

``sgd`` builds the default: up to ``max_steps`` optimizer steps on batches
of the device's own examples, steps beyond its own ``num_steps`` being
no-ops (``jnp.where``) so clients with different amounts of work share one
fixed-shape computation, and gradients multiplied by the mask. Batches
come from a random affine permutation of the client's rows, walked in
order and wrapped around (epoch-style sampling without replacement, in
O(batch) work per step: ``client_data.make_walk`` and ``walk_batch``).
Writing another algorithm's client side (FedProx's proximal term,
SCAFFOLD's corrected gradients) usually means calling ``sgd`` with another
loss or gradient transformation (``examples/``).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from ftte_jax.core.typing import PyTree
from ftte_jax.data.client_data import ClientData, make_walk, walk_batch

# loss_fn(params, batch) -> (mean loss, aux dict of scalars).
LossFn = Callable[[PyTree, dict], tuple[jnp.ndarray, dict]]


@struct.dataclass
class LocalData:
  """One device's training data: a view into the fleet's CSR arrays."""

  source: ClientData  # every client's rows (x, y, extras).
  offset: jnp.ndarray  # [] int32: the device's first row.
  count: jnp.ndarray  # [] int32: its rows (>= 1).
  num_steps: jnp.ndarray  # [] int32: local steps this task takes.

  def batch(self, positions: jnp.ndarray) -> dict:
    """The examples at ``positions`` [B] in [0, count): a dict with "x",
    "y" and the data's extras, each with a leading batch axis."""
    rows = self.offset + positions
    s = self.source
    return {"x": s.x[rows], "y": s.y[rows],
            **{k: v[rows] for k, v in s.extras.items()}}


class PerDevice(NamedTuple):
  """What a client update sees of the run's per-device state."""

  own: PyTree  # this device's state (the shape ``DeviceState.init`` gives).
  # The mean of every device's state (SCAFFOLD's server control variate is
  # exactly this when the devices' variates start at zero).
  fleet_mean: PyTree


class ClientResult(NamedTuple):
  """What a client update returns."""

  params: PyTree  # the locally trained parameters (full tree).
  loss: jnp.ndarray  # [] float32: mean training loss over its steps.
  state: PyTree = None  # the device's new own state (None: no state).


class DeviceState(NamedTuple):
  """Per-device state kept between a device's tasks (SCAFFOLD's control
  variates, a personal head).

  The engine holds it as leaves [N, ...] in ``SimState.device_state``
  (checkpointed; split across the clients mesh by device): memory grows as
  O(N x state). A device's row is read when the step that takes its update
  begins, and the state its client update returns is written back for
  every task that completed (arrived, finite), whether or not the server
  applied the update. With arrival refill a device can complete two tasks
  within one step: both start from the state the step began with, and the
  later task's state is kept.
  """

  init: Callable[[PyTree], PyTree]  # global params -> one device's state.


# client_update(key, params, mask, data, state) -> ClientResult.
ClientUpdate = Callable[[jax.Array, PyTree, PyTree, LocalData,
                         PerDevice | None], ClientResult]


def cross_entropy(apply_fn: Callable, params: PyTree, x: jnp.ndarray,
                  y: jnp.ndarray) -> jnp.ndarray:
  """Mean softmax cross-entropy of integer labels."""
  logits = apply_fn(params, x)
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def accumulated_grad(loss_fn: LossFn, params: PyTree, batch: dict,
                     micro_batches: int) -> PyTree:
  """The batch gradient as a device with little RAM computes it: the batch
  in ``micro_batches`` equal micro-batches, one backward pass each, their
  gradients summed into one accumulator and divided by their number.

  A mean loss is linear in the examples, so this is the one-pass batch
  gradient up to float rounding; the engine computes that one pass (same
  training, time and FLOPs), and the memory model charges the micro-batch
  activations and the accumulator (``memory``, Micro-batches).
  """
  b = batch["x"].shape[0]
  if micro_batches < 1 or b % micro_batches:
    raise ValueError(f"micro_batches must divide the batch of {b}, got "
                     f"{micro_batches}")
  split = lambda a: a.reshape((micro_batches, b // micro_batches) + a.shape[1:])
  grad = jax.grad(lambda p, mb: loss_fn(p, mb)[0])

  def add(total, mb):
    return jax.tree.map(jnp.add, total, grad(params, mb)), None

  zero = jax.tree.map(jnp.zeros_like, params)
  total, _ = jax.lax.scan(add, zero, jax.tree.map(split, batch))
  return jax.tree.map(lambda g: g / micro_batches, total)


def make_client_optimizer(lr: float, momentum: float = 0.0
                          ) -> optax.GradientTransformation:
  """The client optimizer: SGD, with heavy-ball momentum when ``momentum > 0``.

  One object serves training (``sgd``) and the memory model, which charges
  its per-parameter state (``memory.optimizer_slots``).
  """
  return optax.sgd(lr, momentum=momentum if momentum > 0 else None)


# Local-step loops longer than this are not unrolled: an unrolled loop of
# thousands of steps takes minutes to compile (docs/design.md, "Client
# training and batching").
MAX_UNROLL = 64


def leaf_kinds(masks: PyTree) -> PyTree:
  """Per leaf of a stacked ``[T, ...]`` mask tree, what any tier trains:
  ``'all'`` (every coordinate in every tier), ``'none'`` (no coordinate in
  any tier) or ``'some'``. Host-side; for ``sgd(kinds=...)``."""
  def kind(m):
    m = np.asarray(m)
    return "all" if (m != 0).all() else "none" if not m.any() else "some"
  return jax.tree.map(kind, masks)


def _split(base: PyTree, mask: PyTree, kinds: PyTree | None):
  """Static split of ``base`` into trained leaves and the rest.

  Returns ``(kind per leaf, indices of trained leaves, mask leaves,
  merge)``, where ``merge(sub)`` puts trained leaves ``sub`` back into
  ``base``'s tree.
  """
  leaves, treedef = jax.tree.flatten(base)
  kind = (["some"] * len(leaves) if kinds is None else
          treedef.flatten_up_to(kinds))
  trained = [i for i, k in enumerate(kind) if k != "none"]

  def merge(sub):
    full = list(leaves)
    for i, leaf in zip(trained, sub):
      full[i] = leaf
    return treedef.unflatten(full)

  return kind, trained, treedef.flatten_up_to(mask), merge


# Long for its docstring (the client-update contract) and one local loop
# whose batching, masking and dynamic step count belong together.
def sgd(loss_fn: LossFn, batch_size: int, tx: optax.GradientTransformation,
        max_steps: int | None = None, unroll: int | bool = 1,
        kinds: PyTree | None = None,
        compute_dtype: str = "float32") -> ClientUpdate:
  """The default client update: local steps of ``tx`` on ``loss_fn``.

  Args:
    loss_fn: ``loss_fn(params, batch) -> (loss, aux)`` on a batch dict
      (``LocalData.batch``); only ``loss`` is differentiated.
    batch_size: local batch size.
    tx: the client optimizer (``make_client_optimizer``); its state starts
      fresh on every task.
    max_steps: static number of loop iterations (the largest step count);
      None loops ``data.num_steps`` times (a loop of traced length: what a
      user's client update usually wants).
    unroll: unroll factor of the static local-step loop; ``True`` unrolls fully,
      which on CPU avoids XLA's slow convolution-in-loop path
      (docs/design.md, "Client training and batching"); loops over
      ``MAX_UNROLL`` steps are never fully unrolled.
    kinds: optional static ``leaf_kinds`` of every mask the function will
      see. Leaves that no mask trains are then not differentiated (XLA
      drops the backward pass below the earliest trained layer), and leaves
      that every mask trains skip the mask product. Same results as without.
    compute_dtype: ``bfloat16`` runs the loss's forward and backward passes
      on bf16 copies of the parameters and the batch's float arrays; the
      parameters the optimizer updates (the masters) and the gradients
      stay float32. bf16 keeps float32's exponent range, so gradients
      neither underflow nor overflow where float32's would not: no loss
      scaling. Its 8-bit mantissa rounds each step's gradient; the
      float32 masters keep updates smaller than a bf16 ulp of the weights.

  Returns:
    A ``ClientUpdate``; it passes any per-device state through unchanged.
  """
  low = jnp.dtype(compute_dtype)
  if low == jnp.float32:
    cast = lambda tree: tree
  else:
    cast = lambda tree: jax.tree.map(
        lambda a: a.astype(low) if jnp.issubdtype(a.dtype, jnp.floating)
        else a, tree)
  if max_steps is None or (unroll is True and max_steps > MAX_UNROLL):
    unroll = 1

  def client_update(key, params, mask, data: LocalData,
                    state: PerDevice | None = None) -> ClientResult:
    walk = make_walk(key, data.count, batch_size)
    kind, trained, mask_leaves, merge = _split(params, mask, kinds)
    grad_fn = jax.value_and_grad(
        lambda sub, batch: loss_fn(cast(merge(sub)), cast(batch))[0].astype(
            jnp.float32))

    def body(i, carry):
      sub, opt_state, loss_sum, r = carry
      pos, r = walk_batch(walk, data.count, r)
      loss, grads = grad_fn(sub, data.batch(pos))
      grads = [g if kind[t] == "all" else g * mask_leaves[t]
               for t, g in zip(trained, grads)]
      updates, new_opt_state = tx.update(grads, opt_state, sub)
      new_sub = optax.apply_updates(sub, updates)
      active = i < data.num_steps
      return (optax.tree_utils.tree_where(active, new_sub, sub),
              optax.tree_utils.tree_where(active, new_opt_state, opt_state),
              loss_sum + jnp.where(active, loss, 0.0), r)

    sub = [jax.tree.leaves(params)[i] for i in trained]
    init = (sub, tx.init(sub), jnp.zeros((), jnp.float32),
            jnp.zeros((), jnp.uint32))
    n = data.num_steps if max_steps is None else max_steps
    sub, _, loss_sum, _ = jax.lax.fori_loop(0, n, body, init, unroll=unroll)
    return ClientResult(params=merge(sub),
                        loss=loss_sum / jnp.maximum(data.num_steps, 1),
                        state=None if state is None else state.own)

  return client_update


def classification_loss(apply_fn: Callable) -> LossFn:
  """Mean softmax cross-entropy of ``batch["y"]`` under ``apply_fn``."""
  return lambda p, batch: (cross_entropy(apply_fn, p, batch["x"],
                                         batch["y"]), {})


def make_client_update(apply_fn: Callable, batch_size: int,
                       tx: optax.GradientTransformation, max_steps: int,
                       unroll: int | bool = 1, kinds: PyTree | None = None,
                       loss_fn: LossFn | None = None) -> ClientUpdate:
  """``sgd`` on ``loss_fn`` (default: cross-entropy under ``apply_fn``)."""
  return sgd(loss_fn or classification_loss(apply_fn), batch_size, tx,
             max_steps, unroll, kinds)


def check_result(result: Any, params: PyTree, own: PyTree) -> None:
  """Raises ValueError unless ``result`` (abstract) is a ``ClientResult``
  whose params match ``params`` and whose state matches ``own``."""
  where = "client_update"
  if not isinstance(result, ClientResult):
    raise ValueError(f"{where}: must return ClientResult(params, loss, "
                     f"state), got {type(result).__name__}")
  check_like(where, "params", result.params, params)
  if getattr(result.loss, "shape", None) != ():
    raise ValueError(f"{where}: ClientResult.loss must be a scalar, got "
                     f"shape {getattr(result.loss, 'shape', None)}")
  if own is not None:
    check_like(where, "state", result.state, own)


def check_like(where: str, what: str, got: PyTree, want: PyTree) -> None:
  """Raises ValueError naming ``where`` unless the trees' structures,
  shapes and dtypes agree."""
  gs, ws = jax.tree.structure(got), jax.tree.structure(want)
  if gs != ws:
    raise ValueError(f"{where}: {what} must have the structure {ws}, got {gs}")
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    if (jnp.shape(g), jnp.result_type(g)) != (jnp.shape(w),
                                              jnp.result_type(w)):
      raise ValueError(
          f"{where}: {what} leaves must keep their shapes and dtypes: "
          f"expected {jnp.shape(w)} {jnp.result_type(w)}, got {jnp.shape(g)} "
          f"{jnp.result_type(g)}")
