"""Benchmark: two start-up choices, each measured both ways.

Run: python -m experiments.benchmarks.startup [--models=mlp,lenet5]
     [--repeats=3] [--step_repeats=2]
     [--out=experiments/benchmarks/results/startup_cpu.json]

1. One-shot compiler options. A run's model init and round-0 state run
   once, so XLA's default optimization (level 3, newer fusion emitters)
   buys them nothing; ``ftte_jax.core.one_shot`` compiles them at level 2
   with the elemental emitters. For each model this times compiling and
   running ``module.init`` both ways, and the round-0 state of the FedJAX
   workload (below) both ways. The evaluation (a few runs a run, its time
   in the model's dots) compiles with the same options
   (``experiment.run.evaluate_compiler_options``): its compile time both
   ways, and its run time (median of 7 calls after the first).
2. Rolled local steps. The FedJAX workload's step (``vs_fedjax.py``:
   FedAvg, 1,000 clients, K = 100, 5 local steps of batch 32) with the
   local-step loop rolled (``--unroll_local_steps=false``, the default) and
   fully unrolled: seconds to compile the step, and seconds per step (mean
   of 3 after the first).

3. Host keys. The run's named keys (``jax.random.PRNGKey`` and
   ``fold_in`` outside jit) computed by ``jax.random``, which compiles a
   program for each the first time in a process, or on the host by
   ``ftte_jax.core.keys``: seconds for a root key and two folds.

Every measurement runs in a fresh process with the persistent compilation
cache off, the two settings interleaved over the repeats, and checks that
both settings give the same bits. Prints the machine and the medians;
writes a JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

SHAPES = {"mlp": (1, 28, 28, 1), "lenet5": (1, 28, 28, 1),
          "resnet8": (1, 32, 32, 3)}


def worker(model: str, level: str) -> None:
  """Prints ``{"compile_s", "sha"}`` of one init compiled at ``level``."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from ftte_jax import experiment  # pylint: disable=g-import-not-at-top
  from ftte_jax import models  # pylint: disable=g-import-not-at-top
  from ftte_jax.core import one_shot  # pylint: disable=g-import-not-at-top
  jax.config.update("jax_enable_compilation_cache", False)
  module = models.get_model(model, 10)
  jit = one_shot.jit if level == "one_shot" else jax.jit
  args = (jax.random.PRNGKey(0), np.zeros(SHAPES[model], np.float32))
  # A first trace outside the timing, alike for both settings (the timed
  # call, a fresh jit, still traces).
  jax.jit(module.init).lower(*args)
  t = time.perf_counter()
  params = jax.block_until_ready(jit(module.init)(*args))
  seconds = time.perf_counter() - t
  print(json.dumps({"compile_s": seconds,
                    "sha": experiment.params_sha256(params)}))


def state_worker(model: str, level: str) -> None:
  """Prints ``{"compile_s", "sha"}`` of the workload's round-0 state."""
  import jax  # pylint: disable=g-import-not-at-top
  from ftte_jax import experiment  # pylint: disable=g-import-not-at-top
  from ftte_jax.core import one_shot  # pylint: disable=g-import-not-at-top
  jax.config.update("jax_enable_compilation_cache", False)
  exp = experiment.build(_workload(model, "false"))
  if level != "one_shot":
    one_shot.jit = jax.jit  # the default options.
  exp.init_state()  # traced and compiled once, outside the timing.
  jax.clear_caches()
  t = time.perf_counter()
  state = jax.block_until_ready(exp.init_state())
  seconds = time.perf_counter() - t
  print(json.dumps({"compile_s": seconds,
                    "sha": experiment.params_sha256(
                        jax.tree.leaves(state))}))


def eval_worker(model: str, level: str) -> None:
  """Prints ``{"compile_s", "run_s", "sha"}`` of the workload's
  evaluation compiled with the default or the one-shot options."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from ftte_jax import experiment  # pylint: disable=g-import-not-at-top
  from ftte_jax.core import one_shot  # pylint: disable=g-import-not-at-top
  jax.config.update("jax_enable_compilation_cache", False)
  exp = experiment.build(_workload(model, "false"))
  options = one_shot.compiler_options() if level == "one_shot" else {}
  args = (exp.setup.model.params, exp.test)
  lowered = jax.jit(exp.sim.evaluate, compiler_options=options).lower(*args)
  t = time.perf_counter()
  compiled = lowered.compile()
  compile_s = time.perf_counter() - t
  out = jax.block_until_ready(compiled(*args))
  times = []
  for _ in range(7):
    t = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    times.append(time.perf_counter() - t)
  print(json.dumps({"compile_s": compile_s,
                    "run_s": statistics.median(times),
                    "sha": experiment.params_sha256(
                        [np.asarray(out[k]) for k in sorted(out)])}))


def keys_worker(how: str) -> None:
  """Prints ``{"compile_s", "sha"}``: seconds to derive a root key and two
  folds with ``jax.random`` or ``ftte_jax.core.keys`` (a fresh process)."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from ftte_jax import experiment  # pylint: disable=g-import-not-at-top
  from ftte_jax.core import keys  # pylint: disable=g-import-not-at-top
  jax.config.update("jax_enable_compilation_cache", False)
  root, fold_in = ((keys.root, keys.fold_in) if how == "host" else
                   (jax.random.PRNGKey, jax.random.fold_in))
  t = time.perf_counter()
  key = jax.block_until_ready(fold_in(fold_in(root(0), 7), 3))
  seconds = time.perf_counter() - t
  print(json.dumps({"compile_s": seconds,
                    "sha": experiment.params_sha256([np.asarray(key)])}))


def _workload(model: str, unroll: str):
  """The config of vs_fedjax.py's workload (default client_chunk)."""
  from experiments.benchmarks import common  # pylint: disable=g-import-not-at-top
  return common.fedjax_workload(model, "--rounds=4",
                                f"--unroll_local_steps={unroll}")


def step_worker(model: str, unroll: str) -> None:
  """Prints ``{"compile_s", "step_s", "sha"}`` of the FedJAX workload."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from ftte_jax import experiment  # pylint: disable=g-import-not-at-top
  jax.config.update("jax_enable_compilation_cache", False)
  exp = experiment.build(_workload(model, unroll))
  state = exp.init_state()
  lowered = exp.step_fn.lower(exp.env, state)
  t = time.perf_counter()
  lowered.compile()
  compile_s = time.perf_counter() - t
  state, _ = exp.step_fn(exp.env, state)
  jax.block_until_ready(state)
  t = time.perf_counter()
  for _ in range(3):
    state, _ = exp.step_fn(exp.env, state)
  jax.block_until_ready(state)
  step_s = (time.perf_counter() - t) / 3
  print(json.dumps({"compile_s": compile_s, "step_s": step_s,
                    "sha": experiment.params_sha256(state.params)}))


def _interleaved(worker: str, model: str, settings: tuple,
                 repeats: int) -> tuple[dict, bool]:
  """{setting: [result dicts]} and whether every run gave the same bits."""
  from experiments.benchmarks import common  # pylint: disable=g-import-not-at-top
  runs = {s: [] for s in settings}
  shas = set()
  for _ in range(repeats):
    for setting in settings:  # interleaved, so drift in load hits both.
      r = common.worker_json("experiments.benchmarks.startup",
                             f"--{worker}", model, setting)
      shas.add(r.pop("sha"))
      runs[setting].append(r)
  return runs, len(shas) == 1


def _median(runs: list[dict], key: str) -> float:
  return statistics.median(r[key] for r in runs)


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--models", default="mlp,lenet5")
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--step_repeats", type=int, default=2)
  p.add_argument("--out", default=os.path.join(
      os.path.dirname(__file__), "results", "startup_cpu.json"))
  p.add_argument("--worker", nargs=2, metavar=("MODEL", "LEVEL"),
                 help=argparse.SUPPRESS)
  p.add_argument("--step_worker", nargs=2, metavar=("MODEL", "UNROLL"),
                 help=argparse.SUPPRESS)
  p.add_argument("--state_worker", nargs=2, metavar=("MODEL", "LEVEL"),
                 help=argparse.SUPPRESS)
  p.add_argument("--eval_worker", nargs=2, metavar=("MODEL", "LEVEL"),
                 help=argparse.SUPPRESS)
  p.add_argument("--keys_worker", nargs=2, metavar=("UNUSED", "HOW"),
                 help=argparse.SUPPRESS)
  a = p.parse_args()
  if a.worker:
    worker(*a.worker)
    return
  if a.step_worker:
    step_worker(*a.step_worker)
    return
  if a.state_worker:
    state_worker(*a.state_worker)
    return
  if a.eval_worker:
    eval_worker(*a.eval_worker)
    return
  if a.keys_worker:
    keys_worker(a.keys_worker[1])
    return
  from experiments.benchmarks import common  # pylint: disable=g-import-not-at-top
  rows, steps = [], []
  for model in a.models.split(","):
    for what, worker_flag in (("init", "worker"),
                              ("round-0 state", "state_worker"),
                              ("evaluation", "eval_worker")):
      runs, same = _interleaved(worker_flag, model,
                                ("default", "one_shot"), a.repeats)
      row = {"model": model, "program": what,
             "default_s": _median(runs["default"], "compile_s"),
             "one_shot_s": _median(runs["one_shot"], "compile_s"),
             "runs": runs, "same_bits": same}
      row["speedup"] = row["default_s"] / row["one_shot_s"]
      rows.append(row)
      kind = "compile" if what == "evaluation" else "compile+run"
      print(f"{model} {what}: {kind} {row['default_s']:.2f} s default, "
            f"{row['one_shot_s']:.2f} s one-shot ({row['speedup']:.2f}x); "
            f"same bits: {same}", flush=True)
      if what == "evaluation":
        row["default_run_s"] = _median(runs["default"], "run_s")
        row["one_shot_run_s"] = _median(runs["one_shot"], "run_s")
        print(f"{model} evaluation: run {row['default_run_s'] * 1e3:.1f} ms "
              f"default, {row['one_shot_run_s'] * 1e3:.1f} ms one-shot",
              flush=True)
  for model in a.models.split(","):
    runs, same = _interleaved("step_worker", model, ("false", "true"),
                              a.step_repeats)
    row = {"model": model, "runs": runs, "same_bits": same}
    for unroll, name in (("false", "rolled"), ("true", "unrolled")):
      row[f"{name}_compile_s"] = _median(runs[unroll], "compile_s")
      row[f"{name}_step_s"] = _median(runs[unroll], "step_s")
    steps.append(row)
    print(f"{model} step: compile {row['rolled_compile_s']:.2f} s rolled, "
          f"{row['unrolled_compile_s']:.2f} s unrolled; per step "
          f"{row['rolled_step_s']:.3f} s rolled, {row['unrolled_step_s']:.3f} "
          f"s unrolled; same bits: {same}", flush=True)
  runs, same = _interleaved("keys_worker", "-", ("jax", "host"),
                            a.repeats)
  key_row = {"jax_s": _median(runs["jax"], "compile_s"),
             "host_s": _median(runs["host"], "compile_s"), "runs": runs,
             "same_bits": same}
  print(f"named keys: {key_row['jax_s']:.3f} s jax.random, "
        f"{key_row['host_s']:.4f} s on the host; same bits: {same}",
        flush=True)
  report = {"machine": common.machine(), "argv": sys.argv[1:],
            "init": rows, "local_steps_loop": steps, "keys": key_row}
  common.write_report(a.out, report)


if __name__ == "__main__":
  main()
