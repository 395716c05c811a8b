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
to FedAvg, upload payload per update and its ratio, mean staleness) and,
when matplotlib is importable (extra ``plot``), ``compare.png``: accuracy
over virtual time and over total bytes communicated.
"""

from __future__ import annotations

import json
import os
import sys
import time

from absl import flags
from absl import logging

from launch import flags as flags_lib
from launch import sweep

FLAGS = flags.FLAGS
ALGORITHMS = ("ftte", "fedbuff", "fedasync", "fedavg")
BASELINE = "fedavg"


def define_flags() -> None:
  flags_lib.define_config_flags()
  flags.DEFINE_list("algorithms", list(ALGORITHMS), "algorithms to compare "
                    f"(speed-up and ratios are against {BASELINE} when it is "
                    "among them)")
  flags.DEFINE_multi_string("algo_flags", [], "ALG:--flag=value, a flag for "
                            "one algorithm only (repeatable)")
  flags.DEFINE_string("compare_dir", None, "parent of the runs' workdirs and "
                      "of the tables (default runs/compare-<time>)")
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
    if alg not in ALGORITHMS:
      raise ValueError(f"algorithms: unknown {alg!r}; valid: "
                       f"{list(ALGORITHMS)}")
    try:
      args = flags_lib.for_algorithm(base, alg, extra[alg])
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
  for ax, xlabel in ((ax_t, "virtual time (s)"),
                     (ax_b, "bytes communicated (up + down)")):
    if target:
      ax.axhline(target, color="grey", ls=":", lw=1)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("test accuracy")
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
  summaries, curves, failures = run_algorithms(per_alg, out_dir)
  rows = comparison_rows(summaries, failures)
  target = next((s.get("target_accuracy") for s in summaries.values()), None)
  note = (f"\nTarget accuracy: {target}. speedup_vs_fedavg = 1 - "
          "t_target/t_target(fedavg), in virtual time; ratios are to "
          "fedavg.\n")
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
