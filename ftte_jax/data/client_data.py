"""Client tensors for vmap: the dataset lives once, clients hold padded index rows.

Memory grows with the number of examples (plus one int32 per padded slot), not
with clients times padded examples: every client row indexes into one shared
``x``/``y`` array that sits on the device once.
"""

from __future__ import annotations

import warnings
from typing import Sequence

import jax.numpy as jnp
import numpy as np
from flax import struct


@struct.dataclass
class ClientData:
  """Federated training data laid out for fixed-shape, vmapped access."""

  x: jnp.ndarray  # [M, *example_shape] float32: every training example once.
  y: jnp.ndarray  # [M] int32: labels.
  indices: jnp.ndarray  # [N, max_n] int32: client i's rows into x; padding is 0.
  counts: jnp.ndarray  # [N] int32: how many of indices[i] are real (>= 1).

  @property
  def num_clients(self) -> int:
    return int(self.indices.shape[0])

  @property
  def max_examples(self) -> int:
    return int(self.indices.shape[1])


def _index_table(num_examples: int, partition: Sequence[np.ndarray]
                 ) -> tuple[np.ndarray, np.ndarray]:
  """Validates a partition; returns padded indices [N, max_n] and counts [N]."""
  if len(partition) == 0:
    raise ValueError("partition: need at least one client, got 0")
  counts = np.array([len(p) for p in partition], dtype=np.int32)
  if (counts < 1).any():
    empty = int(np.argmin(counts))
    raise ValueError(f"partition: client {empty} has no examples; every client "
                     "needs at least 1")
  max_n = int(counts.max())
  indices = np.zeros((len(partition), max_n), dtype=np.int32)
  for i, p in enumerate(partition):
    p = np.asarray(p, dtype=np.int64)
    if p.min() < 0 or p.max() >= num_examples:
      raise ValueError(f"partition: client {i} indexes outside "
                       f"[0, {num_examples})")
    indices[i, :len(p)] = p
  return indices, counts


def from_partition(x: np.ndarray, y: np.ndarray,
                   partition: Sequence[np.ndarray]) -> ClientData:
  """Builds ClientData from per-client index arrays into ``x``/``y``.

  Args:
    x: [M, ...] examples.
    y: [M] integer labels.
    partition: one 1-D integer array per client, each non-empty.

  Returns:
    ClientData with rows padded to the largest client.
  """
  x = np.asarray(x)
  y = np.asarray(y)
  if x.shape[0] != y.shape[0]:
    raise ValueError(f"x has {x.shape[0]} examples but y has {y.shape[0]}")
  indices, counts = _index_table(x.shape[0], partition)
  max_n = indices.shape[1]
  if indices.size > 2 * x.shape[0]:
    warnings.warn(
        f"ClientData: padded index table holds {indices.size} slots for "
        f"{x.shape[0]} examples (N={len(counts)} x max_n={max_n}, "
        f"{indices.size / x.shape[0]:.1f}x): per-client work pads to the largest"
        " client, more than doubling it; use client_data.bucket_by_size to pad "
        "each bucket to its own max, or a more balanced partition",
        PaddingWarning, stacklevel=2)
  return ClientData(x=jnp.asarray(x, jnp.float32), y=jnp.asarray(y, jnp.int32),
                    indices=jnp.asarray(indices), counts=jnp.asarray(counts))


class PaddingWarning(UserWarning):
  """Padding the client index table to max_n more than doubles its size."""


def padding_report(data: ClientData) -> dict[str, float]:
  """Summarizes what padding to the largest client costs.

  Args:
    data: a ClientData.

  Returns:
    Flat dict: 'num_clients', 'num_examples' (real client slots, sum of
    counts), 'max_n', 'min_n', 'padded_slots' (N * max_n), 'overhead' (padded
    / real slots; 1.0 means no padding), 'index_bytes' (int32 index table).
  """
  counts = np.asarray(data.counts)
  real = int(counts.sum())
  padded = int(data.indices.size)
  return {"num_clients": int(counts.size), "num_examples": real,
          "max_n": int(data.max_examples), "min_n": int(counts.min()),
          "padded_slots": padded, "overhead": padded / max(real, 1),
          "index_bytes": padded * 4}


def bucket_by_size(x: np.ndarray, y: np.ndarray,
                   partition: Sequence[np.ndarray], num_buckets: int = 4
                   ) -> list[tuple[ClientData, np.ndarray]]:
  """Groups clients by example count so each group pads to its own max.

  Clients are sorted by count and cut into ``num_buckets`` contiguous groups
  minimizing total padded slots (exact dynamic programming over the sorted
  counts; O(N^2 * num_buckets), fine for thousands of clients). Fewer buckets
  come back when there are fewer distinct sizes. Each bucket is its own
  ClientData (sharing the same examples), so a bucketed engine compiles once
  per bucket shape.

  Args:
    x: [M, ...] examples.
    y: [M] labels.
    partition: one 1-D index array per client.
    num_buckets: maximum number of buckets, >= 1.

  Returns:
    A list of (ClientData, client_ids [n_b] int32), client_ids giving each
    bucket row's position in ``partition``; buckets in increasing size.
  """
  if not isinstance(num_buckets, (int, np.integer)) or num_buckets < 1:
    raise ValueError(f"num_buckets must be an integer >= 1, got {num_buckets!r}")
  x, y = np.asarray(x), np.asarray(y)
  if x.shape[0] != y.shape[0]:
    raise ValueError(f"x has {x.shape[0]} examples but y has {y.shape[0]}")
  counts = np.array([len(p) for p in partition], dtype=np.int64)
  order = np.argsort(counts, kind="stable")
  c = counts[order]
  n = len(c)
  k = min(int(num_buckets), len(np.unique(c)))
  # cost[j][i]: min padded slots covering the first i sorted clients with j
  # buckets; a bucket (a, i] costs (i - a) * c[i-1] since c is sorted.
  inf = np.iinfo(np.int64).max // 4
  cost = np.full((k + 1, n + 1), inf, dtype=np.int64)
  cut = np.zeros((k + 1, n + 1), dtype=np.int64)
  cost[0, 0] = 0
  for j in range(1, k + 1):
    for i in range(1, n + 1):
      a = np.arange(i)
      cand = cost[j - 1, a] + (i - a) * c[i - 1]
      best = int(np.argmin(cand))
      cost[j, i], cut[j, i] = cand[best], best
  j = int(np.argmin(cost[1:, n])) + 1
  bounds, i = [], n
  while j > 0:
    bounds.append((int(cut[j, i]), i))
    i, j = int(cut[j, i]), j - 1
  # One device copy of the examples, shared by every bucket.
  xj, yj = jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.int32)
  out = []
  for a, b in reversed(bounds):
    ids = order[a:b]
    indices, cnt = _index_table(x.shape[0], [partition[t] for t in ids])
    out.append((ClientData(x=xj, y=yj, indices=jnp.asarray(indices),
                           counts=jnp.asarray(cnt)), ids.astype(np.int32)))
  return out
