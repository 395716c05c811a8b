"""Figures over seeds: means with 95% Student-t intervals, paired contrasts
between algorithms, and accuracy curves with bands.

Shared by ``experiments.compare``, ``experiments.scaling_devices`` and
``experiments.regime_map``. Input: per seed, per algorithm, the run's
``summary.json`` (and its ``metrics.jsonl`` rows for curves). The interval
arithmetic is ``ftte_jax.experiment.stats``.

A time to target that some seed never reached is not averaged over the
seeds that did without saying so: its entry carries ``reached`` and
``seeds`` (``stats.censored``), and a paired contrast (``1 - t/t_ref``)
is taken over the seeds where both runs reached it, with the count.
"""

from __future__ import annotations

import math
from typing import Callable, Mapping

import numpy as np

from ftte_jax.experiment import stats

# Summary fields summarized over seeds; True: time-to-event (may be None),
# with the field bounding it from below when it is.
METRICS = {
    "final_accuracy": None,
    "best_accuracy": None,
    "time_to_target_s": "virtual_time_s",
    "time_to_target_sustained_s": "virtual_time_s",
    "peak_device_memory_bytes": None,
    "upload_bytes_per_update": None,
    "download_bytes_per_update": None,
    "energy_j": None,
    "energy_to_target_j": "energy_j",
    "mean_staleness": None,
    "virtual_time_s": None,
    "eligible_clients": None,
}

PerSeed = Mapping[int, Mapping[str, dict]]  # seed -> algorithm -> summary.


def summarize(per_seed: PerSeed, algorithm: str) -> dict:
  """Every ``METRICS`` field of one algorithm over the seeds that ran it."""
  runs = [s[algorithm] for s in per_seed.values() if algorithm in s]
  out = {"seeds": len(runs)}
  for field, bound in METRICS.items():
    if bound is None:
      vals = [r.get(field) for r in runs]
      vals = [v for v in vals if isinstance(v, (int, float))]
      out[field] = stats.mean_ci(vals) if vals else None
    else:
      out[field] = stats.censored([r.get(field) for r in runs],
                                  [r.get(bound) for r in runs])
  return out


def paired(per_seed: PerSeed, algorithm: str, reference: str,
           fn: Callable[[dict, dict], float | None]) -> dict:
  """``fn(run, reference run)`` per seed where both ran, summarized.

  Returns ``stats.mean_ci`` over the seeds where ``fn`` gave a number,
  plus ``seeds`` (both ran) and ``defined`` (``fn`` gave a number).
  """
  vals, both = [], 0
  for runs in per_seed.values():
    if algorithm in runs and reference in runs:
      both += 1
      v = fn(runs[algorithm], runs[reference])
      if v is not None and math.isfinite(v):
        vals.append(float(v))
  out = stats.mean_ci(vals)
  out.update(seeds=both, defined=len(vals))
  return out


def reduction(field: str = "time_to_target_s"):
  """``1 - t / t_ref`` of ``field``; None unless both reached it."""
  def fn(run, ref):
    t, r = run.get(field), ref.get(field)
    return 1.0 - t / r if t is not None and r else None
  return fn


def ratio(field: str):
  """``run[field] / ref[field]``."""
  def fn(run, ref):
    a, b = run.get(field), ref.get(field)
    return a / b if isinstance(a, (int, float)) and b else None
  return fn


def difference(field: str):
  """``run[field] - ref[field]``."""
  def fn(run, ref):
    a, b = run.get(field), ref.get(field)
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
      return a - b
    return None
  return fn


def log_time_ratio(run: dict, ref: dict) -> float | None:
  """``log(t / t_ref)`` of time to target; None unless both reached it."""
  t, r = run.get("time_to_target_s"), ref.get("time_to_target_s")
  return math.log(t / r) if t and r else None


def contrasts(per_seed: PerSeed, algorithms, baseline: str = "fedavg",
              peer: str = "fedbuff") -> dict:
  """The paired figures every study reports, by algorithm: time-to-target
  reduction (and sustained) against ``baseline``, memory and upload ratios
  to it, and final accuracy minus ``peer``'s."""
  out = {}
  for alg in algorithms:
    row = {}
    if alg != baseline:
      row["reduction_vs_" + baseline] = paired(per_seed, alg, baseline,
                                               reduction())
      row["sustained_reduction_vs_" + baseline] = paired(
          per_seed, alg, baseline, reduction("time_to_target_sustained_s"))
      row["memory_ratio_vs_" + baseline] = paired(
          per_seed, alg, baseline, ratio("peak_device_memory_bytes"))
      row["upload_ratio_vs_" + baseline] = paired(
          per_seed, alg, baseline, ratio("upload_bytes_per_update"))
      row["energy_ratio_vs_" + baseline] = paired(per_seed, alg, baseline,
                                                  ratio("energy_j"))
    if alg != peer:
      row["accuracy_minus_" + peer] = paired(per_seed, alg, peer,
                                             difference("final_accuracy"))
      row["log_time_ratio_vs_" + peer] = paired(per_seed, alg, peer,
                                                log_time_ratio)
    out[alg] = row
  return out


def band(curves: list[list[dict]], x: str = "virtual_time_s",
         y: str = "test_accuracy", points: int = 200):
  """Mean and 95% band of ``y`` over seeds on a common ``x`` grid.

  Each seed's curve is read as a step function (the last evaluation at or
  before ``x``) up to the shortest seed's end, so every grid point has
  every seed.

  Returns:
    ``(grid, mean, low, high)`` numpy arrays (empty without curves).
  """
  curves = [c for c in curves if c]
  if not curves:
    return (np.zeros(0),) * 4
  end = min(c[-1][x] for c in curves)
  grid = np.linspace(0.0, end, points)
  ys = []
  for c in curves:
    xs = np.asarray([r[x] for r in c], np.float64)
    vs = np.asarray([r[y] for r in c], np.float64)
    idx = np.clip(np.searchsorted(xs, grid, side="right") - 1, 0, None)
    ys.append(vs[idx])
  ys = np.asarray(ys)
  mean = ys.mean(0)
  if len(curves) > 1:
    hw = (stats.t_quantile(0.975, len(curves) - 1) * ys.std(0, ddof=1) /
          math.sqrt(len(curves)))
  else:
    hw = np.zeros_like(mean)
  return grid, mean, mean - hw, mean + hw


# The one formatter of a summarized figure (mean ± half width, k/n seeds).
fmt = stats.fmt
