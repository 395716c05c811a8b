"""Random values from raw threefry words, so a hot path draws once.

XLA:CPU lowers every ``jax.random`` call as its own rolled threefry loop of
several kernels, and every kernel costs compile time (docs/design.md, "Jit
boundary"). The dispatch and the client walk therefore take all the words
they need from one ``jax.random.bits`` call each and turn slices of them
into values here:

- ``uniform`` and ``normal`` are JAX's own transforms, so
  ``uniform(jax.random.bits(key, s))`` equals ``jax.random.uniform(key, s)``
  bit for bit (and likewise ``normal``);
- ``below`` maps two words to an integer in ``[0, n)``: the 64-bit fraction
  they make, times ``n``, rounded down (exact integer arithmetic), whose
  bias is below ``n / 2^64``.

Hashes of a few words (a key's ``fold_in``, a client walk's three words)
need no loop at all: ``fold_in`` and ``few_bits`` compute JAX's threefry
with its twenty rounds written out, which XLA fuses into one small kernel
where the rolled loop is a ``while`` of several. They equal
``jax.random.fold_in`` and ``jax.random.bits`` bit for bit. Many words
(the dispatch's) stay with ``jax.random.bits``: written out over a large
array the hash is slower to compile than the loop.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["below", "few_bits", "fold_in", "normal", "uniform"]

# Threefry-2x32's rotations (the two alternate between key injections) and
# key-schedule parity, as in Salmon et al. (2011) and jax.random.
_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))
_PARITY = np.uint32(0x1BD11BDA)


def _threefry2x32(k1, k2, x1, x2) -> tuple[jnp.ndarray, jnp.ndarray]:
  """Threefry-2x32 of the counter pairs ``(x1, x2)`` under key ``(k1, k2)``:
  five groups of four rounds, written out (uint32 arrays, broadcast)."""
  ks = (k1, k2, k1 ^ k2 ^ _PARITY)
  x = [x1 + ks[0], x2 + ks[1]]
  for group in range(5):
    for r in _ROTATIONS[group % 2]:
      x[0] = x[0] + x[1]
      x[1] = x[0] ^ ((x[1] << np.uint32(r)) | (x[1] >> np.uint32(32 - r)))
    x[0] = x[0] + ks[(group + 1) % 3]
    x[1] = x[1] + ks[(group + 2) % 3] + np.uint32(group + 1)
  return x[0], x[1]


def _raw(key) -> bool:
  """A raw uint32[2] threefry key (not a typed ``jax.random.key``)."""
  return (getattr(key, "dtype", None) == jnp.uint32 and
          getattr(key, "shape", None) == (2,))


def fold_in(key: jax.Array, data) -> jax.Array:
  """``jax.random.fold_in(key, data)`` for a raw uint32[2] key, bit for
  bit, without the rolled loop (other keys go to ``jax.random.fold_in``).
  ``data``: a scalar integer, converted to uint32 as JAX converts it."""
  if not _raw(key):
    return jax.random.fold_in(key, data)
  if jnp.ndim(data):
    raise ValueError(f"fold_in: data must be a scalar, got shape "
                     f"{jnp.shape(data)}")
  # jax.random: the hash of the counter pair (0, data) (a 32-bit seed's
  # high word is zero).
  y1, y2 = _threefry2x32(key[0], key[1], jnp.zeros((), jnp.uint32),
                         jnp.asarray(data, jnp.uint32))
  return jnp.stack([y1, y2])


def few_bits(key: jax.Array, n: int) -> jnp.ndarray:
  """``jax.random.bits(key, (n,), jnp.uint32)`` for a raw key, bit for bit;
  for a few words (see the module docstring). Without JAX's partitionable
  threefry (``jax_threefry_partitionable``) it calls ``jax.random.bits``."""
  if not (_raw(key) and jax.config.jax_threefry_partitionable):
    return jax.random.bits(key, (n,), jnp.uint32)
  # Partitionable threefry: word i hashes the 64-bit counter i as the
  # pair (0, i), and is the XOR of the pair's two outputs.
  y1, y2 = _threefry2x32(key[0], key[1], jnp.zeros((n,), jnp.uint32),
                         jnp.arange(n, dtype=jnp.uint32))
  return y1 ^ y2


def _mul32(a: jnp.ndarray, b: jnp.ndarray
           ) -> tuple[jnp.ndarray, jnp.ndarray]:
  """The 64-bit product of uint32 ``a`` and ``b`` as (high, low) words,
  from 16-bit limbs (every partial product fits 32 bits)."""
  mask = jnp.uint32(0xFFFF)
  a1, a0, b1, b0 = a >> 16, a & mask, b >> 16, b & mask
  p00, p01, p10 = a0 * b0, a0 * b1, a1 * b0
  mid = (p00 >> 16) + (p01 & mask) + (p10 & mask)
  return (a1 * b1 + (p01 >> 16) + (p10 >> 16) + (mid >> 16),
          (mid << 16) | (p00 & mask))


def below(hi: jnp.ndarray, lo: jnp.ndarray, n: jnp.ndarray) -> jnp.ndarray:
  """uint32 ``floor((hi * 2^32 + lo) * n / 2^64)``: the 64-bit fraction of
  two words scaled to ``[0, n)``, uniform to within ``n / 2^64`` for
  uniform words; ``1 <= n < 2^32``."""
  n = jnp.asarray(n, jnp.uint32)
  h1, h0 = _mul32(hi, n)  # hi * n = h1 * 2^32 + h0
  l1, _ = _mul32(lo, n)  # lo * n = l1 * 2^32 + (below 2^32, dropped)
  # (hi*n*2^32 + lo*n) / 2^64: the dropped word cannot carry into h1.
  mid = h0 + l1
  return h1 + (mid < h0).astype(jnp.uint32)


def uniform(words: jnp.ndarray, minval: float = 0.0, maxval: float = 1.0
            ) -> jnp.ndarray:
  """float32 uniform on ``[minval, maxval)`` from uint32 words, as
  ``jax.random.uniform`` makes it: 23 random mantissa bits."""
  one = np.array(1.0, np.float32).view(np.uint32)
  unit = jax.lax.bitcast_convert_type(
      (words >> jnp.uint32(9)) | jnp.uint32(one), jnp.float32) - 1.0
  lo, hi = np.float32(minval), np.float32(maxval)
  return jnp.maximum(lo, unit * (hi - lo) + lo)


def normal(words: jnp.ndarray) -> jnp.ndarray:
  """float32 standard normals from uint32 words, as ``jax.random.normal``
  makes them: ``sqrt(2) * erfinv(u)`` with ``u`` uniform on ``(-1, 1)``."""
  lo = np.nextafter(np.float32(-1.0), np.float32(0.0))
  return np.float32(np.sqrt(2)) * jax.lax.erf_inv(uniform(words, lo, 1.0))
