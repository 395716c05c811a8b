r"""Do FTTE's gains over FedAvg grow with the number of devices?

  python -m experiments.scaling_devices --out_dir=runs/scaling-devices
  python -m experiments.scaling_devices --devices=100,500 --seeds=0,1 ...

The paper reports that FTTE's advantage grows with the fleet. For each
device count N in ``--devices`` this runs ``experiments.compare`` (FTTE,
FedBuff and FedAvg, each its own ``launch.main`` process per seed,
resumable) on one shared setup in which only N changes: every device draws
its data from the same distribution (``partition=sampled``: Dirichlet(0.3)
label proportions and 32 examples drawn with replacement from the MNIST
pool, so the per-device distribution does not depend on N; a split of the
pool would give each device fewer examples as N grows) and its speed from
the same straggler mix; every algorithm starts from the same model,
pretrained on the server's proxy set (the default setting), and applies the
same number of client updates. Every config flag of ``launch.main`` sets the
shared setup; the defaults below are this study's.

Two ways to scale (``--modes``):

* ``fixed``: the server keeps C = 100 tasks in flight and steps on K = 10
  updates at every N (FedAvg: 10 clients a round), 300 steps.
* ``fraction``: a fixed share of the fleet takes part, as the paper scales:
  K = ``--participation`` x N updates a step (FedAvg's clients a round), C =
  10 K tasks in flight for FedBuff and FTTE (the ``fixed`` ratio C/K), and
  3,000 / K steps, so every run still applies 3,000 updates.
* ``fraction_steps``: the same K and C, and the study's 300 server steps
  (FedAvg: rounds), so a run applies 300 K updates: more devices, more
  updates, as a fixed number of federated rounds would.

At N = 500 with participation 0.02 the three modes are the same setting.

Every figure is a mean with a 95% Student-t interval over ``--seeds``
(``experiments.aggregate``). The growth of FTTE's gain is measured per
seed as the least-squares slope of its time-to-target reduction against
log10 N (and the change from the smallest to the largest N), then
summarized over seeds; ``experiments.claims`` words the verdict.

Writes ``scaling.md``/``scaling.json`` in ``--out_dir`` (and, with
matplotlib, ``scaling.png``: reductions against N with 95% bands). The runs
stay in ``<out_dir>/<mode>/N<n>/seed<s>/<algorithm>``.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

from absl import flags

from launch import flags as flags_lib
from launch import sweep

FLAGS = flags.FLAGS
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ALGORITHMS = ("ftte", "fedbuff", "fedavg")
MODES = ("fixed", "fraction", "fraction_steps")
UPDATES = 3000  # client updates every run applies.
# The study's shared setup; any config flag given on the command line wins.
STUDY = (
    "--dataset=mnist", "--partition=sampled", "--dirichlet_alpha=0.3",
    "--examples_per_client=32", "--model=mlp", "--straggler_fraction=0.9",
    "--straggler_slowdown=10", "--task_sigma=0.2", "--concurrency=100",
    "--buffer_size=10", "--local_steps=5", "--batch_size=32",
    "--client_lr=0.05", "--memory_policy=ignore", "--rounds=300",
    "--eval_every=10", "--target_accuracy=0.87",
    "--first_download=deployed")


def _define() -> None:
  flags_lib.define_config_flags()
  flags.DEFINE_list("devices", ["100", "500", "2000", "10000"],
                    "device counts N to compare at")
  flags.DEFINE_list("modes", list(MODES), "fixed (C=100, K=10 at every N), "
                    "fraction (K = participation x N, C = 10 K, 3,000 "
                    "updates) and/or fraction_steps (the same, 300 steps)")
  flags.DEFINE_float("participation", 0.02, "fraction mode: share of the "
                     "fleet whose updates a server step takes (K / N)")
  flags.DEFINE_list("seeds", ["0", "1", "2", "3", "4"], "seeds per point")
  flags.DEFINE_integer("parallel", 1, "runs at once", lower_bound=1)
  flags.DEFINE_string("out_dir", "runs/scaling-devices",
                      "parent of the per-N comparisons and of the tables")
  flags_lib.define_checkpoint_flags()
  # One checkpoint a run; compare deletes a finished run's checkpoints.
  FLAGS.set_default("keep_checkpoints", 1)
  FLAGS.set_default("checkpoint_every", 100)


def mode_args(n: int, mode: str = "fixed", participation: float = 0.02
              ) -> list[str]:
  """The engine arguments a mode sets at ``n`` devices (fixed: none)."""
  if mode == "fixed":
    return []
  if mode not in MODES:
    raise ValueError(f"modes: unknown {mode!r}; valid: {list(MODES)}")
  k = max(1, round(participation * n))
  if mode == "fraction_steps":
    return [f"--buffer_size={k}", f"--concurrency={10 * k}"]
  rounds = -(-UPDATES // k)
  return [f"--buffer_size={k}", f"--concurrency={10 * k}",
          f"--rounds={rounds}", f"--eval_every={max(1, rounds // 30)}"]


def study_args(given: list[str], n: int, mode: str = "fixed",
               participation: float = 0.02) -> list[str]:
  """The shared launch.main arguments at ``n`` devices (``given`` wins over
  the study's defaults; the mode's engine arguments win over both).

  Raises:
    ValueError: an invalid option, or fewer devices than tasks in flight.
  """
  own = {a.split("=", 1)[0] for a in given}
  args = [a for a in STUDY if a.split("=", 1)[0] not in own] + list(given)
  extra = mode_args(n, mode, participation)
  set_here = {a.split("=", 1)[0] for a in extra} | {"--num_clients"}
  args = [a for a in args if a.split("=", 1)[0] not in set_here]
  args += extra + [f"--num_clients={n}"]
  flags_lib.resolve_args(args)  # checks every option before any run.
  return args


def rows_of(compare: dict, n: int) -> dict:
  """One table row from a compare.json: per-algorithm figures at N.

  A single-seed compare.json gives the plain figures; a ``--seeds`` one
  gives means and 95% intervals (``*_ci``) and the per-seed values.
  """
  if "per_seed" in compare:
    return _seeded_row(compare, n)
  by = {r["algorithm"]: r for r in compare["rows"]}
  row = {"devices": n}
  for alg in ALGORITHMS:
    r = by.get(alg, {})
    row[f"{alg}_final_accuracy"] = r.get("final_accuracy")
    row[f"{alg}_time_to_target_s"] = r.get("time_to_target_s")
    if alg != "fedavg":
      row[f"{alg}_reduction_vs_fedavg"] = r.get("speedup_vs_fedavg")
      row[f"{alg}_memory_ratio"] = r.get("memory_ratio_vs_fedavg")
      row[f"{alg}_upload_ratio"] = r.get("upload_ratio_vs_fedavg")
  return row


def _seeded_row(compare: dict, n: int) -> dict:
  from experiments import aggregate  # pylint: disable=g-import-not-at-top
  per_seed = {int(k): v for k, v in compare["per_seed"].items()}
  summary, contrast = compare["summary"], compare["contrasts"]
  row = {"devices": n, "seeds": len(per_seed)}
  for alg in ALGORITHMS:
    row[f"{alg}_final_accuracy_ci"] = summary[alg]["final_accuracy"]
    row[f"{alg}_time_to_target_ci"] = summary[alg]["time_to_target_s"]
    row[f"{alg}_virtual_time_ci"] = summary[alg]["virtual_time_s"]
    if alg != "fedavg":
      row[f"{alg}_reduction_ci"] = contrast[alg]["reduction_vs_fedavg"]
      row[f"{alg}_memory_ratio_ci"] = contrast[alg]["memory_ratio_vs_fedavg"]
      row[f"{alg}_upload_ratio_ci"] = contrast[alg]["upload_ratio_vs_fedavg"]
      row[f"{alg}_reduction_per_seed"] = {
          s: aggregate.reduction()(runs[alg], runs["fedavg"])
          for s, runs in per_seed.items() if alg in runs and "fedavg" in runs}
  return row


def growth(rows: list[dict], alg: str = "ftte") -> dict:
  """How ``alg``'s reduction against FedAvg moves with N, over seeds.

  Per seed, the least-squares slope of the reduction against log10 N over
  the N where both reached the target, and the reduction at the largest N
  minus that at the smallest; each summarized with its 95% interval.
  """
  from ftte_jax.experiment import stats  # pylint: disable=g-import-not-at-top
  by_seed: dict[int, list[tuple[float, float]]] = {}
  for r in rows:
    for s, v in r.get(f"{alg}_reduction_per_seed", {}).items():
      if v is not None:
        by_seed.setdefault(int(s), []).append((math.log10(r["devices"]), v))
  slopes, deltas = [], []
  n_min = math.log10(min(r["devices"] for r in rows)) if rows else None
  n_max = math.log10(max(r["devices"] for r in rows)) if rows else None
  for pts in by_seed.values():
    xs = [p[0] for p in pts]
    if len(set(xs)) >= 2:
      mx = sum(xs) / len(xs)
      my = sum(p[1] for p in pts) / len(pts)
      sxx = sum((x - mx) ** 2 for x in xs)
      slopes.append(sum((x - mx) * (y - my) for x, y in pts) / sxx)
    ends = dict(pts)
    if n_min in ends and n_max in ends:
      deltas.append(ends[n_max] - ends[n_min])
  return {"algorithm": alg,
          "slope_per_decade": stats.mean_ci(slopes),
          "largest_minus_smallest": stats.mean_ci(deltas),
          "seeds": len(by_seed)}


def table(rows: list[dict]) -> str:
  """The markdown table of seeded rows."""
  from experiments import aggregate  # pylint: disable=g-import-not-at-top
  f = aggregate.fmt
  out = []
  for r in rows:
    out.append({
        "devices N": r["devices"], "seeds": r["seeds"],
        "FTTE reduction vs FedAvg": f(r["ftte_reduction_ci"], scale=100,
                                      unit="%"),
        "FedBuff reduction": f(r["fedbuff_reduction_ci"], scale=100,
                               unit="%"),
        "FedAvg time to target (s)": f(r["fedavg_time_to_target_ci"]),
        "FTTE time (s)": f(r["ftte_time_to_target_ci"]),
        "FedBuff time (s)": f(r["fedbuff_time_to_target_ci"]),
        "final acc. FTTE": f(r["ftte_final_accuracy_ci"]),
        "FedBuff": f(r["fedbuff_final_accuracy_ci"]),
        "FedAvg": f(r["fedavg_final_accuracy_ci"]),
        "FedAvg virtual time of the run (s)": f(r["fedavg_virtual_time_ci"]),
    })
  return sweep.markdown_table(out)


def plot(by_mode: dict[str, list[dict]], path: str) -> str | None:
  """Time-to-target reduction against N with 95% bands, one panel per
  mode; None without matplotlib."""
  try:
    import matplotlib  # pylint: disable=g-import-not-at-top
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  fig, axes = plt.subplots(1, len(by_mode), figsize=(5.5 * len(by_mode), 3.8),
                           squeeze=False)
  for ax, (mode, rows) in zip(axes[0], by_mode.items()):
    for alg in ("ftte", "fedbuff"):
      pts = [(r["devices"], r[f"{alg}_reduction_ci"]) for r in rows
             if r[f"{alg}_reduction_ci"]["mean"] is not None]
      if not pts:
        continue
      xs = [p[0] for p in pts]
      mean = [p[1]["mean"] for p in pts]
      lo = [p[1]["low"] if p[1]["low"] is not None else p[1]["mean"]
            for p in pts]
      hi = [p[1]["high"] if p[1]["high"] is not None else p[1]["mean"]
            for p in pts]
      line, = ax.plot(xs, mean, marker="o", label=alg)
      ax.fill_between(xs, lo, hi, color=line.get_color(), alpha=0.2)
    ax.set_xscale("log")
    ax.set_xlabel("devices N")
    ax.set_ylabel("time-to-target reduction vs FedAvg")
    ax.set_title(f"{mode}: " + {
        "fixed": "C=100, K=10, 300 steps",
        "fraction": "K=0.02N, C=10K, 3,000 updates",
        "fraction_steps": "K=0.02N, C=10K, 300 steps"}.get(mode, mode),
                 fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path


def _run(fv: flags.FlagValues) -> None:
  given = flags_lib.given_args(fv)
  seeds = ",".join(str(int(s)) for s in fv.seeds)
  by_mode, args_of, growths = {}, {}, {}
  for mode in fv.modes:
    rows = []
    for n in (int(x) for x in fv.devices):
      args = study_args(given, n, mode, fv.participation)
      args_of[f"{mode}/N{n}"] = args
      out = os.path.abspath(os.path.join(fv.out_dir, mode, f"N{n}"))
      cmd = [sys.executable, "-m", "experiments.compare", *args,
             f"--algorithms={','.join(ALGORITHMS)}", f"--compare_dir={out}",
             f"--seeds={seeds}", f"--parallel={fv.parallel}",
             *flags_lib.checkpoint_args(fv)]
      print(f"{mode} N={n}: {' '.join(cmd[2:])}", flush=True)
      subprocess.run(cmd, cwd=REPO, check=False)
      with open(os.path.join(out, "compare.json")) as f:
        rows.append(rows_of(json.load(f), n))
    by_mode[mode] = rows
    growths[mode] = {alg: growth(rows, alg) for alg in ("ftte", "fedbuff")}
  from experiments import aggregate  # pylint: disable=g-import-not-at-top
  from experiments import claims  # pylint: disable=g-import-not-at-top
  from experiments.benchmarks import common  # pylint: disable=g-import-not-at-top
  verdict = claims.growth_claim(growths)
  md = [f"Command: python -m experiments.scaling_devices {' '.join(sys.argv[1:])}",
        f"Machine: {common.machine()}", ""]
  for mode, rows in by_mode.items():
    g = growths[mode]
    md += [f"### {mode}", "", table(rows),
           f"FTTE's reduction, slope per decade of N: "
           f"{aggregate.fmt(g['ftte']['slope_per_decade'], scale=100, unit=' pts')}"
           f"; largest minus smallest N: "
           f"{aggregate.fmt(g['ftte']['largest_minus_smallest'], scale=100, unit=' pts')}"
           f" (FedBuff: {aggregate.fmt(g['fedbuff']['slope_per_decade'], scale=100, unit=' pts')}"
           f" per decade).", ""]
  md += [claims.claims_markdown([verdict]), "",
         "Mean ± 95% Student-t half width over seeds "
         f"{seeds}; reduction = 1 − t_target / t_target(FedAvg) per seed, in "
         "virtual time, over the seeds where both reached the target ([k/n "
         "seeds] otherwise). Memory policy: ignore for every algorithm (every "
         "device trains the full model, the setting most favourable to the "
         "baselines; the fleet's tiers only set FTTE's budget)."]
  png = plot(by_mode, os.path.join(fv.out_dir, "scaling.png"))
  from ftte_jax import checkpointing  # pylint: disable=g-import-not-at-top
  checkpointing.write_text(os.path.join(fv.out_dir, "scaling.md"),
                           "\n".join(md) + "\n")
  checkpointing.write_json(os.path.join(fv.out_dir, "scaling.json"),
                           {"modes": by_mode, "growth": growths,
                            "claim": verdict, "args": args_of,
                            "seeds": seeds, "machine": common.machine(),
                            "plot": png})
  print("\n".join(md), flush=True)


def _check(fv: flags.FlagValues) -> None:
  given = flags_lib.given_args(fv)
  for s in fv.seeds:
    if not s.strip().isdigit():
      raise ValueError(f"seeds: {s!r} is not a non-negative integer")
  if not 0 < fv.participation <= 0.1:
    raise ValueError("participation must be in (0, 0.1] (C = 10 K tasks in "
                     f"flight must fit the fleet), got {fv.participation}")
  for mode in fv.modes:
    for n in fv.devices:
      if not n.isdigit() or int(n) < 1:
        raise ValueError(f"devices: {n!r} is not a positive integer")
      study_args(given, int(n), mode, fv.participation)


def run() -> None:
  flags_lib.run_app(_define, flags_lib.checked_main(_check, _run))


if __name__ == "__main__":
  run()
