r"""FTTE against FedBuff, FedAsync and FedAvg on one data split, fleet and seed.

  python -m experiments.compare --flagfile=experiments/smoke.flags
  python -m experiments.compare --flagfile=experiments/mnist_paper.flags \
      --compare_dir=runs/compare-mnist --algo_flags=fedavg:--rounds=60

Every config flag of ``launch.main`` sets the shared setup (data, model,
fleet, seed, rounds, target accuracy...). Each algorithm runs as its own
``launch.main`` process (sequentially; each already uses every core) in
``<compare_dir>/<algorithm>``, so an interrupted comparison resumes from
checkpoints when re-run. Per-algorithm overrides: ``--algo_flags=ALG:--flag
=value`` (repeatable). Options a preset pins (``algorithms.pinned``) take
the pinned value unless overridden: fedasync gets ``--buffer_size=1`` and
fedavg, synchronous, ``--concurrency`` equal to its buffer size. Every
algorithm applies the same number of client updates: one whose buffer size
K differs from the shared one gets the shared ``--rounds`` and
``--eval_every`` scaled by K_shared / K (FedAsync: K_shared times as many),
unless its own flags set them. Set ``--max_virtual_time`` to compare on an
equal virtual-time budget instead.

Writes ``compare.md`` and ``compare.json`` (final accuracy, time to target,
speed-up versus FedAvg ``1 - t/t_fedavg``, peak device memory and its ratio
to FedAvg, upload payload per update and its ratio, mean staleness, and the
memory policy each algorithm ran under) and, when matplotlib is importable
(extra ``plot``), ``compare.png``: accuracy over virtual time and over total
bytes communicated.

With ``--seeds=0,1,2,3,4`` every algorithm runs once per seed (in
``<compare_dir>/seed<s>/<algorithm>``, ``--parallel`` at a time) and every
figure is a mean with a 95% Student-t interval over the seeds (final
accuracy, time to target and its sustained variant, memory, payload,
energy, and the paired reduction against FedAvg and accuracy against
FedBuff); a time to target some seed never reached says how many did
(``experiments.aggregate``). The plot shows each algorithm's mean accuracy
with its 95% band.

``ftte_time`` is FTTE with the time-aware search
(``--search_objective=importance_per_time``), for ``--algorithms``.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time

import numpy as np

from absl import flags
from absl import logging

from launch import flags as flags_lib
from launch import sweep

FLAGS = flags.FLAGS
ALGORITHMS = ("ftte", "fedbuff", "fedasync", "fedavg")
BASELINE = "fedavg"
PEER = "fedbuff"
# Named variants: (preset, its own flags).
VARIANTS = {"ftte_time": ("ftte", ("--search_objective=importance_per_time",))}


def define_flags() -> None:
  flags_lib.define_config_flags()
  flags.DEFINE_list("algorithms", list(ALGORITHMS), "algorithms to compare "
                    f"(speed-up and ratios are against {BASELINE} when it is "
                    "among them)")
  flags.DEFINE_multi_string("algo_flags", [], "ALG:--flag=value, a flag for "
                            "one algorithm only (repeatable)")
  flags.DEFINE_string("compare_dir", None, "parent of the runs' workdirs and "
                      "of the tables (default runs/compare-<time>)")
  flags.DEFINE_list("seeds", [], "run every algorithm once per seed and "
                    "report means with 95% intervals (default: the one "
                    "--seed)")
  flags.DEFINE_integer("parallel", 1, "runs at once (with --seeds)",
                       lower_bound=1)
  flags_lib.define_checkpoint_flags()


def algorithm_args(base: list[str], algorithms: list[str],
                   algo_flags: list[str]) -> dict[str, list[str]]:
  """The launch.main arguments of each algorithm, validated.

  Raises:
    ValueError: an unknown algorithm, a malformed --algo_flags, or an
      invalid configuration (the message names the algorithm and the flag).
  """
  extra: dict[str, list[str]] = {a: [] for a in algorithms}
  for spec in algo_flags:
    alg, sep, arg = spec.partition(":")
    if not sep or not arg.startswith("--"):
      raise ValueError(f"algo_flags: expected ALG:--flag=value, got {spec!r}")
    if alg not in extra:
      raise ValueError(f"algo_flags: {alg!r} is not in --algorithms "
                       f"{algorithms}")
    extra[alg].append(arg)
  base = flags_lib.expand_args(base)
  shared = flags_lib.resolve_args(base).config
  out = {}
  for alg in algorithms:
    if alg not in ALGORITHMS and alg not in VARIANTS:
      raise ValueError(f"algorithms: unknown {alg!r}; valid: "
                       f"{list(ALGORITHMS) + list(VARIANTS)}")
    preset, own_flags = VARIANTS.get(alg, (alg, ()))
    try:
      args = flags_lib.for_algorithm(base, preset,
                                     [*own_flags, *extra[alg]])
      own = {a.split("=", 1)[0] for a in extra[alg]}
      if not {"--rounds", "--eval_every"} & own:
        args = _same_updates(args, shared)
      flags_lib.resolve_args(args)
    except ValueError as e:
      raise ValueError(f"{alg}: {flags_lib.one_line(e)}") from None
    out[alg] = args
  return out


def _same_updates(args: list[str], shared) -> list[str]:
  """Scales --rounds and --eval_every by K_shared / K of this algorithm.

  A server step applies K updates, so this gives every algorithm the same
  number of client updates and evaluation points (rounded up).
  """
  k = flags_lib.resolve_args(args).config.engine.buffer_size
  k_shared = shared.engine.buffer_size
  if k == k_shared:
    return args
  scale = lambda n: -(-n * k_shared // k)  # ceil(n * k_shared / k)
  kept = [a for a in args if not a.startswith(("--rounds=", "--eval_every="))]
  return kept + [f"--rounds={scale(shared.rounds)}",
                 f"--eval_every={scale(shared.eval_every)}"]


def run_algorithms(per_alg: dict[str, list[str]], out_dir: str
                   ) -> tuple[dict[str, dict], dict[str, list[dict]],
                              dict[str, str]]:
  """Runs each algorithm's ``launch.main`` in ``<out_dir>/<algorithm>``
  (resuming what is there), one after another.

  Returns:
    ``(summaries, metric rows, failures)`` by algorithm: summaries and
    curves of the runs that finished and trained; for each other run its
    status (``sweep.run_status``, e.g. 'failed (no_updates)'), also logged
    with its log file.
  """
  jobs = [sweep.Job(alg, {"algorithm": alg}, args,
                    workdir=os.path.abspath(os.path.join(out_dir, alg)))
          for alg, args in per_alg.items()]
  sweep.run_jobs(jobs, parallel=1,
                 extra_args=flags_lib.checkpoint_args(FLAGS))
  summaries, curves, failures = {}, {}, {}
  for job in jobs:
    s = sweep.read_summary(job.workdir)
    status = sweep.run_status(job.returncode, s)
    if status != "ok":
      failures[job.name] = status
      logging.error("%s %s: see %s", job.name, status,
                    os.path.join(job.workdir, "run.log"))
      continue
    summaries[job.name] = s
    with open(os.path.join(job.workdir, "metrics.jsonl")) as f:
      curves[job.name] = [json.loads(line) for line in f]
  return summaries, curves, failures


def _ratio(a, b):
  return a / b if isinstance(a, (int, float)) and b else None


def comparison_rows(summaries: dict[str, dict],
                    failures: dict[str, str] | None = None) -> list[dict]:
  """One row per algorithm; speed-up and ratios are against FedAvg. An
  algorithm in ``failures`` (name -> status) gets a row with that status
  and no values: a run in which no update arrived is not a result."""
  rows = _result_rows(summaries)
  rows += [{"algorithm": alg, "status": status} for alg, status in
           (failures or {}).items()]
  return rows


def _result_rows(summaries: dict[str, dict]) -> list[dict]:
  base = summaries.get(BASELINE) or {}
  t_base = base.get("time_to_target_s")
  h_base = base.get("time_to_target_sustained_s")
  rows = []
  for alg, s in summaries.items():
    t = s.get("time_to_target_s")
    h = s.get("time_to_target_sustained_s")
    rows.append({
        "algorithm": alg,
        "status": "ok",
        "final_accuracy": s.get("final_accuracy"),
        "best_accuracy": s.get("best_accuracy"),
        "time_to_target_s": t,
        "speedup_vs_fedavg": (1.0 - t / t_base if t is not None and t_base
                              else None),
        "time_to_target_sustained_s": h,
        "sustained_speedup_vs_fedavg": (1.0 - h / h_base if h is not None
                                        and h_base else None),
        "stopped_by": s.get("stopped_by"),
        "peak_device_memory_bytes": s.get("peak_device_memory_bytes"),
        "memory_ratio_vs_fedavg": _ratio(s.get("peak_device_memory_bytes"),
                                         base.get("peak_device_memory_bytes")),
        "upload_bytes_per_update": s.get("upload_bytes_per_update"),
        "upload_ratio_vs_fedavg": _ratio(s.get("upload_bytes_per_update"),
                                         base.get("upload_bytes_per_update")),
        "mean_staleness": s.get("mean_staleness"),
        "client_updates": s.get("client_updates"),
        "virtual_time_s": s.get("virtual_time_s"),
        "eligible_clients": s.get("eligible_clients"),
        "memory_policy": s.get("memory_policy"),
        "wall_s": s.get("wall_s"),
    })
  return rows


def plot(curves: dict[str, list[dict]], target, path: str) -> str | None:
  """Accuracy over virtual time and over bytes; None if no matplotlib."""
  try:
    import matplotlib  # pylint: disable=g-import-not-at-top
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  fig, (ax_t, ax_b) = plt.subplots(1, 2, figsize=(11, 4))
  for alg, rows in curves.items():
    acc = [r["test_accuracy"] for r in rows]
    ax_t.plot([r["virtual_time_s"] for r in rows], acc, label=alg)
    ax_b.plot([r["bytes_up"] + r["bytes_down"] for r in rows], acc,
              label=alg)
  return _finish(plt, fig, (ax_t, ax_b), target, "test accuracy", path)


def _finish(plt, fig, axes, target, ylabel: str, path: str) -> str:
  """Labels the time and bytes panels, marks the target, saves ``path``."""
  ax_t, ax_b = axes
  for ax, xlabel in ((ax_t, "virtual time (s)"),
                     (ax_b, "bytes communicated (up + down)")):
    if target:
      ax.axhline(target, color="grey", ls=":", lw=1)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
  ax_b.set_xscale("log")
  ax_t.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    flags_lib.fail(f"unexpected positional arguments {argv[1:]}")
  try:
    per_alg = algorithm_args(flags_lib.given_args(FLAGS), FLAGS.algorithms,
                             FLAGS.algo_flags)
  except ValueError as e:
    flags_lib.fail(e)
  out_dir = FLAGS.compare_dir or os.path.join(
      "runs", "compare-" + time.strftime("%Y%m%d-%H%M%S"))
  if FLAGS.seeds:
    run_seeds(FLAGS, out_dir)
    return
  summaries, curves, failures = run_algorithms(per_alg, out_dir)
  _add_policies(summaries, per_alg)
  rows = comparison_rows(summaries, failures)
  target = next((s.get("target_accuracy") for s in summaries.values()), None)
  note = (f"\nTarget accuracy: {target}. speedup_vs_fedavg = 1 - "
          "t_target/t_target(fedavg), in virtual time; ratios are to "
          f"fedavg. {policy_note(per_alg)}\n")
  png = plot(curves, target, os.path.join(out_dir, "compare.png"))
  if png is None:
    note += ("\nNo plot: matplotlib is not installed (pip install "
             "'ftte_jax[plot]').\n")
  if failures:
    note += ("\nFailed (no values; their run.log says why): " + "; ".join(
        f"{alg} {status}" for alg, status in failures.items()) + ".\n")
  write_results(out_dir, "compare", sweep.markdown_table(rows) + note,
                {"rows": rows, "args": per_alg, "summaries": summaries,
                 "failures": failures}, png,
                failed=len(summaries) < len(per_alg))


def _policy(args: list[str]) -> str:
  return flags_lib.resolve_args(args).config.engine.memory_policy


def _add_policies(summaries: dict, per_alg: dict) -> None:
  for alg, s in summaries.items():
    s.setdefault("memory_policy", _policy(per_alg[alg]))


def policy_note(per_alg: dict[str, list[str]]) -> str:
  """Which memory policy each algorithm ran under, in words."""
  by = {}
  for alg, args in per_alg.items():
    by.setdefault(_policy(args), []).append(alg)
  words = {"exclude": "a device that cannot hold its mask's training memory "
                      "takes no part",
           "ignore": "every device trains whatever its memory (the setting "
                     "most favourable to full-model baselines)"}
  return "Memory policy: " + "; ".join(
      f"{'/'.join(algs)}: {p} ({words[p]})" for p, algs in by.items()) + "."


def seed_args(given: list[str], algorithms: list[str], algo_flags: list[str],
              seeds: list[int]) -> dict[int, dict[str, list[str]]]:
  """``algorithm_args`` for each seed (``--seed`` appended to the shared
  arguments), all validated before any run."""
  out = {}
  for seed in seeds:
    base = [a for a in given if not a.startswith("--seed=")]
    out[seed] = algorithm_args(base + [f"--seed={seed}"], algorithms,
                               algo_flags)
  return out


def run_seeded(per_seed: dict[int, dict[str, list[str]]], out_dir: str,
               parallel: int, extra_args: list[str]):
  """Runs every (seed, algorithm) in ``<out_dir>/seed<s>/<alg>``; a run
  whose ``summary.json`` exists is not run again (its workdir holds its
  config, which launch.main checks on resume).

  Returns:
    ``(summaries, curves)``: seed -> algorithm -> summary / metric rows, for
    the runs that finished; failures are logged and left out.
  """
  jobs = []
  for seed, per_alg in per_seed.items():
    for alg, args in per_alg.items():
      job = sweep.Job(f"seed{seed}/{alg}", {"algorithm": alg, "seed": seed},
                      args, workdir=os.path.abspath(os.path.join(
                          out_dir, f"seed{seed}", alg)))
      jobs.append(job)
  todo = [j for j in jobs if sweep.read_summary(j.workdir) is None]
  sweep.run_jobs(todo, parallel=parallel, extra_args=extra_args)
  prune_checkpoints(jobs)
  summaries, curves = {}, {}
  for job in jobs:
    seed, alg = job.values["seed"], job.values["algorithm"]
    s = sweep.read_summary(job.workdir)
    # A run kept from before (not run now) has no exit status: its summary
    # and stopped_by are the record.
    status = sweep.run_status(0 if job not in todo else job.returncode, s)
    if status != "ok":
      logging.error("%s %s: see %s", job.name, status,
                    os.path.join(job.workdir, "run.log"))
      continue
    s.setdefault("memory_policy", _policy(job.args))
    summaries.setdefault(seed, {})[alg] = s
    with open(os.path.join(job.workdir, "metrics.jsonl")) as f:
      curves.setdefault(seed, {})[alg] = [json.loads(line) for line in f]
  return summaries, curves, len(jobs)


def prune_checkpoints(jobs) -> None:
  """Deletes the checkpoints of the runs that finished: their summary and
  metrics are the record, and a study of hundreds of runs would otherwise
  keep every run's last states (hundreds of MB each with a long ring)."""
  for job in jobs:
    if sweep.read_summary(job.workdir) is not None:
      shutil.rmtree(os.path.join(job.workdir, "checkpoints"),
                    ignore_errors=True)


def seeded_rows(summaries, algorithms) -> tuple[list[dict], dict, dict]:
  """Table rows (text), per-algorithm summaries and paired contrasts."""
  from experiments import aggregate  # pylint: disable=g-import-not-at-top
  summary = {a: aggregate.summarize(summaries, a) for a in algorithms}
  contrast = aggregate.contrasts(summaries, algorithms, BASELINE, PEER)
  f = aggregate.fmt
  rows = []
  for a in algorithms:
    m, c = summary[a], contrast[a]
    policies = sorted({s[a].get("memory_policy") for s in summaries.values()
                       if a in s} - {None})
    rows.append({
        "algorithm": a, "seeds": m["seeds"],
        "final acc.": f(m["final_accuracy"]),
        f"acc. − {PEER}": f(c.get("accuracy_minus_" + PEER)),
        "time to target (s)": f(m["time_to_target_s"]),
        f"reduction vs {BASELINE}": f(c.get("reduction_vs_" + BASELINE),
                                      scale=100, unit="%"),
        "sustained (s)": f(m["time_to_target_sustained_s"]),
        "sustained reduction": f(c.get("sustained_reduction_vs_" + BASELINE),
                                 scale=100, unit="%"),
        "peak device RAM (MB)": f(m["peak_device_memory_bytes"], scale=1e-6),
        "memory ratio": f(c.get("memory_ratio_vs_" + BASELINE)),
        "upload/update (KB)": f(m["upload_bytes_per_update"], scale=1e-3),
        "upload ratio": f(c.get("upload_ratio_vs_" + BASELINE)),
        "energy (kJ)": f(m["energy_j"], scale=1e-3),
        "eligible devices": f(m["eligible_clients"]),
        "memory policy": "/".join(policies),
    })
  return rows, summary, contrast


def plot_bands(curves: dict, target, path: str) -> str | None:
  """Mean accuracy with its 95% band over seeds, against virtual time and
  against bytes communicated; None without matplotlib."""
  try:
    import matplotlib  # pylint: disable=g-import-not-at-top
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  from experiments import aggregate  # pylint: disable=g-import-not-at-top
  algs = sorted({a for per in curves.values() for a in per},
                key=lambda a: (a not in ALGORITHMS, a))
  fig, (ax_t, ax_b) = plt.subplots(1, 2, figsize=(11, 4))
  for alg in algs:
    runs = [per[alg] for per in curves.values() if alg in per]
    for r in runs:
      for row in r:
        row["bytes"] = row["bytes_up"] + row["bytes_down"]
    for ax, x in ((ax_t, "virtual_time_s"), (ax_b, "bytes")):
      grid, mean, lo, hi = aggregate.band(runs, x=x)
      on = grid > 0 if x == "bytes" else np.ones(grid.shape, bool)
      line, = ax.plot(grid[on], mean[on], label=f"{alg} (n={len(runs)})")
      # An accuracy band is drawn within [0, 1].
      ax.fill_between(grid[on], np.clip(lo[on], 0, 1), np.clip(hi[on], 0, 1),
                      color=line.get_color(), alpha=0.2)
  return _finish(plt, fig, (ax_t, ax_b), target,
                 "test accuracy (mean, 95% band)", path)


def run_seeds(fv, out_dir: str) -> None:
  """The ``--seeds`` comparison: run, summarize with intervals, write."""
  try:
    seeds = [int(x) for x in fv.seeds]
    per_seed = seed_args(flags_lib.given_args(fv), fv.algorithms,
                         fv.algo_flags, seeds)
  except ValueError as e:
    flags_lib.fail(e)
  summaries, curves, total = run_seeded(per_seed, out_dir, fv.parallel,
                                        flags_lib.checkpoint_args(fv))
  rows, summary, contrast = seeded_rows(summaries, fv.algorithms)
  target = next((s.get("target_accuracy") for per in summaries.values()
                 for s in per.values()), None)
  note = (f"\nMean ± 95% Student-t half width over seeds {seeds}. Target "
          f"accuracy {target}; reduction = 1 − t/t({BASELINE}) per seed, "
          f"over the seeds where both reached it ([k/n seeds] otherwise); "
          f"(k/n reached): only k of n seeds reached the target, and the "
          f"mean is over those. Ratios are to {BASELINE}, per seed. "
          f"{policy_note(per_seed[seeds[0]])}\n")
  png = plot_bands(curves, target, os.path.join(out_dir, "compare.png"))
  if png is None:
    note += ("\nNo plot: matplotlib is not installed (pip install "
             "'ftte_jax[plot]').\n")
  done = sum(len(v) for v in summaries.values())
  write_results(out_dir, "compare", sweep.markdown_table(rows) + note,
                {"seeds": seeds, "rows": rows, "summary": summary,
                 "contrasts": contrast, "args": per_seed,
                 "per_seed": summaries}, png, failed=done < total)


def write_results(out_dir: str, stem: str, md: str, data: dict,
                  png: str | None, failed: bool) -> None:
  """Writes ``<stem>.md`` and ``<stem>.json`` in ``out_dir``, prints the
  table and what was written, and exits 1 if a run ``failed``."""
  from ftte_jax import checkpointing  # pylint: disable=g-import-not-at-top
  os.makedirs(out_dir, exist_ok=True)
  checkpointing.write_text(os.path.join(out_dir, f"{stem}.md"), md)
  checkpointing.write_json(os.path.join(out_dir, f"{stem}.json"), data)
  print(md, flush=True)
  print(f"written: {os.path.join(out_dir, stem + '.md')}, {stem}.json"
        f"{f', {stem}.png' if png else ''}")
  if failed:
    sys.exit(1)


def run() -> None:
  flags_lib.run_app(define_flags, main)


if __name__ == "__main__":
  run()
