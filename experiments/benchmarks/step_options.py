"""Benchmark: the step's XLA options on the CPU, XLA's defaults against ours.

Run: python -m experiments.benchmarks.step_options [--models=mlp,lenet5]
     [--compile_repeats=3] [--steps=10]
     [--out=experiments/benchmarks/results/step_options_cpu.json]

The workload is the FedJAX one of ``vs_fedjax.py`` (FedAvg, 1,000 clients,
K = 100, 5 local SGD steps of batch 32, the default ``client_chunk``). The
server step is compiled three ways:

  default: XLA's default options (``jax.jit`` with none);
  level2:  LLVM optimization level 2 alone;
  ours:    ``experiment.run.step_compiler_options()``, what runs use (on
           the CPU: level 2 and no YNNPACK dot fusions).

* compile: seconds to compile the step, each in a fresh process with the
  persistent compilation cache off, the settings interleaved over the
  repeats (median).
* step: seconds per step. One process compiles all three and steps them in
  turn, each from the same round-0 state, so a burst of load on the shared
  machine hits every setting; the median over ``--steps`` rounds after the
  first.
* agreement: the largest absolute difference of the final parameters from
  the default's (the settings round differently; they compute the same).

Prints the machine and a table; writes a JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

SETTINGS = ("default", "level2", "ours")


def _options(setting: str) -> dict:
  from ftte_jax.experiment import run  # pylint: disable=g-import-not-at-top
  return {"default": {}, "level2": {"xla_backend_optimization_level": 2},
          "ours": run.step_compiler_options()}[setting]


def _build(model: str):
  """The built experiment of the workload and its round-0 state."""
  import jax  # pylint: disable=g-import-not-at-top
  from experiments.benchmarks import common  # pylint: disable=g-import-not-at-top
  from ftte_jax import experiment  # pylint: disable=g-import-not-at-top
  jax.config.update("jax_enable_compilation_cache", False)
  exp = experiment.build(common.fedjax_workload(model))
  return exp, exp.init_state()


def compile_worker(model: str, setting: str) -> None:
  """Prints ``{"compile_s"}``: one compile of the step (fresh process)."""
  import jax  # pylint: disable=g-import-not-at-top
  exp, state = _build(model)
  lowered = jax.jit(exp.sim.step, compiler_options=_options(setting)).lower(
      exp.env, state)
  t = time.perf_counter()
  lowered.compile()
  print(json.dumps({"compile_s": time.perf_counter() - t}))


def step_worker(model: str, steps: int) -> None:
  """Prints ``{setting: {"step_s", "max_abs_diff"}}``: the three settings
  compiled in one process and stepped in turn."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  exp, state0 = _build(model)
  fns = {s: jax.jit(exp.sim.step, compiler_options=_options(s)).lower(
      exp.env, state0).compile() for s in SETTINGS}
  states = dict.fromkeys(SETTINGS, state0)
  times = {s: [] for s in SETTINGS}
  for _ in range(steps + 1):
    for s in SETTINGS:
      t = time.perf_counter()
      states[s] = jax.block_until_ready(fns[s](exp.env, states[s])[0])
      times[s].append(time.perf_counter() - t)
  ref = jax.tree.leaves(jax.device_get(states["default"].params))
  out = {}
  for s in SETTINGS:
    got = jax.tree.leaves(jax.device_get(states[s].params))
    out[s] = {"step_s": statistics.median(times[s][1:]),
              "max_abs_diff": max(float(np.max(np.abs(a - b)))
                                  for a, b in zip(got, ref))}
  print(json.dumps(out))


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--models", default="mlp,lenet5")
  p.add_argument("--compile_repeats", type=int, default=3)
  p.add_argument("--steps", type=int, default=10)
  p.add_argument("--out", default=os.path.join(
      os.path.dirname(__file__), "results", "step_options_cpu.json"))
  p.add_argument("--compile_worker", nargs=2, metavar=("MODEL", "SETTING"),
                 help=argparse.SUPPRESS)
  p.add_argument("--step_worker", metavar="MODEL", help=argparse.SUPPRESS)
  a = p.parse_args()
  if a.compile_worker:
    compile_worker(*a.compile_worker)
    return
  if a.step_worker:
    step_worker(a.step_worker, a.steps)
    return
  from experiments.benchmarks import common  # pylint: disable=g-import-not-at-top
  rows = []
  me = "experiments.benchmarks.step_options"
  for model in a.models.split(","):
    compiles = {s: [] for s in SETTINGS}
    for _ in range(a.compile_repeats):
      for s in SETTINGS:  # interleaved, so drift in load hits all three.
        compiles[s].append(common.worker_json(
            me, "--compile_worker", model, s)["compile_s"])
    stepped = common.worker_json(me, "--step_worker", model,
                                 f"--steps={a.steps}")
    row = {"model": model, "compile_runs": compiles}
    for s in SETTINGS:
      row[s] = {"compile_s": statistics.median(compiles[s]), **stepped[s]}
    rows.append(row)
    d = row["default"]
    for s in SETTINGS:
      r = row[s]
      print(f"{model:7s} {s:8s} compile {r['compile_s']:5.2f} s "
            f"({r['compile_s'] / d['compile_s']:.2f}x)  step "
            f"{r['step_s'] * 1e3:7.1f} ms ({r['step_s'] / d['step_s']:.2f}x)"
            f"  max |params - default's| {r['max_abs_diff']:.2g}",
            flush=True)
  from ftte_jax.experiment import run  # pylint: disable=g-import-not-at-top
  report = {"machine": common.machine(), "argv": sys.argv[1:],
            "ours": run.step_compiler_options(), "rows": rows}
  common.write_report(a.out, report)


if __name__ == "__main__":
  main()
