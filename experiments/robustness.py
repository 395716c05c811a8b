r"""FedBuff and FTTE under malicious devices, with and without robust means.

  python -m experiments.robustness --out_dir=runs/robustness
  python -m experiments.robustness --behaviors=scale --fractions=0.3 ...

For each algorithm, each malicious behaviour (``ftte_jax.core.adversary``)
at each fraction of malicious devices (and once with none), and each
defence, one run on a shared setup: MNIST split by ``partition=sampled``
(Dirichlet(0.3) labels, 32 examples per device), an MLP fine-tuned from the
server's pretrained start, half the devices stragglers. Defences:

  none      the algorithm's own weighted mean;
  clip      each update clipped to the step's median update norm;
  trimmed   coordinate-wise trimmed mean, ``--trim_fraction`` at each end;
  median    coordinate-wise median.

Every config flag of ``launch.main`` changes the shared setup. Runs are in
process, one after another; finished cells are kept in
``<out_dir>/cells.jsonl``, so an interrupted study resumes. Writes
``robustness.md`` (final accuracy per cell, and whether every run's model
stayed finite) and ``robustness.json``.
"""

from __future__ import annotations

import json
import os
import time

import jax
import numpy as np
from absl import flags
from absl import logging

from ftte_jax import checkpointing
from ftte_jax import experiment
from ftte_jax.core import adversary
from launch import flags as flags_lib
from launch import sweep

FLAGS = flags.FLAGS
STUDY = (
    "--dataset=mnist", "--partition=sampled", "--dirichlet_alpha=0.3",
    "--examples_per_client=32", "--num_clients=200", "--model=mlp",
    "--straggler_fraction=0.5", "--straggler_slowdown=10", "--task_sigma=0.2",
    "--concurrency=40", "--buffer_size=10", "--local_steps=2",
    "--batch_size=32", "--client_lr=0.05", "--memory_policy=ignore",
    "--rounds=60", "--eval_every=20", "--first_download=deployed",
    "--trim_fraction=0.3")
DEFENCES = {
    "none": (),
    "clip": ("--clip=median",),
    "trimmed": ("--robust_aggregation=trimmed_mean",),
    "median": ("--robust_aggregation=median",),
}


def _define() -> None:
  flags_lib.define_config_flags()
  flags.DEFINE_list("algorithms", ["fedbuff", "ftte"], "algorithms compared")
  flags.DEFINE_list("behaviors", list(adversary.BEHAVIORS),
                    "malicious behaviours")
  flags.DEFINE_list("fractions", ["0.1", "0.3"],
                    "fractions of malicious devices (0 is always run)")
  flags.DEFINE_list("defences", list(DEFENCES), "defences compared")
  flags.DEFINE_string("out_dir", "runs/robustness", "where tables go")


def cells(algorithms, behaviors, fractions, defences) -> list[dict]:
  """Every (algorithm, behaviour, fraction, defence) of the study."""
  attacks = [("none", 0.0)] + [(b, float(f)) for b in behaviors
                               for f in fractions]
  return [dict(algorithm=a, behavior=b, fraction=f, defence=d)
          for a in algorithms for b, f in attacks for d in defences]


def cell_args(base: list[str], cell: dict) -> list[str]:
  """Config arguments of one cell: the shared setup, then the cell's."""
  attack = ([] if cell["fraction"] == 0 else
            [f"--malicious_fraction={cell['fraction']}",
             f"--malicious_behavior={cell['behavior']}"])
  return flags_lib.for_algorithm([*STUDY, *base], cell["algorithm"],
                                 [*attack, *DEFENCES[cell["defence"]]])


def run_cell(args: list[str]) -> dict:
  """Runs one cell in process; the summary fields the table needs."""
  config = flags_lib.resolve_args(args).config
  exp = experiment.build(config)
  state, history, timing = exp.run()
  s = exp.summary(state, history, timing)
  finite = all(bool(np.isfinite(np.asarray(x)).all())
               for x in jax.tree.leaves(state.params))
  keys = ("final_accuracy", "best_accuracy", "steps_refused",
          "updates_nonfinite", "updates_clipped", "values_trimmed",
          "values_robust", "client_updates", "malicious_clients",
          "malicious_updates_applied", "stopped_by", "rounds")
  return {"finite": finite, **{k: s.get(k) for k in keys}}


def table(rows: list[dict], defences) -> str:
  """Markdown: a row per (algorithm, attack), final accuracy per defence."""
  by = {}
  for r in rows:
    key = (r["algorithm"], r["behavior"], r["fraction"])
    by.setdefault(key, {})[r["defence"]] = r
  lines = ["| algorithm | malicious | " + " | ".join(defences) + " |",
           "|---|---|" + "---|" * len(defences)]
  for (alg, b, f), cols in by.items():
    attack = "none" if f == 0 else f"{f:.0%} {b}"
    vals = []
    for d in defences:
      r = cols.get(d)
      vals.append("" if r is None else
                  f"{r['final_accuracy']:.3f}" + ("" if r["finite"] else " ✗"))
    lines.append(f"| {alg} | {attack} | " + " | ".join(vals) + " |")
  finite = all(r["finite"] for r in rows)
  lines.append(f"\n{len(rows)} runs; every final model finite: "
               f"{'yes' if finite else 'NO (✗ marks the cells)'}.")
  return "\n".join(lines)


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    flags_lib.fail(f"unexpected positional arguments {argv[1:]}")
  bad = sorted(set(FLAGS.defences) - set(DEFENCES))
  if bad:
    flags_lib.fail(f"--defences: unknown {bad}; valid: {sorted(DEFENCES)}")
  base = flags_lib.given_args(FLAGS)
  todo = cells(FLAGS.algorithms, FLAGS.behaviors, FLAGS.fractions,
               FLAGS.defences)
  try:  # Bad input fails before the first run.
    for cell in todo:
      flags_lib.resolve_args(cell_args(base, cell))
  except ValueError as e:
    flags_lib.fail(e)
  os.makedirs(FLAGS.out_dir, exist_ok=True)
  done_path = os.path.join(FLAGS.out_dir, "cells.jsonl")
  done = {}
  if os.path.exists(done_path):
    with open(done_path) as f:
      for line in f:
        r = json.loads(line)
        done[(r["algorithm"], r["behavior"], r["fraction"], r["defence"])] = r
  for cell in todo:
    key = tuple(cell.values())
    if key in done:
      continue
    t0 = time.time()
    done[key] = {**cell, **run_cell(cell_args(base, cell)),
                 "wall_s": time.time() - t0}
    logging.info("%s: %.3f", key, done[key]["final_accuracy"])
    with open(done_path, "a") as f:
      f.write(json.dumps(done[key]) + "\n")
  rows = [done[tuple(c.values())] for c in todo]
  md = table(rows, FLAGS.defences)
  checkpointing.write_text(os.path.join(FLAGS.out_dir, "robustness.md"), md)
  checkpointing.write_json(os.path.join(FLAGS.out_dir, "robustness.json"),
                           {"args": [*STUDY, *base], "rows": rows})
  print(md, flush=True)


def run() -> None:
  flags_lib.run_app(_define, main)


if __name__ == "__main__":
  run()
