"""Malicious devices: which ones, and what they do to the update they send.

A fleet option (``FleetConfig.malicious_fraction`` and
``malicious_behavior``) marks a fixed random share of the devices as
malicious for the whole run. Each of them trains as usual and then sends,
within its own mask:

* ``sign_flip``: ``-d`` (the update reversed);
* ``scale``: ``malicious_scale * d`` (x100 by default: a boosted update);
* ``noise``: ``N(0, malicious_noise_std^2)`` on every trained coordinate,
  instead of ``d`` (the Gaussian attack);
* ``nan``: NaN on every trained coordinate (a broken device);
* ``stale_replay``: an update trained from the oldest version the server
  still stores, sent as if it were computed on the version it pulled (an
  old update replayed under a fresh version number, so the age weight does
  not see it).

The engine applies ``corrupt`` inside each client's update, so every
batching path (vmap, map, stream) and every algorithm sees the same attack.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from ftte_jax.core.typing import PyTree

BEHAVIORS = ("sign_flip", "scale", "noise", "nan", "stale_replay")


@dataclasses.dataclass(frozen=True)
class Attack:
  """What the malicious devices do (static: part of the compiled step)."""

  behavior: str
  scale: float = 100.0
  noise_std: float = 1.0

  def __post_init__(self):
    if self.behavior not in BEHAVIORS:
      raise ValueError(f"malicious_behavior must be one of {BEHAVIORS}, got "
                       f"{self.behavior!r}")


def draw(fraction: float, num_clients: int, seed: int) -> np.ndarray:
  """[N] bool: ``round(fraction * N)`` devices, chosen by ``seed``.

  Drawn from its own stream, so adding attackers changes no other draw of
  the fleet.
  """
  rng = np.random.default_rng([seed, 0x6D616C])
  out = np.zeros(num_clients, bool)
  out[rng.permutation(num_clients)[:int(round(fraction * num_clients))]] = True
  return out


def corrupt(attack: Attack, delta: PyTree, mask: PyTree, key: jax.Array,
            bad: jnp.ndarray) -> PyTree:
  """The update a device sends: ``delta`` if honest, else attacked.

  Args:
    attack: the behaviour.
    delta: the honest update (zero off ``mask``).
    mask: the device's mask (leaves like ``delta``, 0/1).
    key: the device's key for this task (``noise`` only).
    bad: [] bool, whether the device is malicious.
  """
  b = attack.behavior
  if b == "stale_replay":  # The replay happens in the pulled version.
    return delta
  if b == "sign_flip":
    out = jax.tree.map(jnp.negative, delta)
  elif b == "scale":
    out = jax.tree.map(lambda d: attack.scale * d, delta)
  elif b == "nan":
    out = jax.tree.map(lambda d, m: jnp.where(m > 0, jnp.nan, d), delta, mask)
  else:
    leaves, treedef = jax.tree.flatten(delta)
    keys = jax.random.split(jax.random.fold_in(key, 0x6E6F), len(leaves))
    out = treedef.unflatten([
        attack.noise_std * jax.random.normal(k, d.shape, d.dtype) * m
        for k, d, m in zip(keys, leaves, treedef.flatten_up_to(mask))])
  return jax.tree.map(lambda o, d: jnp.where(bad, o, d), out, delta)


def oldest_slot(ring_version: jnp.ndarray) -> jnp.ndarray:
  """The ring slot holding the oldest stored version (a replay's base)."""
  held = jnp.where(ring_version >= 0, ring_version,
                   jnp.iinfo(jnp.int32).max)
  return jnp.argmin(held).astype(jnp.int32)
