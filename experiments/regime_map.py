r"""Where does FTTE win? FTTE, FedBuff and FedAvg over a grid of fleets.

  python -m experiments.regime_map --out_dir=runs/regime-map --parallel=2
  python -m experiments.regime_map --mcu_fractions=0.6 --straggler_fractions=0.9 \
      --links=wifi --correlations=0 --seeds=0 --rounds=20   # one small cell

The grid crosses four things the paper's claims depend on:

* ``--mcu_fractions``: the share of memory-constrained devices. The fleet
  is a device-class profile (``ftte_jax.core.profiles``): that share of
  microcontrollers (256-512 KB of SRAM, 0.1-0.4 GFLOP/s, BLE), the rest
  low-end and high-end phones in equal parts. With absolute memory, a
  microcontroller cannot train the model's full training memory (the MLP's
  1.9 MB) and every phone can, so FedAvg and FedBuff, run as they would
  really run (``memory_policy=exclude``), lose exactly the microcontrollers;
  FTTE's subset fits the smallest microcontroller and keeps every device.
* ``--straggler_fractions``: a share of devices, of every class, whose
  compute is 10x slower (busy, throttled) on top of its class's speed.
* ``--links``: the phones' link (``phone_link``): Wi-Fi, LTE or 3G; the
  microcontrollers always use BLE.
* ``--correlations``: how much the data depends on the device class
  (``partition=device_dirichlet``, ``device_correlation``): at 1 a label
  lives only on its home class, so leaving a class out loses its labels.

Every cell runs the three algorithms on the same seeds (``--seeds``, the
paper-like cell ``--paper_seeds``; ``--paper_algorithms`` adds ``ftte_time``,
FTTE with the time-aware search, there), each applying the same 3,000
client updates from the same pretrained MLP on the real MNIST split (500
devices, C = 100 tasks in flight, K = 10). Every config flag of
``launch.main`` sets the shared setup; the defaults below are this study's.

Runs live in ``<out_dir>/<cell>-<hash of the setup>/seed<s>/<algorithm>``:
a run with a ``summary.json`` is not run again, so an interrupted map
resumes, and a wider grid reuses the cells it shares. After every cell the
report is rewritten from what has finished (``<results>.{json,md,png}``,
default ``experiments/results/regime_map``): per cell, FTTE's
time-to-target reduction against FedAvg, its final accuracy against
FedBuff's, each with a 95% interval over seeds, the outcome against FedBuff
(win, lose, trade-off, tie), the measurements that explain it, the
paper-like cell's full table and the paper's claims 1-3 there
(``experiments.claims``).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import sys

from absl import flags
from absl import logging

from launch import flags as flags_lib
from launch import sweep

FLAGS = flags.FLAGS
ALGORITHMS = ("ftte", "fedbuff", "fedavg")
AXES = ("mcu_fraction", "straggler_fraction", "phone_link",
        "device_correlation")
# The cell closest to the paper's description: 500 devices, 90%
# stragglers, a memory-constrained majority; its partition (Dirichlet label
# skew independent of the device) is the paper's as we read it.
PAPER_CELL = {"mcu_fraction": 0.6, "straggler_fraction": 0.9,
              "phone_link": "wifi", "device_correlation": 0.0}
STUDY = (
    "--dataset=mnist", "--model=mlp", "--num_clients=500",
    "--partition=device_dirichlet", "--dirichlet_alpha=0.3",
    "--straggler_slowdown=10", "--task_sigma=0.2", "--concurrency=100",
    "--buffer_size=10", "--local_steps=5", "--batch_size=32",
    "--client_lr=0.05", "--memory_policy=exclude", "--rounds=300",
    "--eval_every=10", "--target_accuracy=0.87", "--first_download=deployed",
    # A microcontroller's task on BLE spans a hundred or more server steps
    # when phones are fast; the presets' ring (4 C/K = 40 versions) would
    # drop those updates as too stale, a limit of our engine, not of the
    # algorithms (their age weights already shrink old updates).
    "--ring_size=256")


def _define() -> None:
  flags_lib.define_config_flags()
  flags.DEFINE_list("mcu_fractions", ["0.2", "0.6"],
                    "shares of microcontrollers (memory-constrained)")
  flags.DEFINE_list("straggler_fractions", ["0", "0.9"],
                    "shares of 10x-slower devices")
  flags.DEFINE_list("links", ["wifi", "3g"], "phone links (phone_link)")
  flags.DEFINE_list("correlations", ["0", "0.5", "1"],
                    "data-device correlations (device_correlation)")
  flags.DEFINE_list("seeds", ["0", "1", "2"], "seeds of every cell")
  flags.DEFINE_list("paper_seeds", ["0", "1", "2", "3", "4"],
                    "seeds of the paper-like cell")
  flags.DEFINE_list("algorithms", list(ALGORITHMS), "algorithms of a cell")
  flags.DEFINE_list("paper_algorithms", [*ALGORITHMS, "ftte_time"],
                    "algorithms of the paper-like cell")
  flags.DEFINE_integer("parallel", 2, "runs at once", lower_bound=1)
  flags.DEFINE_string("out_dir", "runs/regime-map", "parent of the runs")
  flags.DEFINE_string("results", "experiments/results/regime_map",
                      "stem of the report (.json, .md, .png)")
  flags.DEFINE_bool("report_only", False, "write the report from the runs "
                    "that finished, run nothing")
  flags_lib.define_checkpoint_flags()
  # One checkpoint a run, every 100 steps: a run's state holds its ring
  # (256 versions), and a finished run's checkpoints are deleted.
  FLAGS.set_default("keep_checkpoints", 1)
  FLAGS.set_default("checkpoint_every", 100)


def mix(mcu_fraction: float) -> str:
  """The fleet profile: microcontrollers, the rest phones half and half."""
  phones = (1.0 - mcu_fraction) / 2
  parts = [("mcu", mcu_fraction), ("phone_low", phones),
           ("phone_high", phones)]
  return ",".join(f"{n}:{round(p, 10):g}" for n, p in parts if p > 0)


def cells(fv) -> list[dict]:
  """The grid, the paper-like cell first."""
  grid = [dict(zip(AXES, v)) for v in itertools.product(
      [float(x) for x in fv.mcu_fractions],
      [float(x) for x in fv.straggler_fractions], list(fv.links),
      [float(x) for x in fv.correlations])]
  grid.sort(key=lambda c: c != PAPER_CELL)
  return grid


def is_paper(cell: dict) -> bool:
  return cell == PAPER_CELL


def cell_flags(cell: dict) -> list[str]:
  return [f"--fleet_profile={mix(cell['mcu_fraction'])}",
          f"--straggler_fraction={cell['straggler_fraction']:g}",
          f"--phone_link={cell['phone_link']}",
          f"--device_correlation={cell['device_correlation']:g}"]


def cell_name(cell: dict) -> str:
  return (f"mcu{cell['mcu_fraction']:g}_strag{cell['straggler_fraction']:g}"
          f"_{cell['phone_link']}_rho{cell['device_correlation']:g}")


def shared_args(given: list[str]) -> list[str]:
  """The study's setup with the given flags winning."""
  own = {a.split("=", 1)[0] for a in given}
  return [a for a in STUDY if a.split("=", 1)[0] not in own] + [
      a for a in given if not a.startswith("--seed=")]


def cell_jobs(cell: dict, base: list[str], seeds: list[int],
              algorithms: list[str], out_dir: str) -> list[sweep.Job]:
  """One job per (seed, algorithm), validated, in a directory named by the
  cell and a hash of its arguments (the cache key)."""
  from experiments import compare  # pylint: disable=g-import-not-at-top
  args = base + cell_flags(cell)
  key = hashlib.sha256(json.dumps(args).encode()).hexdigest()[:8]
  root = os.path.abspath(os.path.join(out_dir, f"{cell_name(cell)}-{key}"))
  jobs = []
  for seed in seeds:
    try:
      per_alg = compare.algorithm_args(args + [f"--seed={seed}"], algorithms,
                                       [])
    except ValueError as e:
      raise ValueError(f"cell {cell_name(cell)}: {flags_lib.one_line(e)}"
                       ) from None
    for alg, a in per_alg.items():
      jobs.append(sweep.Job(f"{cell_name(cell)}/seed{seed}/{alg}",
                            {"algorithm": alg, "seed": seed}, a,
                            workdir=os.path.join(root, f"seed{seed}", alg)))
  return jobs


def read_runs(jobs: list[sweep.Job]) -> dict[int, dict[str, dict]]:
  """seed -> algorithm -> summary (plus the run's start accuracy, step
  time and memory policy) of the jobs that finished."""
  out = {}
  for job in jobs:
    s = sweep.read_summary(job.workdir)
    # A summary whose run stopped with no update or diverged is no result.
    if sweep.run_status(0, s) != "ok":
      continue
    with open(os.path.join(job.workdir, "metrics.jsonl")) as f:
      first = json.loads(f.readline())
    s["start_accuracy"] = first.get("test_accuracy")
    s["step_time_s"] = s["virtual_time_s"] / max(s["rounds"], 1)
    s["memory_policy"] = next(
        (a.split("=", 1)[1] for a in job.args
         if a.startswith("--memory_policy=")), "exclude")
    out.setdefault(job.values["seed"], {})[job.values["algorithm"]] = s
  return out


def _mean(values):
  values = [v for v in values if isinstance(v, (int, float))]
  return sum(values) / len(values) if values else None


def explain(runs: dict) -> dict:
  """The measurements behind a cell's outcome, per algorithm (means over
  seeds): a server step's virtual time, devices that take part, the
  weakest class's (tier 0) share of the applied updates and their
  staleness, and the accuracy change from the pretrained start."""
  out = {}
  algs = sorted({a for r in runs.values() for a in r})
  for alg in algs:
    rs = [r[alg] for r in runs.values() if alg in r]
    tier0 = [next((t for t in r["tier_fairness"] if t["tier"] == 0), {})
             for r in rs]
    out[alg] = {
        "step_time_s": _mean([r["step_time_s"] for r in rs]),
        "eligible_clients": _mean([r["eligible_clients"] for r in rs]),
        "tier0_update_share": _mean([t.get("update_share") for t in tier0]),
        "tier0_staleness": _mean([t.get("mean_staleness") for t in tier0]),
        "mean_staleness": _mean([r["mean_staleness"] for r in rs]),
        "accuracy_change": _mean([r["final_accuracy"] - r["start_accuracy"]
                                  for r in rs
                                  if r.get("start_accuracy") is not None]),
        "upload_bytes_per_update": _mean([r["upload_bytes_per_update"]
                                          for r in rs]),
        "updates_dropped": _mean([r["updates_dropped"] for r in rs]),
    }
  return out


def outcome(summary: dict, contrast: dict) -> dict:
  """FTTE against FedBuff in one cell: time and accuracy, each better,
  worse or tie (95% intervals), and the cell's outcome."""
  t_f = summary["ftte"]["time_to_target_s"]
  t_b = summary["fedbuff"]["time_to_target_s"]
  lt = contrast["ftte"]["log_time_ratio_vs_fedbuff"]
  if t_f["reached"] == 0 and t_b["reached"] == 0:
    time = "neither reached"
  elif t_f["reached"] > t_b["reached"] and t_b["reached"] < t_b["seeds"]:
    time = "better"  # FTTE reaches the target in seeds FedBuff does not.
  elif t_b["reached"] > t_f["reached"] and t_f["reached"] < t_f["seeds"]:
    time = "worse"
  elif lt["high"] is not None and lt["high"] < 0:
    time = "better"
  elif lt["low"] is not None and lt["low"] > 0:
    time = "worse"
  else:
    time = "tie"
  acc = contrast["ftte"]["accuracy_minus_fedbuff"]
  if acc["low"] is not None and acc["low"] > 0:
    accuracy = "better"
  elif acc["high"] is not None and acc["high"] < 0:
    accuracy = "worse"
  else:
    accuracy = "tie"
  marks = {time, accuracy} - {"tie", "neither reached"}
  result = ("win" if marks == {"better"} else "lose" if marks == {"worse"}
            else "trade-off" if marks else "tie")
  return {"time": time, "accuracy": accuracy, "result": result}


def cell_report(cell: dict, runs: dict, expected: int) -> dict:
  from experiments import aggregate  # pylint: disable=g-import-not-at-top
  algs = sorted({a for r in runs.values() for a in r},
                key=lambda a: (a not in ALGORITHMS, a))
  summary = {a: aggregate.summarize(runs, a) for a in algs}
  contrast = aggregate.contrasts(runs, algs, "fedavg", "fedbuff")
  done = sum(len(r) for r in runs.values())
  out = {**cell, "name": cell_name(cell), "paper_cell": is_paper(cell),
         "runs_done": done, "runs_expected": expected,
         "seeds": sorted(runs), "summary": summary, "contrasts": contrast,
         "explain": explain(runs)}
  if all(a in summary for a in ALGORITHMS) and done:
    out["outcome"] = outcome(summary, contrast)
  return out


def marginals(reports: list[dict]) -> list[dict]:
  """Per axis value: the cells' outcomes and mean effects."""
  rows = []
  for axis in AXES:
    for value in sorted({r[axis] for r in reports}, key=str):
      rs = [r for r in reports if r[axis] == value and "outcome" in r]
      if not rs:
        continue
      res = [r["outcome"]["result"] for r in rs]
      acc = [r["contrasts"]["ftte"]["accuracy_minus_fedbuff"]["mean"]
             for r in rs]
      ltr = [r["contrasts"]["ftte"]["log_time_ratio_vs_fedbuff"]["mean"]
             for r in rs]
      step = [r["explain"]["ftte"]["step_time_s"] /
              r["explain"]["fedbuff"]["step_time_s"] for r in rs]
      m = _mean(ltr)
      rows.append({
          "axis": axis, "value": value, "cells": len(rs),
          "win": res.count("win"), "lose": res.count("lose"),
          "trade-off": res.count("trade-off"), "tie": res.count("tie"),
          "mean acc. FTTE − FedBuff (pts)": (None if _mean(acc) is None
                                             else 100 * _mean(acc)),
          "mean time FTTE / FedBuff": None if m is None else math.exp(m),
          "step time FTTE / FedBuff": _mean(step),
          "FedBuff acc. change from start (pts)": 100 * _mean([
              r["explain"]["fedbuff"]["accuracy_change"] for r in rs]),
          "FTTE acc. change from start (pts)": 100 * _mean([
              r["explain"]["ftte"]["accuracy_change"] for r in rs]),
      })
  return rows


def regime_text(reports: list[dict]) -> list[str]:
  """Where FTTE wins and loses, in sentences generated from the cells."""
  done = [r for r in reports if "outcome" in r]
  lines = []
  for result in ("win", "lose", "trade-off", "tie"):
    names = [r for r in done if r["outcome"]["result"] == result]
    if names:
      lines.append(f"- **{result}** ({len(names)} of {len(done)} cells): " +
                   "; ".join(_cell_words(r) for r in names))
  return lines


def _cell_words(r: dict) -> str:
  from experiments import aggregate  # pylint: disable=g-import-not-at-top
  c, e = r["contrasts"]["ftte"], r["explain"]
  f = aggregate.fmt
  return (f"{cell_name(r)} (acc. {f(c['accuracy_minus_fedbuff'], 3, 100)} "
          f"pts, time {r['outcome']['time']}: FTTE "
          f"{f(r['summary']['ftte']['time_to_target_s'], unit=' s')} vs "
          f"FedBuff {f(r['summary']['fedbuff']['time_to_target_s'], unit=' s')}"
          f"; FTTE step "
          f"{e['ftte']['step_time_s']:.3g} s vs "
          f"{e['fedbuff']['step_time_s']:.3g} s, MCUs sent "
          f"{100 * (e['ftte']['tier0_update_share'] or 0):.0f}% of FTTE's "
          f"updates; FedBuff {100 * e['fedbuff']['accuracy_change']:+.1f} "
          f"pts from start)")


def cell_rows(reports: list[dict]) -> list[dict]:
  """The map's table: one row per cell."""
  from experiments import aggregate  # pylint: disable=g-import-not-at-top
  f = aggregate.fmt
  rows = []
  for r in reports:
    if "outcome" not in r:
      continue
    c, s = r["contrasts"], r["summary"]
    rows.append({
        "MCU share": r["mcu_fraction"], "stragglers":
        r["straggler_fraction"], "phone link": r["phone_link"],
        "data-device corr.": r["device_correlation"],
        "seeds": len(r["seeds"]),
        "FTTE reduction vs FedAvg": f(c["ftte"]["reduction_vs_fedavg"],
                                      scale=100, unit="%"),
        "FedBuff reduction vs FedAvg": f(c["fedbuff"]["reduction_vs_fedavg"],
                                         scale=100, unit="%"),
        "FTTE acc. − FedBuff (pts)": f(c["ftte"]["accuracy_minus_fedbuff"],
                                       scale=100),
        "FTTE acc.": f(s["ftte"]["final_accuracy"]),
        "FedBuff acc.": f(s["fedbuff"]["final_accuracy"]),
        "FedAvg acc.": f(s["fedavg"]["final_accuracy"]),
        "FTTE vs FedBuff (time / acc.)":
            f"{r['outcome']['time']} / {r['outcome']['accuracy']}",
        "outcome": f"**{r['outcome']['result']}**",
    })
  return rows


def plot(reports: list[dict], path: str) -> str | None:
  """Heat maps over the grid: FTTE − FedBuff accuracy, and FTTE's and
  FedBuff's time-to-target reduction against FedAvg, annotated with the
  mean, its 95% half width and the outcome."""
  try:
    import matplotlib  # pylint: disable=g-import-not-at-top
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
    import numpy as np  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  done = [r for r in reports if "outcome" in r]
  if not done:
    return None
  row_keys = sorted({(r["mcu_fraction"], r["straggler_fraction"],
                      r["phone_link"]) for r in done})
  col_keys = sorted({r["device_correlation"] for r in done})
  panels = [
      ("FTTE − FedBuff final accuracy (pts)",
       lambda r: r["contrasts"]["ftte"]["accuracy_minus_fedbuff"], 100,
       "RdBu", True),
      ("FTTE time-to-target reduction vs FedAvg (%)",
       lambda r: r["contrasts"]["ftte"]["reduction_vs_fedavg"], 100,
       "viridis", False),
      ("FedBuff time-to-target reduction vs FedAvg (%)",
       lambda r: r["contrasts"]["fedbuff"]["reduction_vs_fedavg"], 100,
       "viridis", False)]
  fig, axes = plt.subplots(1, 3, figsize=(17, 0.55 * len(row_keys) + 2.2))
  by = {(r["mcu_fraction"], r["straggler_fraction"], r["phone_link"],
         r["device_correlation"]): r for r in done}
  for ax, (title, get, scale, cmap, centred) in zip(axes, panels):
    grid = np.full((len(row_keys), len(col_keys)), np.nan)
    labels = {}
    for i, rk in enumerate(row_keys):
      for j, ck in enumerate(col_keys):
        r = by.get((*rk, ck))
        ci = get(r) if r else None
        if ci and ci.get("mean") is not None:
          grid[i, j] = ci["mean"] * scale
        if r:
          text = "n/a" if not ci or ci.get("mean") is None else (
              f"{ci['mean'] * scale:.1f}" + (
                  f"±{ci['half_width'] * scale:.1f}"
                  if ci.get("half_width") is not None else ""))
          if ci and ci.get("defined") is not None and (
              ci["defined"] < ci["seeds"]):
            text += f"\n[{ci['defined']}/{ci['seeds']}]"
          if ax is axes[0]:
            text += f"\n{r['outcome']['result']}"
          labels[i, j] = text
    top = np.nanmax(np.abs(grid)) if np.isfinite(grid).any() else 1.0
    for (i, j), text in labels.items():
      v = grid[i, j]
      dark = np.isfinite(v) and (abs(v) > 0.6 * top if centred else v < 0)
      ax.text(j, i, text, ha="center", va="center", fontsize=7,
              color="white" if dark else "black")
    if centred:
      lim = np.nanmax(np.abs(grid)) if np.isfinite(grid).any() else 1.0
      im = ax.imshow(grid, cmap=cmap, vmin=-lim, vmax=lim, aspect="auto")
    else:
      im = ax.imshow(grid, cmap=cmap, vmin=-100, vmax=100, aspect="auto")
    fig.colorbar(im, ax=ax, shrink=0.8)
    ax.set_xticks(range(len(col_keys)), [f"{c:g}" for c in col_keys])
    ax.set_xlabel("data-device correlation")
    ax.set_yticks(range(len(row_keys)),
                  [f"MCU {a:g}, strag. {b:g}, {c}" for a, b, c in row_keys])
    ax.set_title(title, fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


def write_report(reports: list[dict], fv, base: list[str]) -> None:
  """Writes ``<results>.{json,md,png}`` from the cells' reports."""
  from experiments import claims  # pylint: disable=g-import-not-at-top
  from experiments import compare  # pylint: disable=g-import-not-at-top
  from experiments.benchmarks import common  # pylint: disable=g-import-not-at-top
  from ftte_jax import checkpointing  # pylint: disable=g-import-not-at-top
  from ftte_jax.core import profiles  # pylint: disable=g-import-not-at-top
  paper = next((r for r in reports if r["paper_cell"] and "outcome" in r),
               None)
  verdicts = (claims.paper_cell_claims(paper, f"regime map, paper-like cell "
                                       f"{cell_name(paper)}")
              if paper else [])
  across = claims.accuracy_across_cells(
      [(cell_name(r), r["contrasts"]["ftte"]["accuracy_minus_fedbuff"])
       for r in reports if "outcome" in r])
  if across:
    verdicts.append(across)
  missing = [f"{r['name']} ({r['runs_done']}/{r['runs_expected']} runs)"
             for r in reports if r["runs_done"] < r["runs_expected"]]
  argv = [a for a in sys.argv[1:] if a not in ("--report_only",
                                              "--report_only=true")]
  md = [f"Command: python -m experiments.regime_map {' '.join(argv)}" + (
      " (this report rewritten with --report_only from the runs on disk)"
      if fv.report_only else ""), f"Machine: {common.machine()}",
        f"Shared setup: {' '.join(base)}", ""]
  if paper:
    rows, _, _ = compare.seeded_rows(
        paper["per_seed_runs"], [a for a in (*ALGORITHMS, "ftte_time")
                                 if a in paper["summary"]])
    md += ["## The paper-like cell", "",
           f"{cell_name(paper)}: 500 devices ({mix(paper['mcu_fraction'])}),"
           f" {paper['straggler_fraction']:g} stragglers, phones on "
           f"{paper['phone_link']}, data-device correlation "
           f"{paper['device_correlation']:g}; seeds {paper['seeds']}. "
           "FedAvg and FedBuff under memory_policy=exclude (a device that "
           "cannot hold full training takes no part); FTTE's subset fits "
           "every device. ftte_time: FTTE with "
           "search_objective=importance_per_time (ours, not the paper's).",
           "", sweep.markdown_table(rows),
           "## The paper's claims 1-3 in this cell", "",
           claims.claims_markdown(verdicts)]
  md += ["## The map", "",
         "Mean ± 95% Student-t half width over seeds. Outcome against "
         "FedBuff: time better/worse when the 95% interval of log(t_FTTE / "
         "t_FedBuff) excludes 0 (or FTTE reaches the target in seeds "
         "FedBuff does not, and the reverse), accuracy better/worse when "
         "the interval of the final-accuracy difference excludes 0; win: "
         "better on one and not worse on the other, lose: the reverse, "
         "trade-off: better on one and worse on the other. Memory policy: "
         "exclude for every algorithm.", "",
         sweep.markdown_table(cell_rows(reports)),
         "## Where FTTE wins and loses", "", *regime_text(reports), "",
         "By axis (means over the cells with that value):", "",
         sweep.markdown_table(marginals(reports))]
  if missing:
    md += ["", "Not finished: " + ", ".join(missing)]
  os.makedirs(os.path.dirname(os.path.abspath(fv.results)), exist_ok=True)
  png = plot(reports, fv.results + ".png")
  checkpointing.write_text(fv.results + ".md", "\n".join(md) + "\n")
  checkpointing.write_json(fv.results + ".json", {
      "setup": base, "axes": {a: sorted({r[a] for r in reports}, key=str)
                              for a in AXES},
      "paper_cell": PAPER_CELL,
      "cells": [{k: v for k, v in r.items() if k != "per_seed_runs"}
                for r in reports],
      "marginals": marginals(reports), "claims": verdicts,
      "missing": missing, "machine": common.machine(),
      "profiles": profiles.table(), "plot": png})
  print("\n".join(md), flush=True)


def _run(fv) -> None:
  from experiments import compare  # pylint: disable=g-import-not-at-top
  base = shared_args(flags_lib.given_args(fv))
  plan = []
  for cell in cells(fv):
    paper = is_paper(cell)
    seeds = [int(s) for s in (fv.paper_seeds if paper else fv.seeds)]
    algs = list(fv.paper_algorithms if paper else fv.algorithms)
    plan.append((cell, cell_jobs(cell, base, seeds, algs, fv.out_dir)))
  reports = []
  for i, (cell, jobs) in enumerate(plan):
    todo = [j for j in jobs if sweep.read_summary(j.workdir) is None]
    if todo and not fv.report_only:
      logging.info("cell %d/%d %s: %d runs", i + 1, len(plan),
                   cell_name(cell), len(todo))
      sweep.run_jobs(todo, parallel=fv.parallel,
                     extra_args=flags_lib.checkpoint_args(fv))
    compare.prune_checkpoints(jobs)
    runs = read_runs(jobs)
    report = cell_report(cell, runs, len(jobs))
    report["per_seed_runs"] = runs
    reports.append(report)
    done_or_planned = reports + [cell_report(c, read_runs(j), len(j))
                                 for c, j in plan[i + 1:]]
    if not fv.report_only or i == len(plan) - 1:
      write_report(done_or_planned, fv, base)


def _check(fv) -> None:
  base = shared_args(flags_lib.given_args(fv))
  for name in ("seeds", "paper_seeds"):
    for s in getattr(fv, name):
      if not s.strip().isdigit():
        raise ValueError(f"{name}: {s!r} is not a non-negative integer")
  for name in ("mcu_fractions", "straggler_fractions", "correlations"):
    for v in getattr(fv, name):
      try:
        x = float(v)
      except ValueError:
        raise ValueError(f"{name}: {v!r} is not a number") from None
      if not 0 <= x <= 1:
        raise ValueError(f"{name}: {v} is not in [0, 1]")
  for cell in cells(fv):
    algs = fv.paper_algorithms if is_paper(cell) else fv.algorithms
    cell_jobs(cell, base, [0], list(algs), fv.out_dir)


def run() -> None:
  flags_lib.run_app(_define, flags_lib.checked_main(_check, _run))


if __name__ == "__main__":
  run()
