"""Client tensors for vmap: the dataset lives once, clients hold padded index rows.

Memory grows with the number of examples (plus one int32 per padded slot), not
with clients times padded examples: every client row indexes into one shared
``x``/``y`` array that sits on the device once.
"""

from __future__ import annotations

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
  return ClientData(x=jnp.asarray(x, jnp.float32), y=jnp.asarray(y, jnp.int32),
                    indices=jnp.asarray(indices), counts=jnp.asarray(counts))


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
