"""Per-device evaluation: the global model on each device's own held-out
slice, as it is and personalized, for thousands of devices in one jit.

Each evaluated device ``i`` (``clients``) gets three accuracies on its own
held-out examples (``holdout``, laid out by client like the training data):

* ``global``: the global model as it is;
* ``tuned``: after ``steps`` local fine-tuning steps on the device's own
  training data, from the global model, within the device's own mask (the
  subset its memory budget allows): the engine's client update;
* ``mixed``: ``mix * tuned + (1 - mix) * global``, the interpolation of
  local and global models (APFL-style, Deng et al. 2020; ``mix`` fixed).

Devices run ``chunk`` at a time, vmapped, inside one ``lax.map``, so the
whole fleet is a single jitted call whose memory grows with ``chunk``, not
with the number of devices.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from ftte_jax.core.client import LocalData
from ftte_jax.data.client_data import ClientData

KINDS = ("global", "tuned", "mixed")


@struct.dataclass
class PersonalScores:
  """Accuracies of the evaluated devices, in ``clients`` order."""

  clients: jnp.ndarray  # [S] int32 devices evaluated.
  accuracy: jnp.ndarray  # [3, S] float32: global, tuned, mixed.


def sample_clients(num_clients: int, size: int, seed: int) -> np.ndarray:
  """The fixed devices to evaluate: all (``size`` 0) or a seeded sample."""
  if size == 0 or size >= num_clients:
    return np.arange(num_clients, dtype=np.int32)
  rng = np.random.default_rng([seed, 0x706572])
  return np.sort(rng.choice(num_clients, size, replace=False)).astype(np.int32)


def make_personal_eval(metrics_fn: Callable, client_update: Callable,
                       steps: int, mix: float, max_holdout: int,
                       chunk: int = 64) -> Callable:
  """Builds ``evaluate(key, params, masks, client_tier, data, holdout,
  clients) -> PersonalScores``.

  Args:
    metrics_fn: the run's evaluation metrics (``losses``); its "accuracy"
      is reported.
    client_update: a ``client.ClientUpdate`` whose loop is at least
      ``steps`` long (``client.sgd``).
    steps: fine-tuning steps (0: ``tuned`` and ``mixed`` equal ``global``).
    mix: weight of the fine-tuned model in ``mixed``.
    max_holdout: static size every device's held-out slice is padded to
      (the largest slice among the evaluated devices).
    chunk: devices vmapped together per iteration.
  """

  def accuracy(params, batch):
    hits, n = metrics_fn(params, batch)["accuracy"]
    return hits / jnp.maximum(n, 1)

  def one(key, params, masks, tier, data, holdout, client):
    n = holdout.counts[client]
    pos = jnp.arange(max_holdout)
    batch = LocalData(source=holdout, offset=holdout.offsets[client],
                      count=n, num_steps=n).batch(jnp.minimum(pos, n - 1))
    batch["weight"] = (pos < n).astype(jnp.float32)
    g = accuracy(params, batch)
    if steps == 0:
      return jnp.stack([g, g, g])
    mask = jax.tree.map(lambda m: m[tier], masks)
    local = LocalData(source=data, offset=data.offsets[client],
                      count=data.counts[client],
                      num_steps=jnp.asarray(steps, jnp.int32))
    tuned = client_update(key, params, mask, local, None).params
    mixed = jax.tree.map(lambda t, p: mix * t + (1.0 - mix) * p, tuned,
                         params)
    return jnp.stack([g, accuracy(tuned, batch), accuracy(mixed, batch)])

  def evaluate(key, params, masks, client_tier, data: ClientData,
               holdout: ClientData, clients: jnp.ndarray) -> PersonalScores:
    keys = jax.vmap(jax.random.fold_in, (None, 0))(key, clients)
    per = lambda a: one(a[0], params, masks, client_tier[a[1]], data,
                        holdout, a[1])
    acc = jax.lax.map(per, (keys, clients),
                      batch_size=min(chunk, clients.shape[0]))
    return PersonalScores(clients=clients, accuracy=acc.T)

  return evaluate


def summarize(scores: PersonalScores, tier: np.ndarray) -> dict:
  """Host-side: mean, 10th percentile and worst tier of each kind.

  Args:
    scores: from ``evaluate``.
    tier: [N] memory tier of every device (``Fleet.tier``).

  Returns:
    ``personal_<kind>_mean``, ``_p10``, ``_worst_tier`` (the tier with the
    lowest mean) and ``_worst_tier_mean``, and ``personal_tiers``: per tier,
    its device count and the mean of each kind.
  """
  acc = np.asarray(jax.device_get(scores.accuracy), np.float64)
  t = np.asarray(tier)[np.asarray(scores.clients)]
  tiers = np.unique(t)
  out = {"personal_devices": int(acc.shape[1])}
  per_tier = {int(k): {"devices": int((t == k).sum())} for k in tiers}
  for j, kind in enumerate(KINDS):
    a = acc[j]
    means = {int(k): float(a[t == k].mean()) for k in tiers}
    worst = min(means, key=means.get)
    out.update({f"personal_{kind}_mean": float(a.mean()),
                f"personal_{kind}_p10": float(np.percentile(a, 10)),
                f"personal_{kind}_worst_tier": worst,
                f"personal_{kind}_worst_tier_mean": means[worst]})
    for k in tiers:
      per_tier[int(k)][kind] = means[int(k)]
  out["personal_tiers"] = [{"tier": k, **v} for k, v in
                           sorted(per_tier.items())]
  return out
