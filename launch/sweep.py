r"""Runs a grid of flag values and seeds as local ``launch.main`` processes.

  python -m launch.sweep --flagfile=experiments/smoke.flags \
      --grid=algorithm=ftte,fedbuff --grid=buffer_size=2,4 --seeds=0,1 \
      --parallel=2 --sweep_dir=runs/sweep-smoke

Every config flag of ``launch.main`` sets the shared base; each ``--grid``
names one flag and its values (comma separated; use ';' between values when
a value itself is a comma list, e.g. ``--grid='memory_tier_fractions=0.5,2;
1,2'``). The cartesian product times ``--seeds`` gives the runs; each gets
its own workdir under ``--sweep_dir`` (named after its values), its own log
(``run.log``), and all of them are validated before the first one starts.
Re-running the same sweep resumes unfinished runs from their checkpoints and
skips finished ones. At the end every ``summary.json`` is gathered into
``results.{md,csv,json}`` in ``--sweep_dir`` (plus a mean/std table over
seeds when there is more than one). A run that failed (any exit status but
0, or a summary with ``stopped_by`` "no_updates" or "divergence") is
listed with ``status`` "failed (...)" and no result values, is left out of
the means (``failed`` counts it), and makes the sweep exit 1.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import itertools
import json
import math
import os
import re
import subprocess
import sys
import time
from typing import Sequence

from absl import flags
from absl import logging

from launch import flags as flags_lib

FLAGS = flags.FLAGS

# Summary fields in the results table (summary.json has more).
COLUMNS = ("algorithm", "final_accuracy", "best_accuracy", "time_to_target_s",
           "rounds", "virtual_time_s", "client_updates",
           "client_updates_per_s", "peak_device_memory_bytes",
           "upload_bytes_per_update", "download_bytes_per_update",
           "mean_staleness", "updates_dropped", "wall_s", "params_sha256")
# Fields averaged over seeds.
AVERAGED = ("final_accuracy", "best_accuracy", "time_to_target_s",
            "client_updates_per_s", "mean_staleness", "wall_s")


def define_flags() -> None:
  """Registers the config (shared base), checkpoint and sweep flags."""
  flags_lib.define_config_flags()
  flags.DEFINE_multi_string(
      "grid", [], "NAME=V1,V2,...: one flag and the values it takes "
      "(';' separates values that themselves contain commas); repeat for "
      "more axes")
  flags.DEFINE_list("seeds", [], "seeds each grid point runs with (default: "
                    "the base --seed)")
  flags.DEFINE_integer("parallel", 1, "runs at once", lower_bound=1)
  flags.DEFINE_string("sweep_dir", None, "parent of the runs' workdirs and "
                      "of the results tables (default runs/sweep-<time>)")
  flags_lib.define_checkpoint_flags()


@dataclasses.dataclass
class Job:
  """One launch.main process."""

  name: str  # directory name under the sweep dir.
  values: dict  # grid flag -> value (strings), including seed.
  args: list  # launch.main arguments, without --workdir.
  workdir: str = ""
  returncode: int | None = None
  wall_s: float = 0.0


def parse_grid(specs: Sequence[str]) -> list[tuple[str, list[str]]]:
  """Parses ``NAME=V1,V2`` specs.

  Raises:
    ValueError: a spec without '=', an unknown flag, or no values.
  """
  axes = []
  for spec in specs:
    name, sep, values = spec.partition("=")
    name = name.strip().lstrip("-")
    if not sep:
      raise ValueError(f"grid: expected NAME=V1,V2,..., got {spec!r}")
    if name not in flags_lib.FLAG_NAMES:
      raise ValueError(f"grid: {name!r} is not a config flag of launch.main")
    vals = [v.strip() for v in values.split(";" if ";" in values else ",")]
    if not all(vals):
      raise ValueError(f"grid: empty value in {spec!r}")
    if name in (n for n, _ in axes):
      raise ValueError(f"grid: {name!r} given twice")
    axes.append((name, vals))
  return axes


def _dirname(values: dict) -> str:
  text = "_".join(f"{k}-{v}" for k, v in values.items()) or "base"
  return re.sub(r"[^A-Za-z0-9_.=-]+", "", text.replace(",", "+"))[:150]


def make_jobs(base_args: Sequence[str], axes, seeds: Sequence[str]
              ) -> list[Job]:
  """The cartesian product of the grid axes and seeds, validated.

  Raises:
    ValueError: a run whose configuration is invalid (names the run).
  """
  names = [n for n, _ in axes]
  jobs = []
  for combo in itertools.product(*(v for _, v in axes)):
    for seed in (seeds or [None]):
      values = dict(zip(names, combo))
      if seed is not None:
        values["seed"] = seed
      args = list(base_args) + [f"--{k}={v}" for k, v in values.items()]
      try:
        flags_lib.resolve_args(args)
      except ValueError as e:
        raise ValueError(f"run {_dirname(values)}: "
                         f"{flags_lib.one_line(e)}") from None
      jobs.append(Job(_dirname(values), values, args))
  return jobs


def run_jobs(jobs: Sequence[Job], parallel: int = 1,
             extra_args: Sequence[str] = (), poll_s: float = 0.2) -> None:
  """Runs ``python -m launch.main`` for each job, ``parallel`` at a time.

  Each job's stdout and stderr are appended to ``<workdir>/run.log``, after
  a line with the time and the command; its exit status is stored in
  ``job.returncode``.
  """
  pending = list(jobs)
  running: list[tuple[Job, subprocess.Popen, float, io.TextIOBase]] = []
  while pending or running:
    while pending and len(running) < parallel:
      job = pending.pop(0)
      os.makedirs(job.workdir, exist_ok=True)
      # Appended: a resumed sweep keeps the earlier attempts' logs, and a
      # run refused because another holds its workdir (launch.main's lock)
      # does not truncate the holder's log.
      log = open(os.path.join(job.workdir, "run.log"), "a")
      cmd = [sys.executable, "-m", "launch.main", *job.args,
             f"--workdir={job.workdir}", *extra_args]
      log.write(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')}: "
                f"{' '.join(cmd[1:])}\n")
      log.flush()
      logging.info("start %s", job.name)
      proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                              cwd=_repo_root())
      running.append((job, proc, time.perf_counter(), log))
    time.sleep(poll_s)
    for item in list(running):
      job, proc, t0, log = item
      if proc.poll() is None:
        continue
      log.close()
      job.returncode, job.wall_s = proc.returncode, time.perf_counter() - t0
      running.remove(item)
      logging.info("done  %s (exit %d, %.0fs)%s", job.name, job.returncode,
                   job.wall_s, "" if job.returncode == 0 else
                   f": see {os.path.join(job.workdir, 'run.log')}")


def _repo_root() -> str:
  return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def read_summary(workdir: str) -> dict | None:
  """A run's summary.json; None if missing or not a JSON object."""
  path = os.path.join(workdir, "summary.json")
  try:
    with open(path, encoding="utf-8") as f:
      summary = json.load(f)
  except (OSError, ValueError):
    return None
  return summary if isinstance(summary, dict) else None


def run_status(returncode: int | None, summary: dict | None) -> str:
  """'ok' for a run that finished and trained; else 'failed (why)', why
  being launch.main's exit status by name (``flags.EXIT_MEANINGS``), e.g.
  'failed (no_updates)' for a run in which no client update arrived."""
  stopped = (summary or {}).get("stopped_by")
  if returncode == 0 and summary is not None and stopped not in (
      "no_updates", "divergence"):
    return "ok"
  if stopped in ("no_updates", "divergence"):
    return f"failed ({stopped})"
  if returncode is None:
    return "failed (not run)"
  if returncode < 0:
    return f"failed (signal {-returncode})"
  return (f"failed ({flags_lib.EXIT_MEANINGS.get(returncode, 'exit')}, exit "
          f"{returncode})" if returncode else "failed (no summary)")


def gather(jobs: Sequence[Job]) -> list[dict]:
  """One row per job: its grid values, status, exit status and summary
  fields. A failed run's result fields are left empty: the untrained model
  of a run in which no update arrived is not a result."""
  rows = []
  for job in jobs:
    s = read_summary(job.workdir)
    status = run_status(job.returncode, s)
    row = {"run": job.name, **job.values, "status": status,
           "exit": job.returncode, "stopped_by": (s or {}).get("stopped_by")}
    ok = status == "ok"
    row.update({k: (s or {}).get(k) if ok or k == "algorithm" else None
                for k in COLUMNS})
    rows.append(row)
  return rows


def average_over_seeds(rows: list[dict], axes: Sequence[str]) -> list[dict]:
  """Mean and standard deviation of ``AVERAGED`` per grid point."""
  groups: dict[tuple, list[dict]] = {}
  for r in rows:
    groups.setdefault(tuple(r.get(a) for a in axes), []).append(r)
  out = []
  for key, members in groups.items():
    row = dict(zip(axes, key))
    row["seeds"] = len(members)
    row["failed"] = sum(m.get("status", "ok") != "ok" for m in members)
    for col in AVERAGED:
      vals = [m[col] for m in members if isinstance(m.get(col), (int, float))]
      # time_to_target is None when a seed never reached it: say how many did.
      if col == "time_to_target_s":
        row["reached_target"] = f"{len(vals)}/{len(members)}"
      if vals:
        mean = sum(vals) / len(vals)
        std = math.sqrt(sum((v - mean) ** 2 for v in vals) / len(vals))
        row[col] = mean
        row[col + "_std"] = std
      else:
        row[col], row[col + "_std"] = None, None
    out.append(row)
  return out


def _fmt(v) -> str:
  if v is None:
    return "-"
  if isinstance(v, float):
    return f"{v:.4g}"
  return str(v)


def markdown_table(rows: list[dict], columns: Sequence[str] | None = None
                   ) -> str:
  """A GitHub-flavoured markdown table of ``rows``."""
  if not rows:
    return "(no rows)\n"
  columns = list(columns or _columns(rows))
  lines = ["| " + " | ".join(columns) + " |",
           "|" + "|".join("---" for _ in columns) + "|"]
  for r in rows:
    lines.append("| " + " | ".join(_fmt(r.get(c)) for c in columns) + " |")
  return "\n".join(lines) + "\n"


def _columns(rows: list[dict]) -> list[str]:
  cols: list[str] = []
  for r in rows:
    cols += [k for k in r if k not in cols]
  return cols


def write_tables(directory: str, stem: str, rows: list[dict],
                 extra_md: str = "") -> None:
  """Writes ``<stem>.md``, ``<stem>.csv`` and ``<stem>.json``, atomically."""
  from ftte_jax import checkpointing  # pylint: disable=g-import-not-at-top
  os.makedirs(directory, exist_ok=True)
  md = markdown_table(rows, [c for c in _columns(rows)
                             if c != "params_sha256"]) + extra_md
  checkpointing.write_text(os.path.join(directory, stem + ".md"), md)
  buf = io.StringIO()
  writer = csv.DictWriter(buf, fieldnames=_columns(rows))
  writer.writeheader()
  writer.writerows(rows)
  checkpointing.write_text(os.path.join(directory, stem + ".csv"),
                           buf.getvalue())
  checkpointing.write_json(os.path.join(directory, stem + ".json"), rows)


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    flags_lib.fail(f"unexpected positional arguments {argv[1:]}")
  try:
    axes = parse_grid(FLAGS.grid)
    seeds = [str(int(s)) for s in FLAGS.seeds]
    jobs = make_jobs(flags_lib.given_args(FLAGS), axes, seeds)
  except ValueError as e:
    flags_lib.fail(e)
  sweep_dir = FLAGS.sweep_dir or os.path.join(
      "runs", "sweep-" + time.strftime("%Y%m%d-%H%M%S"))
  for job in jobs:
    job.workdir = os.path.abspath(os.path.join(sweep_dir, job.name))
  logging.info("%d runs, %d at a time, in %s", len(jobs), FLAGS.parallel,
               sweep_dir)
  run_jobs(jobs, FLAGS.parallel, flags_lib.checkpoint_args(FLAGS))

  rows = gather(jobs)
  names = [n for n, _ in axes]
  extra_md = ""
  if len(seeds) > 1:
    means = average_over_seeds(rows, names)
    write_tables(sweep_dir, "results_mean", means)
    extra_md = "\nMean (std) over seeds:\n\n" + markdown_table(means)
  write_tables(sweep_dir, "results", rows, extra_md)
  print(markdown_table(rows, ["run", "status", "final_accuracy",
                              "time_to_target_s", "client_updates_per_s",
                              "wall_s"]) + extra_md, flush=True)
  print(f"tables: {os.path.join(sweep_dir, 'results.{md,csv,json}')}")
  failed = [r["run"] for r in rows if r["status"] != "ok"]
  if failed:
    logging.error("%d run(s) failed: %s", len(failed), ", ".join(failed))
    sys.exit(1)


def run() -> None:
  flags_lib.run_app(define_flags, main)


if __name__ == "__main__":
  run()
