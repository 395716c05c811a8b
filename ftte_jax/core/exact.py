"""Exact running sums on a float32 device: a (hi, lo) pair of float32.

A float32 counter that adds 44,056 bytes a million times drifts by half a
percent, because every addition rounds to 24 bits. A pair kept with an
error-free transformation (Knuth's two-sum) holds about 48 bits: integer
sums stay exact up to 2**48 (2.8e14), which is what byte and staleness
counters need, without enabling 64-bit types in JAX. Read on the host with
``value``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def zero() -> jnp.ndarray:
  """[2] float32: an empty sum."""
  return jnp.zeros((2,), jnp.float32)


def of(x) -> jnp.ndarray:
  """[2] float32 holding ``x`` (a host float, split into hi and lo)."""
  x = np.float64(x)
  hi = np.float32(x)
  return jax.device_put(np.array([hi, x - np.float64(hi)], np.float32))


def add(acc: jnp.ndarray, x: jnp.ndarray) -> jnp.ndarray:
  """``acc + x`` without losing the low bits (jit-safe).

  Two-sum of hi and x gives the rounded sum and its exact rounding error;
  the error joins lo, and the pair is renormalized so |lo| <= ulp(hi)/2.
  """
  x = jnp.asarray(x, jnp.float32)
  hi, lo = acc[0], acc[1]
  s = hi + x
  bb = s - hi
  err = (hi - (s - bb)) + (x - bb)
  lo = lo + err
  top = s + lo
  return jnp.stack([top, lo - (top - s)])


def add_pair(acc: jnp.ndarray, other: jnp.ndarray) -> jnp.ndarray:
  """``acc + other`` for two exact pairs."""
  return add(add(acc, other[0]), other[1])


def value(acc) -> float:
  """The sum as a host float64."""
  a = np.asarray(acc, np.float64)
  return float(a[0] + a[1])
