"""Client-level differential privacy: Gaussian noise on the sum, and epsilon.

DP-FedAvg (McMahan et al. 2018), with the conventions of Flower's and
Opacus's server-side fixed clipping: every update is clipped to L2 norm
``S`` (``clip='fixed'``, ``clip_norm``), weighted by at most 1, summed, and
the sum gets ``N(0, (z S)^2)`` noise on every coordinate some valid update of
the step could change; the noisy sum is then normalized as usual, so with the
``buffer`` normalization the mean carries noise of std ``z S / n``. Adding or
removing one client moves the weighted sum by at most ``S``, so each step is
a Gaussian mechanism with noise multiplier ``z``.

Epsilon comes from Google's ``dp-accounting`` (the optional ``dp`` extra),
in two forms (docs/design.md, "Client-level differential privacy"):

* ``epsilon``: no amplification. The fleet's schedule (who arrives when) does
  not depend on the data, so a client's data enters exactly the steps its
  updates were applied in; composing ``z`` that many times for the client
  who took part most is a bound that holds for asynchronous buffers.
* ``epsilon_poisson``: what DP-FedAvg papers report, assuming each step
  samples clients by Poisson sampling with rate ``q = K / N``. An
  asynchronous buffer does not sample that way (fast devices arrive more
  often), so this figure is an optimistic reference, not a guarantee.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ftte_jax.core import aggregation
from ftte_jax.core.typing import PyTree


def noise_std(noise_multiplier: float, clip_norm: float) -> float:
  """Std of the Gaussian noise added to the weighted sum: ``z * S``."""
  return float(noise_multiplier) * float(clip_norm)


def coverage(tier_masks: PyTree, tier: jnp.ndarray,
             valid: jnp.ndarray) -> PyTree:
  """Leaves like one delta, 1 where some valid update's mask trains."""
  num_tiers = jax.tree.leaves(tier_masks)[0].shape[0]
  present = aggregation.tier_weights(valid.astype(jnp.float32), tier,
                                     num_tiers) > 0
  return jax.tree.map(
      lambda m: (jnp.tensordot(present.astype(jnp.float32), m, axes=1) > 0
                 ).astype(jnp.float32), tier_masks)


def gaussian_noise(key: jax.Array, cover: PyTree, std: float) -> PyTree:
  """``N(0, std^2)`` on the covered coordinates, 0 elsewhere."""
  leaves, treedef = jax.tree.flatten(cover)
  keys = jax.random.split(key, len(leaves))
  return treedef.unflatten([
      std * jax.random.normal(k, c.shape, jnp.float32) * c
      for k, c in zip(keys, leaves)])


def _accountant():
  try:
    import dp_accounting  # pylint: disable=import-outside-toplevel
    from dp_accounting import rdp  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ImportError(
        "epsilon needs Google's dp-accounting: pip install 'ftte_jax[dp]' "
        "(or pip install dp-accounting)") from e
  return dp_accounting, rdp.RdpAccountant()


def epsilon(noise_multiplier: float, compositions: int, delta: float,
            sampling_rate: float = 1.0) -> float:
  """Epsilon at ``delta`` of ``compositions`` Gaussian mechanisms (RDP).

  Args:
    noise_multiplier: z > 0.
    compositions: how many times the mechanism ran on a client's data.
    delta: target delta in (0, 1).
    sampling_rate: q in (0, 1]; below 1, each run is Poisson-subsampled.
  """
  if not noise_multiplier > 0:
    raise ValueError(f"noise_multiplier must be > 0, got {noise_multiplier}")
  if not 0 < delta < 1:
    raise ValueError(f"delta must be in (0, 1), got {delta}")
  if compositions <= 0:
    return 0.0
  dp, acc = _accountant()
  event = dp.GaussianDpEvent(noise_multiplier)
  if sampling_rate < 1:
    event = dp.PoissonSampledDpEvent(sampling_rate, event)
  acc.compose(dp.SelfComposedDpEvent(event, int(compositions)))
  return float(acc.get_epsilon(delta))


def report(noise_multiplier: float, delta: float, max_participations: int,
           steps: int, buffer_size: int, num_clients: int) -> dict:
  """The privacy spent by a run, for its summary.

  Args:
    noise_multiplier, delta: the run's ``dp_noise_multiplier``, ``dp_delta``.
    max_participations: most updates applied from any one client.
    steps: server steps taken.
    buffer_size: K.
    num_clients: N.
  """
  out = {"dp_noise_multiplier": noise_multiplier, "dp_delta": delta,
         "dp_max_participations": int(max_participations),
         "dp_epsilon": None, "dp_epsilon_poisson": None}
  try:
    out["dp_epsilon"] = epsilon(noise_multiplier, max_participations, delta)
    out["dp_epsilon_poisson"] = epsilon(
        noise_multiplier, steps, delta, min(1.0, buffer_size / num_clients))
  except ImportError as e:
    out["dp_accounting"] = str(e)
  return out
