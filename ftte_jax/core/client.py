"""Local client training: a pure function of (key, base params, mask, data).

Each client runs up to ``max_steps`` SGD steps on its own examples; steps
beyond its own ``num_steps`` are no-ops (``jnp.where``), so clients with
different amounts of work share one fixed-shape computation. Only masked
coordinates move: gradients are multiplied by the client's 0/1 mask.

Batches come from a random affine permutation of the client's rows, walked
in order and wrapped around (epoch-style sampling without replacement, in
O(batch) work per step: ``client_data.make_walk`` and ``walk_batch``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ftte_jax.core.typing import ApplyFn, PyTree
from ftte_jax.data.client_data import make_walk, walk_batch


def cross_entropy(apply_fn: ApplyFn, params: PyTree, x: jnp.ndarray,
                  y: jnp.ndarray) -> jnp.ndarray:
  """Mean softmax cross-entropy of integer labels."""
  logits = apply_fn(params, x)
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def accumulated_grad(apply_fn: ApplyFn, params: PyTree, x: jnp.ndarray,
                     y: jnp.ndarray, micro_batches: int) -> PyTree:
  """The batch gradient as a device with little RAM computes it: the batch
  in ``micro_batches`` equal micro-batches, one backward pass each, their
  gradients summed into one accumulator and divided by their number.

  The mean loss is linear in the examples, so this is the one-pass batch
  gradient up to float rounding; the engine computes that one pass (same
  training, time and FLOPs), and the memory model charges the micro-batch
  activations and the accumulator (``memory``, Micro-batches).
  """
  b = x.shape[0]
  if micro_batches < 1 or b % micro_batches:
    raise ValueError(f"micro_batches must divide the batch of {b}, got "
                     f"{micro_batches}")
  split = lambda a: a.reshape((micro_batches, b // micro_batches) + a.shape[1:])
  grad = jax.grad(lambda p, xb, yb: cross_entropy(apply_fn, p, xb, yb))

  def add(total, batch):
    return jax.tree.map(jnp.add, total, grad(params, *batch)), None

  zero = jax.tree.map(jnp.zeros_like, params)
  total, _ = jax.lax.scan(add, zero, (split(x), split(y)))
  return jax.tree.map(lambda g: g / micro_batches, total)


def make_client_optimizer(lr: float, momentum: float = 0.0
                          ) -> optax.GradientTransformation:
  """The client optimizer: SGD, with heavy-ball momentum when ``momentum > 0``.

  One object serves training (``make_client_update``) and the memory model,
  which charges its per-parameter state (``memory.optimizer_slots``).
  """
  return optax.sgd(lr, momentum=momentum if momentum > 0 else None)


# Local-step loops longer than this are not unrolled: an unrolled loop of
# thousands of steps takes minutes to compile (docs/design.md, "Client
# training and batching").
MAX_UNROLL = 64


def leaf_kinds(masks: PyTree) -> PyTree:
  """Per leaf of a stacked ``[T, ...]`` mask tree, what any tier trains:
  ``'all'`` (every coordinate in every tier), ``'none'`` (no coordinate in
  any tier) or ``'some'``. Host-side; for ``make_client_update(kinds=...)``."""
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


def make_client_update(apply_fn: ApplyFn, batch_size: int,
                       tx: optax.GradientTransformation, max_steps: int,
                       unroll: int | bool = 1, kinds: PyTree | None = None):
  """Builds ``client_update(key, base, mask, x, y, offset, count, num_steps)``.

  Args:
    apply_fn: ``apply_fn(params, x) -> logits``.
    batch_size: local batch size.
    tx: the client optimizer (``make_client_optimizer``); its state starts
      fresh on every task.
    max_steps: static number of loop iterations (the largest step count).
    unroll: unroll factor of the local-step loop; ``True`` unrolls fully,
      which on CPU avoids XLA's slow convolution-in-loop path
      (docs/design.md, "Client training and batching"); loops over
      ``MAX_UNROLL`` steps are never fully unrolled.
    kinds: optional static ``leaf_kinds`` of every mask the function will
      see. Leaves that no mask trains are then not differentiated (XLA
      drops the backward pass below the earliest trained layer), and leaves
      that every mask trains skip the mask product. Same results as without.

  Returns:
    A pure function returning the client's locally trained parameters and its
    mean training loss over the steps it took.
  """
  if unroll is True and max_steps > MAX_UNROLL:
    unroll = 1
  loss_fn = lambda p, x, y: cross_entropy(apply_fn, p, x, y)

  def client_update(key, base, mask, x_all, y_all, offset, count, num_steps):
    walk = make_walk(key, count, batch_size)
    kind, trained, mask_leaves, merge = _split(base, mask, kinds)
    grad_fn = jax.value_and_grad(lambda sub, x, y: loss_fn(merge(sub), x, y))

    def body(i, carry):
      sub, opt_state, loss_sum, r = carry
      pos, r = walk_batch(walk, count, r)
      idx = offset + pos
      loss, grads = grad_fn(sub, x_all[idx], y_all[idx])
      grads = [g if kind[t] == "all" else g * mask_leaves[t]
               for t, g in zip(trained, grads)]
      updates, new_opt_state = tx.update(grads, opt_state, sub)
      new_sub = optax.apply_updates(sub, updates)
      active = i < num_steps
      return (optax.tree_utils.tree_where(active, new_sub, sub),
              optax.tree_utils.tree_where(active, new_opt_state, opt_state),
              loss_sum + jnp.where(active, loss, 0.0), r)

    sub = [jax.tree.leaves(base)[i] for i in trained]
    init = (sub, tx.init(sub), jnp.zeros((), jnp.float32),
            jnp.zeros((), jnp.uint32))
    sub, _, loss_sum, _ = jax.lax.fori_loop(0, max_steps, body, init,
                                            unroll=unroll)
    return merge(sub), loss_sum / jnp.maximum(num_steps, 1)

  return client_update
