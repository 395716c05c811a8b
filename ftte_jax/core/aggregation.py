"""The server's aggregation: a pure function over a buffer of K updates.

Every leaf of ``deltas`` carries a leading buffer axis K. Client i trained
the coordinates of its tier's mask ``tier_masks[tier[i]]`` (leaves
[T, ...], 0/1), and its delta is zero elsewhere. The aggregate is
coordinate-wise over the clients that trained each coordinate, so clients
with different masks (memory tiers) mix correctly. Masks enter only through
per-tier sums, so no [K, ...] mask tensor is ever built.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any
NORMALIZATIONS = ("coordinate", "damped", "buffer")


def _wsum(weights: jnp.ndarray, leaf: jnp.ndarray) -> jnp.ndarray:
  # A contraction, not jnp.sum(w[:, None] * leaf, 0): XLA's CPU backend runs
  # reductions over the leading axis ~10x slower than a GEMV
  # (experiments/benchmarks/throughput.py).
  return jnp.tensordot(weights, leaf, axes=1)


def _rows(leaf: jnp.ndarray) -> jnp.ndarray:
  return leaf.reshape(leaf.shape[0], -1)


def check_tiers(tier: jnp.ndarray, num_tiers: int) -> None:
  """Raises if concrete tier ids fall outside ``[0, num_tiers)``.

  segment_sum drops such a client's weight without a word (and a gather
  clamps it to another tier's mask). Traced ids, inside the engine's jitted
  step, are not checked: the engine's MaskPlan assigns them in range, and a
  device-side check would cost the hot path.
  """
  if isinstance(tier, jax.core.Tracer):
    return
  t = np.asarray(tier)
  if t.size and (t.min() < 0 or t.max() >= num_tiers):
    bad = int(t[(t < 0) | (t >= num_tiers)][0])
    raise ValueError(f"tier: id {bad} is outside [0, {num_tiers}), the tiers "
                     "of tier_masks")


def tier_weights(weights: jnp.ndarray, tier: jnp.ndarray,
                 num_tiers: int) -> jnp.ndarray:
  """[T] total weight of the buffer's clients in each tier (ids checked when
  concrete: ``check_tiers``)."""
  check_tiers(tier, num_tiers)
  return jax.ops.segment_sum(weights, tier, num_segments=num_tiers)


def weighted_mean(deltas: PyTree, tier_masks: PyTree, tier: jnp.ndarray,
                  weights: jnp.ndarray, eps: float = 1e-12) -> PyTree:
  """``sum_i a_i d_i / max(sum_i a_i m_i, eps)`` per coordinate."""
  return aggregate(deltas, tier_masks, tier, weights, "coordinate", eps)


def deviation(deltas: PyTree, tier_masks: PyTree, tier: jnp.ndarray,
              mean: PyTree, eps: float = 1e-12) -> jnp.ndarray:
  """``d_i = ||m_i (D_i - mean)||^2 / ||m_i mean||^2``, shape [K].

  Expanded as ``||D_i||^2 - 2 <D_i, mean> + ||m_i mean||^2`` (D_i is zero
  off its mask), so every term is a row sum, a GEMV or a per-tier sum.
  """
  leaves = lambda t: jax.tree.leaves(t)
  sq = sum(jnp.sum(_rows(d) ** 2, axis=1) for d in leaves(deltas))
  cross = sum(_rows(d) @ mu.reshape(-1)
              for d, mu in zip(leaves(deltas), leaves(mean)))
  # Masks are 0/1, so (m * mu)^2 = m * mu^2.
  tier_norm = sum(_rows(m) @ (mu ** 2).reshape(-1)
                  for m, mu in zip(leaves(tier_masks), leaves(mean)))
  check_tiers(tier, tier_norm.shape[0])
  own = tier_norm[tier]
  return jnp.maximum(sq - 2.0 * cross + own, 0.0) / jnp.maximum(own, eps)


def normalize(total: PyTree, tier_masks: PyTree, tier: jnp.ndarray,
              weights: jnp.ndarray, normalization: str = "coordinate",
              eps: float = 1e-12,
              base_weights: jnp.ndarray | None = None) -> PyTree:
  """Divides a weighted sum of updates by the normalization's denominator.

  Args:
    total: ``sum_i a_i d_i`` (leaves like one client's delta).
    tier_masks, tier, weights, normalization, eps, base_weights: as in
      ``aggregate``.
  """
  if normalization in ("coordinate", "damped"):
    num_tiers = jax.tree.leaves(tier_masks)[0].shape[0]
    tw = tier_weights(_denominator_weights(weights, normalization,
                                           base_weights), tier, num_tiers)
    return jax.tree.map(lambda t, m: t / jnp.maximum(_wsum(tw, m), eps),
                        total, tier_masks)
  if normalization == "buffer":
    n_valid = jnp.maximum(jnp.sum(weights > 0), 1).astype(jnp.float32)
    return jax.tree.map(lambda t: t / n_valid, total)
  raise ValueError(f"normalization must be one of {NORMALIZATIONS}, "
                   f"got {normalization!r}")


def _denominator_weights(weights: jnp.ndarray, normalization: str,
                         base_weights: jnp.ndarray | None) -> jnp.ndarray:
  """[K] what each kept value adds to its coordinate's denominator."""
  if normalization == "coordinate":
    return weights
  if normalization == "damped":
    if base_weights is None:
      raise ValueError("normalization='damped' needs base_weights")
    return base_weights
  return (weights > 0).astype(jnp.float32)


def aggregate(deltas: PyTree, tier_masks: PyTree, tier: jnp.ndarray,
              weights: jnp.ndarray, normalization: str = "coordinate",
              eps: float = 1e-12,
              base_weights: jnp.ndarray | None = None,
              keep: PyTree | None = None,
              noise: PyTree | None = None) -> PyTree:
  """Aggregates a buffer of masked updates.

  Args:
    deltas: leaves [K, ...]: ``w_local - w_base``, zero outside the client's
      mask; invalid rows must already be finite (zeroed) because their weight
      is 0 and 0 * NaN = NaN.
    tier_masks: leaves [T, ...] in {0, 1}: coordinates each tier trains.
    tier: [K] int32 tier of each buffered update, in [0, T) (checked when
      concrete; see ``check_tiers``).
    weights: [K] non-negative ``a_i``; 0 for invalid updates.
    normalization: ``coordinate``: divide each coordinate by the total weight
      of the clients that trained it (FTTE, and FedAvg with full masks);
      ``damped``: coordinate-wise, but the denominator sums
      ``base_weights`` (data size x validity), so the age and variance
      factors in ``weights`` shrink the step rather than cancel out;
      ``buffer``: divide by the number of valid updates (FedBuff's 1/K, and
      FedAsync's mixing when K = 1).
    eps: floor of the denominator, so untouched coordinates get 0.
    base_weights: [K] weights without the staleness factors (``damped``).
    keep: leaves [K, ...] in {0, 1} (``robust.keep_mask``): a robust mean.
      Each coordinate then sums only its kept values, and its denominator
      only theirs: the normalization's weights (``buffer``: their count).
    noise: leaves like one delta, added to the weighted sum before it is
      normalized (client-level DP: ``privacy.gaussian_noise``).

  Returns:
    The aggregate update, shaped like one client's delta.
  """
  if normalization not in NORMALIZATIONS:
    raise ValueError(f"normalization must be one of {NORMALIZATIONS}, "
                     f"got {normalization!r}")
  check_tiers(tier, jax.tree.leaves(tier_masks)[0].shape[0])
  if keep is not None:
    den = _denominator_weights(weights, normalization, base_weights)
    return jax.tree.map(
        lambda d, k: _wsum(weights, k * d) / jnp.maximum(_wsum(den, k), eps),
        deltas, keep)
  total = jax.tree.map(lambda d: _wsum(weights, d), deltas)
  if noise is not None:
    total = jax.tree.map(jnp.add, total, noise)
  return normalize(total, tier_masks, tier, weights, normalization, eps,
                   base_weights)
