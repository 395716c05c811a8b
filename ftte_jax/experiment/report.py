"""What a run reports: counter rows, the end-of-run summary, the params hash."""

from __future__ import annotations

import jax
import numpy as np

from ftte_jax.checkpointing import params_sha256  # re-exported: the run's hash.
from ftte_jax.core import engine
from ftte_jax.core import exact
from ftte_jax.core import privacy
from ftte_jax.core.typing import PyTree


def counters_row(state: engine.SimState) -> dict:
  """Host-side cumulative counters as plain Python numbers.

  ``bytes_up``/``bytes_down`` are everything communicated (tasks and probe
  rounds); the per-update figures count task traffic only. Mean staleness
  is given over applied updates (``mean_staleness``, also
  ``mean_staleness_applied``) and over every arrived update
  (``mean_staleness_arrivals``, which includes over-stale ones).
  ``energy_j`` is the energy charged to devices for the tasks that have
  arrived (or timed out); ``devices_depleted`` counts batteries run out.
  """
  cnt = jax.device_get(state.counters)
  applied = int(cnt.updates_applied)
  uploads, downloads = int(cnt.uploads), int(cnt.downloads)
  up, down = exact.value(cnt.bytes_up), exact.value(cnt.bytes_down)
  probe_up = exact.value(cnt.probe_bytes_up)
  probe_down = exact.value(cnt.probe_bytes_down)
  mean_applied = exact.value(cnt.staleness_sum) / max(applied, 1)
  return {
      "round": int(state.version),
      "virtual_time_s": float(state.clock),
      "updates_applied": applied,
      "updates_dropped": int(cnt.updates_dropped),
      "updates_stale": int(cnt.updates_stale),
      "updates_nonfinite": int(cnt.updates_nonfinite),
      "steps_refused": int(cnt.steps_refused),
      "updates_clipped": int(cnt.updates_clipped),
      "values_trimmed": exact.value(cnt.values_trimmed),
      "values_robust": exact.value(cnt.values_robust),
      "mean_staleness": mean_applied,
      "mean_staleness_applied": mean_applied,
      "mean_staleness_arrivals": (exact.value(cnt.staleness_sum_arrivals) /
                                  max(uploads, 1)),
      "staleness_hist": [int(v) for v in cnt.staleness_hist],
      "bytes_up": up + probe_up,
      "bytes_down": down + probe_down,
      "probe_bytes_up": probe_up,
      "probe_bytes_down": probe_down,
      "upload_bytes_per_update": up / max(uploads, 1),
      "download_bytes_per_update": down / max(downloads, 1),
      "energy_j": exact.value(cnt.energy_j),
      "devices_depleted": int(np.isfinite(np.asarray(
          state.client_depleted_at)).sum()),
  }


def time_to_target(history: list[dict], target: float | None
                   ) -> tuple[dict | None, dict | None]:
  """The rows where ``target`` is first reached, and where it is held.

  Rows include the exact crossing steps (``Experiment.run`` evaluates every
  step until the target is reached again), so the first is exact whatever
  ``eval_every``. The second is the sustained variant: the first row after
  which every later row stays at or above the target.

  Returns:
    ``(first, sustained)``; None where never.
  """
  if target is None:
    return None, None
  first = next((r for r in history if r["test_accuracy"] >= target), None)
  sustained = None
  for r in history:
    if r["test_accuracy"] < target:
      sustained = None
    elif sustained is None:
      sustained = r
  return first, sustained


def summary(config, setup, env, info: dict, state: engine.SimState,
            history: list[dict], timing: dict) -> dict:
  """The end-of-run summary (written to summary.json by the launcher)."""
  reached, held = time_to_target(history, config.target_accuracy)
  counters = counters_row(state)
  tier_mem = np.asarray(state.plan.memory_bytes, np.float64)
  # A tier's untrained weights: the model less what it uploads (its mask).
  tier_flash = (float(state.plan.model_bytes) - np.asarray(
      state.plan.upload_bytes, np.float64)) * (config.frozen_weights == "flash")
  used = np.unique(np.asarray(state.plan.client_tier)[np.asarray(
      env.eligible)])
  out = {
      "algorithm": config.engine.algorithm,
      "final_accuracy": history[-1]["test_accuracy"],
      "final_loss": history[-1]["test_loss"],
      "best_accuracy": max(r["test_accuracy"] for r in history),
      "target_accuracy": config.target_accuracy,
      "time_to_target_s": reached["virtual_time_s"] if reached else None,
      "rounds_to_target": reached["round"] if reached else None,
      "time_to_target_sustained_s": held["virtual_time_s"] if held else None,
      "rounds_to_target_sustained": held["round"] if held else None,
      "stopped_by": timing.get("stopped_by", "rounds"),
      "max_virtual_time": config.max_virtual_time,
      "rounds": counters["round"],
      "virtual_time_s": counters["virtual_time_s"],
      "client_updates": counters["updates_applied"],
      "client_updates_per_s": (timing["steps"] * config.engine.buffer_size /
                               max(timing["wall_s"] - timing["compile_s"],
                                   1e-9)),
      "wall_s": timing["wall_s"],
      "compile_s": timing["compile_s"],
      "peak_device_memory_bytes": float(np.nanmax(tier_mem[used])),
      "tier_memory_bytes": [float(m) for m in tier_mem],
      # RAM above; frozen weights read from flash (frozen_weights='flash'):
      "frozen_weights": config.frozen_weights,
      "peak_device_flash_bytes": float(np.max(tier_flash[used])),
      "tier_flash_bytes": [float(f) for f in tier_flash],
      # Micro-batches per tier (the search's joint choice; 1 without one).
      "tier_micro_batches": [t.get("micro_batches", 1) for t in
                             info["plan"].get("tiers", [])] or [1],
      "init": info["init"],
      "full_model_memory_bytes": info["full_model_memory_bytes"],
      "eligible_clients": int(np.asarray(env.eligible).sum()),
      "probe": setup.probe.to_dict(),
      "params_sha256": params_sha256(state.params),
  }
  for k in ("upload_bytes_per_update", "download_bytes_per_update",
            "bytes_up", "bytes_down", "probe_bytes_up", "probe_bytes_down",
            "mean_staleness", "mean_staleness_applied",
            "mean_staleness_arrivals", "staleness_hist",
            "updates_dropped", "updates_stale", "updates_nonfinite",
            "steps_refused", "updates_clipped", "values_trimmed",
            "values_robust"):
    out[k] = counters[k]
  out.update(_defences(config, env, state),
             **energy(env, state, reached, held),
             tier_fairness=tier_fairness(env, state, history),
             **{k: v for k, v in history[-1].items()
                if k.startswith("personal_")})
  return out


def tier_fairness(env, state: engine.SimState, history: list[dict]
                  ) -> list[dict]:
  """Per memory tier (``Fleet.tier``): devices, eligible devices, the share
  of applied updates it contributed, their mean staleness and, with a
  per-device evaluation, its devices' mean accuracies (last evaluation)."""
  tier = np.asarray(env.fleet.tier)
  applied = np.asarray(state.client_applied, np.int64)
  ages = np.asarray(state.client_staleness, np.int64)
  eligible = np.asarray(env.eligible)
  total = max(int(applied.sum()), 1)
  personal = {r["tier"]: r for r in history[-1].get("personal_tiers", [])}
  rows = []
  for t in np.unique(tier):
    on = tier == t
    n = int(applied[on].sum())
    row = {"tier": int(t), "devices": int(on.sum()),
           "eligible_devices": int(eligible[on].sum()),
           "update_share": n / total, "device_share": float(on.mean()),
           "mean_staleness": float(ages[on].sum()) / n if n else None}
    for kind in ("global", "tuned", "mixed"):
      if int(t) in personal:
        row[f"personal_{kind}"] = personal[int(t)][kind]
    rows.append(row)
  return rows


def energy(env, state: engine.SimState, reached: dict | None,
           held: dict | None) -> dict:
  """Energy totals, per fleet tier, to the target, and battery departures.

  ``energy_to_target_j`` is the total at the row where the target was first
  reached (None if never, or a row logged before energy was counted).
  """
  spent = np.asarray(state.client_energy, np.float64)
  tier = np.asarray(env.fleet.tier)
  depleted = np.asarray(state.client_depleted_at, np.float64)
  at = lambda row: None if row is None else row.get("energy_j")
  return {
      "energy_j": exact.value(state.counters.energy_j),
      "tier_energy_j": np.bincount(tier, spent,
                                   int(tier.max()) + 1).tolist(),
      "energy_to_target_j": at(reached),
      "energy_to_target_sustained_j": at(held),
      "batteries": env.fleet.battery_j is not None,
      "devices_depleted": int(np.isfinite(depleted).sum()),
      "depletion_times_s": np.sort(depleted[np.isfinite(depleted)]).tolist(),
  }


def _defences(config, env, state: engine.SimState) -> dict:
  """Attackers, and the privacy spent when DP noise is on."""
  fleet, eng = env.fleet, config.engine
  out = {"malicious_clients": (0 if fleet.malicious is None else
                               int(np.asarray(fleet.malicious).sum())),
         "malicious_behavior": (None if fleet.attack is None else
                                fleet.attack.behavior)}
  applied = np.asarray(state.client_applied)
  if fleet.malicious is not None:
    out["malicious_updates_applied"] = int(
        applied[np.asarray(fleet.malicious)].sum())
  if eng.dp_noise_multiplier > 0:
    out.update(privacy.report(
        eng.dp_noise_multiplier, eng.dp_delta, int(applied.max()),
        int(state.version), eng.buffer_size, applied.shape[0]))
  return out
