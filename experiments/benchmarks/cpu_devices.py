"""Benchmark: the host CPU as one XLA device against one device per core.

Run: python -m experiments.benchmarks.cpu_devices [--models=mlp,lenet5]
     [--devices=auto] [--steps=10]
     [--out=experiments/benchmarks/results/cpu_devices_cpu.json]

The workload is the FedJAX one of ``vs_fedjax.py`` (FedAvg, 1,000 clients,
K = 100, 5 local SGD steps of batch 32, the default ``client_chunk``).
One process per model splits the CPU into D XLA devices
(``launch.flags.set_cpu_devices``; ``--devices=auto`` is what
``launch.main``'s default ``--cpu_devices=auto`` gives on this machine) and
builds the workload twice: on one device (``--mesh_devices=1``, as before
the split) and on the D-device clients mesh (``--mesh_devices=D``, what a
run now uses). The two compiled steps run in turn from the same round-0
state, so a burst of load on the shared machine hits both.

* step: median seconds per step over ``--steps`` rounds after the first.
* compile: seconds to compile each step (persistent caches off).
* agreement: the largest absolute difference of the final parameters
  (sums over the devices' clients are taken in another order).
* one_device_process: the one-device step timed in a separate process
  that was not split, to show the split costs a one-device run nothing.

Prints the machine and a table; writes a JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time


def _worker(model: str, devices: str, steps: int) -> None:
  """Prints ``{"devices", "runs": {label: {"step_s", "compile_s"}},
  "max_abs_diff"}`` for the one-device and the D-device step."""
  from launch import flags as flags_lib  # pylint: disable=g-import-not-at-top
  count = flags_lib.set_cpu_devices(devices) if devices != "none" else None
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from experiments.benchmarks import common  # pylint: disable=g-import-not-at-top
  from ftte_jax import experiment  # pylint: disable=g-import-not-at-top
  jax.config.update("jax_enable_compilation_cache", False)
  d = len(jax.devices())
  labels = {"one_device": 1} if count is None else {"one_device": 1,
                                                    "mesh": d}
  exps, fns, states, compile_s = {}, {}, {}, {}
  for label, mesh in labels.items():
    exp = experiment.build(common.fedjax_workload(
        model, f"--mesh_devices={mesh}"))
    state = exp.init_state()
    t = time.perf_counter()
    fns[label] = exp.step_fn.lower(exp.env, state).compile()
    compile_s[label] = time.perf_counter() - t
    exps[label], states[label] = exp, state
  times = {label: [] for label in labels}
  for _ in range(steps + 1):
    for label in labels:
      t = time.perf_counter()
      states[label] = jax.block_until_ready(
          fns[label](exps[label].env, states[label])[0])
      times[label].append(time.perf_counter() - t)
  out = {"devices": d, "runs": {
      label: {"step_s": statistics.median(times[label][1:]),
              "compile_s": compile_s[label],
              "mesh_devices": exps[label].num_devices} for label in labels}}
  if "mesh" in labels:
    a, b = (jax.tree.leaves(jax.device_get(states[label].params))
            for label in ("one_device", "mesh"))
    out["max_abs_diff"] = max(float(np.max(np.abs(x - y)))
                              for x, y in zip(a, b))
  print(json.dumps(out))


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--models", default="mlp,lenet5")
  p.add_argument("--devices", default="auto",
                 help="launch.main's --cpu_devices value to compare with "
                 "one device")
  p.add_argument("--steps", type=int, default=10)
  p.add_argument("--out", default=os.path.join(
      os.path.dirname(__file__), "results", "cpu_devices_cpu.json"))
  p.add_argument("--worker", nargs=2, metavar=("MODEL", "DEVICES"),
                 help=argparse.SUPPRESS)
  a = p.parse_args()
  if a.worker:
    _worker(*a.worker, a.steps)
    return
  from experiments.benchmarks import common  # pylint: disable=g-import-not-at-top
  from launch import flags as flags_lib  # pylint: disable=g-import-not-at-top
  if flags_lib.cpu_devices_count(a.devices) in (None, 1):
    sys.exit(f"--devices={a.devices} gives one device on this machine: "
             "nothing to compare")
  me = "experiments.benchmarks.cpu_devices"
  rows = []
  for model in a.models.split(","):
    split = common.worker_json(me, "--worker", model, a.devices,
                               f"--steps={a.steps}")
    plain = common.worker_json(me, "--worker", model, "none",
                               f"--steps={a.steps}")
    one, mesh = split["runs"]["one_device"], split["runs"]["mesh"]
    row = {"model": model, "devices": split["devices"], **split["runs"],
           "max_abs_diff": split["max_abs_diff"],
           "one_device_process": plain["runs"]["one_device"],
           "speedup": one["step_s"] / mesh["step_s"]}
    rows.append(row)
    print(f"{model:7s} step: 1 device {one['step_s'] * 1e3:7.1f} ms "
          f"(unsplit process {row['one_device_process']['step_s'] * 1e3:.1f}"
          f" ms), {split['devices']} devices {mesh['step_s'] * 1e3:7.1f} ms "
          f"({row['speedup']:.2f}x); compile {one['compile_s']:.2f} s / "
          f"{mesh['compile_s']:.2f} s; max |params diff| "
          f"{row['max_abs_diff']:.2g}", flush=True)
  report = {"machine": common.machine(), "argv": sys.argv[1:], "rows": rows}
  common.write_report(a.out, report)


if __name__ == "__main__":
  main()
