"""Staleness weights: how much an update computed from an old version counts.

``tau`` is the server version now minus the version the client started from.
Each function maps ``tau`` (any shape, int or float) to a weight in (0, 1].
The FTTE variance weight lives here too: it down-weights updates that
deviate from the buffer's consensus. Both functional forms are this project's
reconstruction (the paper's formulas are not public); see docs/design.md,
"Aggregation and weighting".
"""

from __future__ import annotations

from typing import Callable

import jax.numpy as jnp

STALENESS_FUNCTIONS = ("constant", "polynomial", "hinge", "exponential")


def make_staleness_fn(name: str, a: float = 0.5,
                      b: float = 4.0) -> Callable[[jnp.ndarray], jnp.ndarray]:
  """Returns ``s_age(tau)``.

  Args:
    name: one of ``constant`` (1), ``polynomial`` ((1+tau)^-a, FedBuff uses
      a=0.5), ``hinge`` (1 for tau <= b, else 1/(a*(tau-b)+1), as in
      FedAsync), ``exponential`` (exp(-a*tau)).
    a: decay rate, >= 0.
    b: hinge threshold, >= 0.
  """
  if name not in STALENESS_FUNCTIONS:
    raise ValueError(f"staleness must be one of {STALENESS_FUNCTIONS}, "
                     f"got {name!r}")
  if a < 0:
    raise ValueError(f"staleness_a must be >= 0, got {a}")
  if b < 0:
    raise ValueError(f"staleness_b must be >= 0, got {b}")
  if name == "constant":
    return lambda tau: jnp.ones_like(jnp.asarray(tau, jnp.float32))
  if name == "polynomial":
    return lambda tau: (1.0 + jnp.asarray(tau, jnp.float32)) ** (-a)
  if name == "hinge":
    def hinge(tau):
      tau = jnp.asarray(tau, jnp.float32)
      return jnp.where(tau <= b, 1.0, 1.0 / (a * (tau - b) + 1.0))
    return hinge
  return lambda tau: jnp.exp(-a * jnp.asarray(tau, jnp.float32))


def variance_weight(deviation: jnp.ndarray, beta: float) -> jnp.ndarray:
  """FTTE's ``s_var = 1 / (1 + beta * d)``; ``beta = 0`` switches it off."""
  return 1.0 / (1.0 + beta * deviation)


def buffer_variance_weight(deviation: jnp.ndarray, valid: jnp.ndarray,
                           beta: float) -> jnp.ndarray:
  """``s_var`` scaled to mean 1 over a step's valid updates.

  With heterogeneous clients every ``d_i`` is large, and an absolute
  ``1/(1+beta*d)`` shrinks every step to nothing (measured: no learning at
  all on MNIST under the ``damped`` normalization); scaled, it only moves
  weight from outliers towards the consensus. Invalid entries are ignored.
  """
  s = variance_weight(deviation, beta)
  n_valid = jnp.maximum(jnp.sum(valid), 1)
  mean = jnp.sum(jnp.where(valid, s, 0.0)) / n_valid
  return s / jnp.maximum(mean, 1e-12)
