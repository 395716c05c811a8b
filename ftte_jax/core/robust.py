"""Defences against faulty and malicious updates: clipping and robust means.

Both act on a step's buffer of K masked updates (leaves [K, ...], zero off
each client's mask and on invalid rows), before the aggregate:

* ``clip_updates``: each update's L2 norm is cut to a bound, either fixed
  (``clip_norm``; also DP's sensitivity) or the median norm of the step's
  valid updates (a data-driven bound, as in Sun et al. 2019's norm
  bounding). Direction is kept.
* ``keep_mask``: per coordinate, among the valid updates that trained it
  (their tier's mask covers it), the ``floor(beta * n)`` smallest and
  largest values are dropped (trimmed mean, Yin et al. 2018), or all but
  the middle one or two (coordinate-wise median). ``aggregation.aggregate``
  then applies the run's own weights and normalization to what is kept, so
  both compose with masks, tiers and staleness weights.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ftte_jax.core.typing import PyTree

CLIPS = ("none", "median", "fixed")
ROBUST_AGGREGATIONS = ("mean", "trimmed_mean", "median")


def _rows(leaf: jnp.ndarray) -> jnp.ndarray:
  return leaf.reshape(leaf.shape[0], -1)


def scaled_norms(deltas: PyTree) -> tuple[jnp.ndarray, jnp.ndarray]:
  """``(s, e)`` [K] with ``||d_i|| = s_i * 2**e_i`` and s_i finite.

  Each row is scaled by a power of two of its own largest entry, so a finite
  update whose squares overflow float32 (a x1e20 attack) still has a norm.
  """
  k = jax.tree.leaves(deltas)[0].shape[0]
  big = jnp.max(jnp.stack([jnp.max(jnp.abs(_rows(d)), axis=1)
                           for d in jax.tree.leaves(deltas)]), axis=0)
  _, e = jnp.frexp(big)
  inv = jnp.ldexp(jnp.ones((k,), jnp.float32), -e)
  sq = sum(jnp.sum((_rows(d) * inv[:, None]) ** 2, axis=1)
           for d in jax.tree.leaves(deltas))
  return jnp.sqrt(sq), e


def update_norms(deltas: PyTree) -> jnp.ndarray:
  """[K] L2 norm of each update (inf where it exceeds float32)."""
  s, e = scaled_norms(deltas)
  return jnp.ldexp(s, e)


def clip_updates(deltas: PyTree, valid: jnp.ndarray, mode: str,
                 bound: float) -> tuple[PyTree, jnp.ndarray]:
  """Scales each update to norm at most the bound.

  Args:
    deltas: leaves [K, ...], finite.
    valid: [K] bool: rows that count (the median is taken over these).
    mode: ``fixed`` (``bound``) or ``median`` (median norm of the valid
      rows; no clipping when none is valid).
    bound: the fixed bound, > 0.

  Returns:
    ``(clipped deltas, [K] bool: valid rows that were scaled down)``.
  """
  if mode not in CLIPS[1:]:
    raise ValueError(f"clip must be one of {CLIPS[1:]}, got {mode!r}")
  s, e = scaled_norms(deltas)
  if mode == "fixed":
    thr = jnp.asarray(bound, jnp.float32)
  else:
    thr = jnp.nanmedian(jnp.where(valid, jnp.ldexp(s, e), jnp.nan))
    thr = jnp.where(jnp.isnan(thr), jnp.inf, thr)
  # ||d|| > thr  <=>  s > thr * 2**-e; the factor is thr / ||d|| computed
  # without forming ||d|| (which may be inf).
  limit = jnp.ldexp(thr, -e)
  over = s > limit
  factor = jnp.where(over, limit / jnp.where(over, s, 1.0), 1.0)
  out = jax.tree.map(
      lambda d: d * factor.reshape((-1,) + (1,) * (d.ndim - 1)), deltas)
  return out, over & valid


def keep_mask(deltas: PyTree, tier_masks: PyTree, tier: jnp.ndarray,
              valid: jnp.ndarray, mode: str, trim_fraction: float = 0.1
              ) -> tuple[PyTree, jnp.ndarray, jnp.ndarray]:
  """Which (update, coordinate) values a robust mean keeps.

  Args:
    deltas: leaves [K, ...].
    tier_masks: leaves [T, ...] in {0, 1}.
    tier: [K] int32 tier of each update.
    valid: [K] bool.
    mode: ``trimmed_mean`` or ``median``.
    trim_fraction: beta in [0, 0.5): the share trimmed at each end.

  Returns:
    ``(keep, n_trimmed, n_values)``: keep leaves [K, ...] float32 0/1 (zero
    off each update's mask and on invalid rows); how many participating
    values were dropped, and how many participated (float32 scalars).
  """
  if mode not in ROBUST_AGGREGATIONS[1:]:
    raise ValueError(f"robust_aggregation must be one of "
                     f"{ROBUST_AGGREGATIONS[1:]}, got {mode!r}")
  if not 0 <= trim_fraction < 0.5:
    raise ValueError(f"trim_fraction must be in [0, 0.5), got "
                     f"{trim_fraction!r}")

  def leaf(d, m):
    part = valid.reshape((-1,) + (1,) * (d.ndim - 1)) & (m[tier] > 0)
    # Non-participants sort after every real value; ties break by index
    # (stable sort), so the kept set is deterministic.
    order = jnp.argsort(jnp.where(part, d, jnp.inf), axis=0, stable=True)
    rank = jnp.argsort(order, axis=0, stable=True)
    n = jnp.sum(part, axis=0)
    if mode == "median":
      t = jnp.maximum(n - 1, 0) // 2
    else:
      t = jnp.floor(trim_fraction * n).astype(n.dtype)
    keep = part & (rank >= t) & (rank < n - t)
    return keep.astype(jnp.float32), jnp.sum(part)

  leaves, treedef = jax.tree.flatten(deltas)
  keeps, parts = zip(*(leaf(d, m) for d, m in zip(
      leaves, treedef.flatten_up_to(tier_masks))))
  n_part = sum(parts).astype(jnp.float32)
  n_kept = sum(jnp.sum(k) for k in keeps)
  return treedef.unflatten(keeps), n_part - n_kept, n_part
