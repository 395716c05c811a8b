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
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["below", "normal", "uniform"]


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
