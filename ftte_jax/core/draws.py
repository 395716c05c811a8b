"""Random values from raw threefry words, so a hot path draws once.

XLA:CPU lowers every ``jax.random`` call as its own rolled threefry loop of
several kernels, and every kernel costs compile time (docs/design.md, "Jit
boundary"). The server step and the client walk therefore take all the
words they need from one ``jax.random.bits`` call and turn slices of them
into values here:

- ``uniform`` and ``normal`` are JAX's own transforms, so
  ``uniform(jax.random.bits(key, s))`` equals ``jax.random.uniform(key, s)``
  bit for bit (and likewise ``normal``);
- ``below`` maps two words to an integer in ``[0, n)`` by the exact 64-bit
  reduction ``(hi * 2^32 + lo) mod n``, whose bias is below ``n / 2^64``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["MAX_BELOW", "below", "mulmod", "normal", "uniform"]

# The largest ``n`` for ``below`` (and ``mulmod``): 2r + a stays below 2^32.
MAX_BELOW = 2 ** 30


def mulmod(a: jnp.ndarray, b: jnp.ndarray, n: jnp.ndarray, bits: int
           ) -> jnp.ndarray:
  """``(a * b) mod n`` in uint32 for ``a < n <= 2^30`` and ``b < 2^bits``."""
  r = jnp.zeros(jnp.broadcast_shapes(a.shape, b.shape), jnp.uint32)
  for bit in reversed(range(bits)):  # double and add: 2r + a < 2^32.
    r = (r * 2 + a * ((b >> bit) & 1)) % n
  return r


def below(hi: jnp.ndarray, lo: jnp.ndarray, n: jnp.ndarray) -> jnp.ndarray:
  """uint32 ``(hi * 2^32 + lo) mod n``: uniform on ``[0, n)`` to within
  ``n / 2^64`` for uniform words ``hi`` and ``lo``; ``1 <= n <= 2^30``."""
  n = jnp.asarray(n).astype(jnp.uint32)
  two32 = (jnp.uint32(0xFFFFFFFF) % n + 1) % n  # 2^32 mod n
  return (mulmod(hi % n, two32, n, 30) + lo % n) % n


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
