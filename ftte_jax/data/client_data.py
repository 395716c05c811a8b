"""Client tensors laid out by offsets (CSR): every example once, by client.

``x``/``y`` hold each client's examples contiguously, client after client;
client ``i`` owns rows ``[offsets[i], offsets[i] + counts[i])``. Memory is
O(examples + clients) whatever the size skew, and a local batch is drawn in
O(batch) work whatever the client's size (``batch_positions``).

Sampling scheme (docs/design.md, "Client data"): a task walks its client's
rows in the order of a random affine permutation ``j -> (a*j + b) mod n``,
with ``a`` coprime to ``n`` and ``b`` uniform, wrapping around: every
example is visited exactly once in each epoch of ``n`` draws. Each client's
rows are stored in a fixed random order (seeded), so the walk does not
follow the partition's own order (a label-skew partition lists by class).
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from ftte_jax.core import draws

# Counts up to 2^30 keep every sum in ``batch_positions`` below 2^32.
MAX_CLIENT_EXAMPLES = 2 ** 30


@struct.dataclass
class ClientData:
  """Federated training data: examples ordered by client, plus offsets."""

  x: jnp.ndarray  # [M, *example_shape] float32 (int32 tokens [M, T]):
  #   client 0's rows, then 1's...
  y: jnp.ndarray  # [M] int32 labels ([M, T] for sequences).
  offsets: jnp.ndarray  # [N] int32: first row of each client.
  counts: jnp.ndarray  # [N] int32: rows of each client (>= 1).
  # name -> [M, ...]: further per-example arrays, rows as x and y (e.g.
  # "mask": [M, T] float32, 1 for real tokens); a batch gathers them too.
  extras: dict = struct.field(default_factory=dict)

  @property
  def num_clients(self) -> int:
    return int(self.counts.shape[0])

  @property
  def num_examples(self) -> int:
    return int(self.y.shape[0])

  def rows(self, i: int) -> np.ndarray:
    """Host-side row numbers of client ``i`` (for tests and probes)."""
    start = int(self.offsets[i])
    return np.arange(start, start + int(self.counts[i]))


def _check_partition(num_examples: int, partition: Sequence[np.ndarray]
                     ) -> np.ndarray:
  """Validates a partition; returns the counts [N]."""
  if len(partition) == 0:
    raise ValueError("partition: need at least one client, got 0")
  counts = np.array([len(p) for p in partition], dtype=np.int64)
  if (counts < 1).any():
    empty = int(np.argmin(counts))
    raise ValueError(f"partition: client {empty} has no examples; every client "
                     "needs at least 1")
  if counts.max() > MAX_CLIENT_EXAMPLES or counts.sum() >= 2 ** 31:
    raise ValueError(f"partition: at most {MAX_CLIENT_EXAMPLES} examples per "
                     "client and 2^31 - 1 in total (int32 row numbers)")
  for i, p in enumerate(partition):
    p = np.asarray(p)
    if p.min() < 0 or p.max() >= num_examples:
      raise ValueError(f"partition: client {i} indexes outside "
                       f"[0, {num_examples})")
  return counts


def from_partition(x: np.ndarray, y: np.ndarray,
                   partition: Sequence[np.ndarray], seed: int = 0,
                   extras: dict | None = None) -> ClientData:
  """Builds ClientData from per-client index arrays into ``x``/``y``.

  Args:
    x: [M, ...] examples: stored float32, or int32 when integer (tokens).
    y: [M] (or [M, T]) integer labels.
    partition: one 1-D integer array per client, each non-empty. An example
      listed by two clients is stored twice.
    seed: seeds the fixed random order of each client's rows.
    extras: name -> [M, ...] per-example arrays, gathered like ``x`` (dtype
      kept).

  Returns:
    ClientData holding exactly the partitioned examples, client by client.
  """
  x = np.asarray(x)
  y = np.asarray(y)
  extras = {k: np.asarray(v) for k, v in (extras or {}).items()}
  if x.shape[0] != y.shape[0]:
    raise ValueError(f"x has {x.shape[0]} examples but y has {y.shape[0]}")
  for k, v in extras.items():
    if v.shape[0] != x.shape[0]:
      raise ValueError(f"extras[{k!r}] has {v.shape[0]} rows but x has "
                       f"{x.shape[0]}")
  counts = _check_partition(x.shape[0], partition)
  offsets = np.concatenate([[0], np.cumsum(counts)[:-1]])
  rng = np.random.default_rng(seed)
  order = np.concatenate([np.asarray(p, np.int64)[rng.permutation(len(p))]
                          for p in partition])
  # device_put of a fresh host array can alias it on the CPU (jnp.asarray
  # copies it, twice at peak): one copy of the examples, not three.
  x_type = np.int32 if np.issubdtype(x.dtype, np.integer) else np.float32
  return ClientData(x=jax.device_put(np.asarray(x, x_type)[order]),
                    y=jax.device_put(np.asarray(y, np.int32)[order]),
                    offsets=jax.device_put(offsets.astype(np.int32)),
                    counts=jax.device_put(counts.astype(np.int32)),
                    extras={k: jax.device_put(v[order])
                            for k, v in extras.items()})


def as_batch(data: ClientData) -> dict:
  """Every example as one batch dict: ``{"x", "y", **extras}`` (rows in
  client order); index it with row numbers to gather a batch."""
  return {"x": data.x, "y": data.y, **data.extras}


def layout_report(data: ClientData) -> dict[str, float]:
  """Sizes of the layout: clients, examples, smallest and largest client,
  and the bytes of the offset and count vectors."""
  counts = np.asarray(data.counts)
  return {"num_clients": int(counts.size), "num_examples": int(counts.sum()),
          "max_n": int(counts.max()), "min_n": int(counts.min()),
          "index_bytes": int(data.offsets.nbytes + data.counts.nbytes)}


def _primes(lo: int, count: int) -> np.ndarray:
  """The ``count`` smallest primes >= ``lo`` (a segmented sieve; lo < 2^31)."""
  width = 64 * count  # prime gaps near 2^30 average about 21
  limit = int(np.sqrt(lo + width)) + 1
  small = np.ones(limit + 1, bool)
  small[:2] = False
  for p in range(2, int(limit ** 0.5) + 1):
    if small[p]:
      small[p * p::p] = False
  segment = np.ones(width, bool)
  for p in np.flatnonzero(small):
    segment[(-lo) % p::p] = False
  return (lo + np.flatnonzero(segment)[:count]).astype(np.int64)


# Strides: primes above every allowed count are coprime to any count n, so
# ``p mod n`` generates the whole of Z_n.
STRIDE_BITS = 8  # a walk's stride: the top 8 bits of a word pick one of 256.
STRIDE_PRIMES = _primes(MAX_CLIENT_EXAMPLES + 1,
                        2 ** STRIDE_BITS).astype(np.uint32)
# A walk's random words: one picks the stride, two give its offset.
WALK_WORDS = 3


def _mulmod(a: jnp.ndarray, b: jnp.ndarray, n: jnp.ndarray, bits: int
            ) -> jnp.ndarray:
  """``(a * b) mod n`` in uint32 for ``a < n <= 2^30`` and ``b < 2^bits``."""
  r = jnp.zeros(jnp.broadcast_shapes(a.shape, b.shape), jnp.uint32)
  for bit in reversed(range(bits)):  # double and add: 2r + a < 2^32.
    r = (r * 2 + a * ((b >> bit) & 1)) % n
  return r


@struct.dataclass
class Walk:
  """One task's affine walk ``j -> (a*j + b) mod n`` over its client's rows,
  with the per-batch terms precomputed so a batch costs O(B)."""

  stride_batch: jnp.ndarray  # [] uint32: (a * B) mod n.
  start: jnp.ndarray  # [B] uint32: (a * t + b) mod n for t < B.


def make_walk(key: jax.Array, count: jnp.ndarray, batch_size: int) -> Walk:
  """A random walk for one task: ``a`` coprime to ``count``, ``b`` uniform.

  One ``jax.random.bits`` call gives three words: the top 8 bits of the
  first pick ``a`` among the 256 stride primes, and ``b`` is
  ``draws.below`` of the other two (uniform to within ``count / 2^64``).
  """
  w = jax.random.bits(key, (WALK_WORDS,), jnp.uint32)
  n = count.astype(jnp.uint32)
  a = jnp.asarray(STRIDE_PRIMES)[w[0] >> (32 - STRIDE_BITS)] % n
  b = draws.below(w[1], w[2], n)
  t = jnp.arange(batch_size, dtype=jnp.uint32) % n
  bits = max(1, int(batch_size).bit_length())
  return Walk(stride_batch=_mulmod(a, jnp.uint32(batch_size) % n, n, bits),
              start=(_mulmod(a, t, n, bits) + b) % n)


def walk_batch(walk: Walk, count: jnp.ndarray, r: jnp.ndarray
               ) -> tuple[jnp.ndarray, jnp.ndarray]:
  """The next batch's positions and the walk's next offset.

  ``r`` is ``(a * step * B) mod n`` (uint32; start from 0): two additions
  a step, equal to ``batch_positions(walk, count, step)``.
  """
  n = count.astype(jnp.uint32)
  return (((r + walk.start) % n).astype(jnp.int32),
          (r + walk.stride_batch) % n)


def batch_positions(walk: Walk, count: jnp.ndarray, step: jnp.ndarray
                    ) -> jnp.ndarray:
  """Positions in ``[0, count)`` of local batch ``step``: draws
  ``step*B .. step*B + B - 1`` of the walk."""
  n = count.astype(jnp.uint32)
  i = jnp.asarray(step).astype(jnp.uint32) % n
  return ((_mulmod(walk.stride_batch, i, n, 30) + walk.start) % n
          ).astype(jnp.int32)
