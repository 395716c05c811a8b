"""The server's aggregation: a pure function over a buffer of K updates.

Every leaf of ``deltas`` and ``masks`` carries a leading buffer axis K. The
aggregate is coordinate-wise over the clients that trained each coordinate,
so clients with different masks (memory tiers) mix correctly.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

PyTree = Any
NORMALIZATIONS = ("coordinate", "buffer")


def _wsum(weights: jnp.ndarray, leaf: jnp.ndarray) -> jnp.ndarray:
  # A contraction, not jnp.sum(w[:, None] * leaf, 0): XLA's CPU backend runs
  # reductions over the leading axis ~10x slower than a GEMV
  # (experiments/benchmarks/throughput.py).
  return jnp.tensordot(weights, leaf, axes=1)


def weighted_mean(deltas: PyTree, masks: PyTree, weights: jnp.ndarray,
                  eps: float = 1e-12) -> PyTree:
  """``sum_i a_i d_i / max(sum_i a_i m_i, eps)`` per coordinate.

  ``deltas`` must already be zero outside each client's mask (the engine's
  are: only masked coordinates are trained), which saves a pass over K x P.
  """
  def leaf(d, m):
    return _wsum(weights, d) / jnp.maximum(_wsum(weights, m), eps)
  return jax.tree.map(leaf, deltas, masks)


def deviation(deltas: PyTree, masks: PyTree, mean: PyTree,
              eps: float = 1e-12) -> jnp.ndarray:
  """``d_i = ||m_i (D_i - mean)||^2 / ||m_i mean||^2``, shape [K]."""
  def num(d, m, mu):
    return jnp.sum((m * (d - mu)) ** 2, axis=tuple(range(1, d.ndim)))
  def den(d, m, mu):
    return jnp.sum((m * mu) ** 2, axis=tuple(range(1, d.ndim)))
  n = sum(jax.tree.leaves(jax.tree.map(num, deltas, masks, mean)))
  z = sum(jax.tree.leaves(jax.tree.map(den, deltas, masks, mean)))
  return n / jnp.maximum(z, eps)


def aggregate(deltas: PyTree, masks: PyTree, weights: jnp.ndarray,
              normalization: str = "coordinate",
              eps: float = 1e-12) -> PyTree:
  """Aggregates a buffer of masked updates.

  Args:
    deltas: leaves [K, ...]: ``m_i * (w_local - w_base)``, zero outside the
      mask; invalid rows must already be finite (zeroed) because their weight
      is 0 and 0 * NaN = NaN.
    masks: leaves [K, ...] in {0, 1}: which coordinates client i trained.
    weights: [K] non-negative ``a_i``; 0 for invalid updates.
    normalization: ``coordinate``: divide each coordinate by the total weight
      of the clients that trained it (FTTE, and FedAvg with full masks);
      ``buffer``: divide by the number of valid updates (FedBuff's 1/K, and
      FedAsync's mixing when K = 1).
    eps: floor of the denominator, so untouched coordinates get 0.

  Returns:
    The aggregate update, shaped like one client's delta.
  """
  if normalization == "coordinate":
    return weighted_mean(deltas, masks, weights, eps)
  if normalization == "buffer":
    n_valid = jnp.maximum(jnp.sum(weights > 0), 1).astype(jnp.float32)
    return jax.tree.map(lambda d: _wsum(weights, d) / n_valid, deltas)
  raise ValueError(f"normalization must be one of {NORMALIZATIONS}, "
                   f"got {normalization!r}")
