"""The run's named PRNG keys, derived on the host without compiling.

``jax.random.PRNGKey`` and ``jax.random.fold_in`` called outside ``jit``
each compile a small XLA program the first time in a process: about 0.2 s
of a cold start on the 2-core CPU (docs/design.md, "Jit boundary"). The
run derives its named keys (``planning.KEY_*``) before any of its programs
exists, so this module computes them in Python integers: the threefry-2x32
hash JAX uses, bit for bit (``tests/test_keys.py`` holds it to
``jax.random``). Where that would not hold (another PRNG implementation,
64-bit mode, a seed or datum outside the plain 32-bit range) it calls
``jax.random``.
"""

from __future__ import annotations

import jax
import numpy as np

__all__ = ["fold_in", "root"]

# Threefry-2x32's rotations (the two alternate between key injections) and
# key-schedule parity, as in Salmon et al. (2011) and jax.random.
_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))
_PARITY = 0x1BD11BDA
_MASK = 0xFFFFFFFF


def _threefry2x32(k1: int, k2: int, x1: int, x2: int) -> tuple[int, int]:
  """Threefry-2x32 (20 rounds) of the counter pair ``(x1, x2)`` under the
  key ``(k1, k2)``, in Python integers kept to 32 bits."""
  ks = (k1, k2, k1 ^ k2 ^ _PARITY)
  x = [(x1 + ks[0]) & _MASK, (x2 + ks[1]) & _MASK]
  for group in range(5):
    for r in _ROTATIONS[group % 2]:
      x[0] = (x[0] + x[1]) & _MASK
      x[1] = x[0] ^ (((x[1] << r) | (x[1] >> (32 - r))) & _MASK)
    x[0] = (x[0] + ks[(group + 1) % 3]) & _MASK
    x[1] = (x[1] + ks[(group + 2) % 3] + group + 1) & _MASK
  return x[0], x[1]


def _plain() -> bool:
  """JAX's keys are raw threefry uint32[2] keys with 32-bit seeds."""
  return (jax.config.jax_default_prng_impl == "threefry2x32" and
          not jax.config.jax_enable_x64 and
          not getattr(jax.config, "jax_enable_custom_prng", False))


def _key(words: tuple[int, int]) -> jax.Array:
  return jax.device_put(np.array(words, np.uint32))


def root(seed: int) -> jax.Array:
  """``jax.random.PRNGKey(seed)``: the counter pair ``(0, seed)``."""
  if not (_plain() and 0 <= seed < 2**31):
    return jax.random.PRNGKey(seed)
  return _key((0, int(seed)))


def fold_in(key: jax.Array, data: int) -> jax.Array:
  """``jax.random.fold_in(key, data)`` for a raw key: the hash of the
  counter pair ``(0, data)`` under ``key``."""
  if isinstance(key, jax.core.Tracer):
    return jax.random.fold_in(key, data)
  words = np.asarray(key)
  if not (_plain() and words.dtype == np.uint32 and words.shape == (2,) and
          0 <= data < 2**32):
    return jax.random.fold_in(key, data)
  return _key(_threefry2x32(int(words[0]), int(words[1]), 0, int(data)))
