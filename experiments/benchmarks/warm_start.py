"""Benchmark: what a warm start costs with each kind of program cache.

Run (on a quiet machine; two cores are easily disturbed):

  FTTE_DATA_DIR=... python -m experiments.benchmarks.warm_start \
      [--models=mlp,lenet5] [--repeats=5] \
      [--out=experiments/benchmarks/results/warm_start_cpu.json]

A warm start builds the experiment and then needs the step program and the
evaluation of the FedJAX workload (``common.fedjax_workload``: FedAvg,
1,000 clients, K = 100, 5 local steps of batch 32; ``launch.main``'s CPU
device split). Four ways to get them, each timed in fresh processes, the
ways interleaved over the repeats:

* ``none``: no cache; trace, lower and compile.
* ``jax``: JAX's persistent compilation cache, warm (what ``launch.main``
  does): trace and lower, then the cache supplies the executable. Its key
  is the lowered program, so it cannot load a stale one.
* ``text_key``: a cache of serialized executables keyed by a hash of the
  lowered module's text and the arguments' types and placement (the
  stale-proof form of a hand-made program cache): trace, lower, hash, load.
* ``hand_key``: a cache of serialized executables keyed by a hand-written
  description of what the trace closes over (what ``ftte_jax`` had as
  ``program_cache.py``): no tracing at all, just load. Fastest, and the
  one that can load a stale program.

For each: the seconds of the build (alike for all, from a warm cache) and of
getting both programs, split into trace+lower, key and compile-or-load, and
whether one step then gives the same bits in every way. Writes a JSON.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import pickle
import statistics
import sys
import tempfile
import time

WAYS = ("none", "jax", "text_key", "hand_key")


def _setup(cache_dir: str):
  """This process as ``launch.main`` sets it up: CPU devices split, the
  persistent cache in ``cache_dir`` keeping every program."""
  from launch import flags as flags_lib  # pylint: disable=g-import-not-at-top
  flags_lib.set_cpu_devices("auto")
  flags_lib.enable_compilation_cache(cache_dir)


def _build(model: str, extra: str):
  from experiments.benchmarks import common  # pylint: disable=g-import-not-at-top
  from ftte_jax import experiment  # pylint: disable=g-import-not-at-top
  exp = experiment.build(common.fedjax_workload(
      model, "--rounds=4", *filter(None, extra.split(","))))
  return exp, exp.init_state()


def _programs(exp, state):
  return (("step", exp.step_fn, (exp.env, state)),
          ("evaluate", exp.eval_fn, (state.params, exp.test)))


def _text_key(lowered, args) -> str:
  """The key a stale-proof executable cache would use: the lowered text
  and the arguments' types and placement."""
  import jax  # pylint: disable=g-import-not-at-top
  h = hashlib.sha256(lowered.as_text().encode())
  for x in jax.tree.leaves(args):
    h.update(f"{jax.typeof(x).str_short()}|{getattr(x, 'sharding', None)!r}"
             .encode())
  return h.hexdigest()


def _hand_key(exp, name: str) -> str:
  """A hand-written description's key (the cost of making one)."""
  return hashlib.sha256(json.dumps(
      {"name": name, "config": repr(exp.config),
       "module": repr(exp.setup.model.module)}).encode()).hexdigest()


def _store(path: str, compiled) -> None:
  from jax.experimental import serialize_executable  # pylint: disable=g-import-not-at-top
  device_ids = [d.id for d in compiled.runtime_executable().local_devices()]
  with open(path, "wb") as f:
    pickle.dump((*serialize_executable.serialize(compiled), device_ids), f)


def _load(path: str):
  import jax  # pylint: disable=g-import-not-at-top
  from jax.experimental import serialize_executable  # pylint: disable=g-import-not-at-top
  with open(path, "rb") as f:
    payload, in_tree, out_tree, device_ids = pickle.load(f)
  by_id = {d.id: d for d in jax.local_devices()}
  return serialize_executable.deserialize_and_load(
      payload, in_tree, out_tree,
      execution_devices=[by_id[i] for i in device_ids])


def prepare_worker(model: str, extra: str, cache_dir: str,
                   exec_dir: str) -> None:
  """Fills JAX's cache (a whole run's programs) and the executable caches
  (fresh compiles: on XLA:CPU an executable JAX's cache loaded serializes
  without some of its kernels)."""
  import jax  # pylint: disable=g-import-not-at-top
  _setup(cache_dir)
  exp, state = _build(model, extra)
  exp.compile(state)  # into JAX's cache.
  jax.config.update("jax_enable_compilation_cache", False)
  for name, jitted, args in _programs(exp, state):
    lowered = jitted.lower(*args)
    compiled = lowered.compile()
    _store(os.path.join(exec_dir, f"text-{_text_key(lowered, args)}"),
           compiled)
    _store(os.path.join(exec_dir, f"hand-{_hand_key(exp, name)}"), compiled)
  print(json.dumps({"ok": True}))


def worker(model: str, extra: str, way: str, cache_dir: str,
           exec_dir: str) -> None:
  """Prints the seconds of one warm start's build and programs, and the
  SHA-256 of the parameters after one step."""
  t0 = time.perf_counter()
  _setup(cache_dir)
  import jax  # pylint: disable=g-import-not-at-top
  from ftte_jax import compilation  # pylint: disable=g-import-not-at-top
  from ftte_jax import experiment  # pylint: disable=g-import-not-at-top
  exp, state = _build(model, extra)
  jax.block_until_ready(state)
  build_s = time.perf_counter() - t0
  lower_s = key_s = get_s = 0.0
  t = time.perf_counter()
  if way in ("none", "jax"):
    jax.config.update("jax_enable_compilation_cache", way == "jax")
    # As compilation.compile_all, its two phases timed apart.
    lowered = {name: jitted.lower(*args)
               for name, jitted, args in _programs(exp, state)}
    lower_s = time.perf_counter() - t
    programs, status = compilation.compile_lowered(lowered)
    get_s = time.perf_counter() - t - lower_s
  else:
    jax.config.update("jax_enable_compilation_cache", False)
    programs, status = {}, {}
    for name, jitted, args in _programs(exp, state):
      t1 = time.perf_counter()
      if way == "text_key":
        lowered = jitted.lower(*args)
        t2 = time.perf_counter()
        key = "text-" + _text_key(lowered, args)
        lower_s += t2 - t1
      else:
        t2 = time.perf_counter()
        key = "hand-" + _hand_key(exp, name)
      t3 = time.perf_counter()
      key_s += t3 - t2
      programs[name] = _load(os.path.join(exec_dir, key))
      get_s += time.perf_counter() - t3
      status[name] = "loaded"
  programs_s = time.perf_counter() - t
  new_state, _ = programs["step"](exp.env, state)
  out = programs["evaluate"](new_state.params, exp.test)
  jax.block_until_ready(out)
  print(json.dumps({
      "build_s": build_s, "programs_s": programs_s, "trace_lower_s": lower_s,
      "key_s": key_s, "compile_or_load_s": get_s, "status": status,
      "sha": experiment.params_sha256(new_state.params)}))


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--models", default="mlp,lenet5")
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--extra", default="", help="comma-separated launch flags "
                 "after the workload's (a smoke test: --dataset=tiny,...)")
  p.add_argument("--out", default=os.path.join(
      os.path.dirname(__file__), "results", "warm_start_cpu.json"))
  p.add_argument("--prepare_worker", nargs=3, help=argparse.SUPPRESS)
  p.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
  a = p.parse_args()
  if a.prepare_worker:
    prepare_worker(a.prepare_worker[0], a.extra, *a.prepare_worker[1:])
    return
  if a.worker:
    worker(a.worker[0], a.extra, *a.worker[1:])
    return
  from experiments.benchmarks import common  # pylint: disable=g-import-not-at-top
  me = "experiments.benchmarks.warm_start"
  rows = []
  for model in a.models.split(","):
    with tempfile.TemporaryDirectory() as tmp:
      cache_dir, exec_dir = (os.path.join(tmp, d) for d in ("jax", "exec"))
      os.makedirs(exec_dir)
      common.worker_json(me, f"--extra={a.extra}", "--prepare_worker", model,
                         cache_dir, exec_dir)
      runs = {w: [] for w in WAYS}
      shas = set()
      for _ in range(a.repeats):
        for way in WAYS:  # interleaved, so drift in load hits every way.
          r = common.worker_json(me, f"--extra={a.extra}", "--worker",
                                 model, way, cache_dir, exec_dir)
          shas.add(r.pop("sha"))
          runs[way].append(r)
    row = {"model": model, "same_bits": len(shas) == 1, "runs": runs}
    for way in WAYS:
      row[way] = {k: statistics.median(r[k] for r in runs[way])
                  for k in ("build_s", "programs_s", "trace_lower_s",
                            "key_s", "compile_or_load_s")}
      row[way]["status"] = runs[way][-1]["status"]
    rows.append(row)
    for way in WAYS:
      m = row[way]
      print(f"{model} {way:>8}: programs {m['programs_s']:.2f} s (trace+lower "
            f"{m['trace_lower_s']:.2f}, key {m['key_s']:.3f}, compile/load "
            f"{m['compile_or_load_s']:.2f}); build {m['build_s']:.2f} s; "
            f"{m['status']}", flush=True)
    print(f"{model}: same bits in every way: {row['same_bits']}", flush=True)
  common.write_report(a.out, {"machine": common.machine(),
                              "argv": sys.argv[1:], "rows": rows})


if __name__ == "__main__":
  main()
