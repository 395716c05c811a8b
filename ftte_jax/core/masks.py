"""Parameter masks: which coordinates each client trains and exchanges.

A ``MaskPlan`` is what the engine consumes. It holds one 0/1 mask per memory
tier (stacked on a leading axis, so clients gather theirs by tier index inside
jit) and the per-tier costs the fleet simulation needs. Full-model presets use
``full_plan``; ``ftte`` before a search uses an explicit rule
(``last_n_mask``); the subset search (``ftte_jax.search``) fills the same type.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from ftte_jax.core.typing import PyTree
BYTES_PER_PARAM = 4  # float32 parameters and deltas on the wire.


@struct.dataclass
class MaskPlan:
  """Per-tier trainable masks and their costs."""

  masks: PyTree  # leaves [T, *param_shape] float32 in {0, 1}.
  client_tier: jnp.ndarray  # [N] int32: tier of each client, in [0, T).
  flops_per_example: jnp.ndarray  # [T] float32: fwd+bwd training FLOPs/example.
  memory_bytes: jnp.ndarray  # [T] float32: peak on-device training memory.
  upload_bytes: jnp.ndarray  # [T] float32: bytes of one masked delta.
  union_bytes: jnp.ndarray  # [] float32: bytes of coordinates any tier trains.
  model_bytes: jnp.ndarray  # [] float32: bytes of the whole model.

  @property
  def num_tiers(self) -> int:
    return int(self.flops_per_example.shape[0])


def mask_count(mask: PyTree) -> float:
  """Number of selected coordinates in an (unstacked) mask tree."""
  # On the host: eager jnp sums compile one program per leaf shape.
  return float(sum(np.sum(np.asarray(m), dtype=np.float64)
                   for m in jax.tree.leaves(mask)))


def dense_flops_estimate(params: PyTree, mask: PyTree) -> float:
  """Rough training FLOPs/example when no model analysis is available.

  Forward costs ~2 FLOPs per weight, backward ~2 per weight for input
  gradients plus ~2 per *trained* weight for weight gradients. Exact only for
  dense layers; ``ftte_jax.search.memory`` gives per-layer counts.
  """
  p = optax.tree_utils.tree_size(params)
  return float(4 * p + 2 * mask_count(mask))


def make_plan(params: PyTree, tier_masks: Sequence[PyTree],
              client_tier: np.ndarray,
              flops_per_example: Sequence[float] | None = None,
              memory_bytes: Sequence[float] | None = None) -> MaskPlan:
  """Stacks per-tier masks into a MaskPlan.

  Args:
    params: the model's parameter tree (shapes only are read).
    tier_masks: one mask tree per tier, leaves broadcastable to the params.
    client_tier: [N] tier index of each client.
    flops_per_example: per-tier training FLOPs; estimated when None.
    memory_bytes: per-tier peak training memory; NaN (unknown) when None.
  """
  client_tier = np.asarray(client_tier, dtype=np.int32)
  t = len(tier_masks)
  if t < 1:
    raise ValueError("tier_masks: need at least one tier mask")
  if client_tier.size and (client_tier.min() < 0 or client_tier.max() >= t):
    raise ValueError(f"client_tier must lie in [0, {t}), got "
                     f"[{client_tier.min()}, {client_tier.max()}]")
  # Built on the host: a plan is made once, and eager jnp ops here would
  # compile a program per leaf shape (about 0.7 s of a cold start).
  full = [jax.tree.map(lambda m, p: np.broadcast_to(
      np.asarray(m, np.float32), p.shape), m, params) for m in tier_masks]
  stacked = jax.tree.map(lambda *ms: np.stack(ms), *full)
  union = jax.tree.map(lambda s: np.max(s, axis=0), stacked)
  if flops_per_example is None:
    flops_per_example = [dense_flops_estimate(params, m) for m in full]
  if memory_bytes is None:
    memory_bytes = [np.nan] * t
  # device_put, not jnp.asarray: the latter compiles a copy per shape.
  f32 = lambda x: jax.device_put(np.asarray(x, np.float32))
  return MaskPlan(
      masks=jax.device_put(stacked),
      client_tier=jax.device_put(client_tier),
      flops_per_example=f32(flops_per_example),
      memory_bytes=f32(memory_bytes),
      upload_bytes=f32([BYTES_PER_PARAM * mask_count(m) for m in full]),
      union_bytes=f32(BYTES_PER_PARAM * mask_count(union)),
      model_bytes=f32(BYTES_PER_PARAM * optax.tree_utils.tree_size(params)),
  )


def full_plan(params: PyTree, num_clients: int, **kw) -> MaskPlan:
  """Every client trains and exchanges the whole model (one tier)."""
  ones = jax.tree.map(lambda p: np.ones(p.shape, np.float32), params)
  return make_plan(params, [ones], np.zeros(num_clients, np.int32), **kw)


def last_n_mask(params: PyTree, n_tensors: int) -> PyTree:
  """Mask selecting the last ``n_tensors`` parameter tensors in layer order.

  Layer order is the flattening order of the parameter tree, which for the
  models in ``ftte_jax.models`` follows the forward pass.
  """
  leaves, treedef = jax.tree.flatten(params)
  if not 1 <= n_tensors <= len(leaves):
    raise ValueError(f"last_n_tensors must be in [1, {len(leaves)}], "
                     f"got {n_tensors}")
  sel = [np.full(x.shape, float(i >= len(leaves) - n_tensors), np.float32)
         for i, x in enumerate(leaves)]
  return jax.tree.unflatten(treedef, sel)
