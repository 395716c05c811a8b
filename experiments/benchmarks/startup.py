"""Benchmark: compiling the start-up programs at XLA level 2 against 3.

Run: python -m experiments.benchmarks.startup [--models=mlp,lenet5]
     [--repeats=3] [--out=experiments/benchmarks/results/startup_cpu.json]

A run's model init runs once, so XLA's default backend optimization level 3
buys it nothing; ``ftte_jax.core.one_shot`` compiles it (and the round-0
state and the deadline) at level 2. For each model this times compiling
``module.init`` both ways, each in a fresh process with the persistent
compilation cache off, interleaved over ``--repeats``, and checks that both
programs give the same parameter bits. Prints the machine and the median
seconds; writes a JSON.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import time

SHAPES = {"mlp": (1, 28, 28, 1), "lenet5": (1, 28, 28, 1),
          "resnet8": (1, 32, 32, 3)}


def worker(model: str, level: str) -> None:
  """Prints ``{"compile_s", "sha"}`` of one init compiled at ``level``."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from ftte_jax import models  # pylint: disable=g-import-not-at-top
  from ftte_jax.core import one_shot  # pylint: disable=g-import-not-at-top
  jax.config.update("jax_enable_compilation_cache", False)
  module = models.get_model(model, 10)
  jit = one_shot.jit if level == "one_shot" else jax.jit
  args = (jax.random.PRNGKey(0), np.zeros(SHAPES[model], np.float32))
  lowered = jax.jit(module.init).lower(*args)  # traced outside the timing.
  del lowered
  t = time.perf_counter()
  params = jax.block_until_ready(jit(module.init)(*args))
  seconds = time.perf_counter() - t
  sha = hashlib.sha256(b"".join(np.asarray(x).tobytes()
                                for x in jax.tree.leaves(params))).hexdigest()
  print(json.dumps({"compile_s": seconds, "sha": sha}))


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--models", default="mlp,lenet5")
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--out", default=os.path.join(
      os.path.dirname(__file__), "results", "startup_cpu.json"))
  p.add_argument("--worker", nargs=2, metavar=("MODEL", "LEVEL"),
                 help=argparse.SUPPRESS)
  a = p.parse_args()
  if a.worker:
    worker(*a.worker)
    return
  from experiments.benchmarks import common  # pylint: disable=g-import-not-at-top
  repo = os.path.dirname(os.path.dirname(os.path.dirname(
      os.path.abspath(__file__))))
  rows = []
  for model in a.models.split(","):
    runs = {"default": [], "one_shot": []}
    shas = set()
    for _ in range(a.repeats):
      for level in runs:  # interleaved, so drift in load hits both.
        out = subprocess.run(
            [sys.executable, "-m", "experiments.benchmarks.startup",
             "--worker", model, level], cwd=repo, capture_output=True,
            text=True, check=True).stdout.splitlines()[-1]
        r = json.loads(out)
        runs[level].append(r["compile_s"])
        shas.add(r["sha"])
    row = {"model": model, "level3_s": statistics.median(runs["default"]),
           "level2_s": statistics.median(runs["one_shot"]), "runs": runs,
           "same_bits": len(shas) == 1}
    row["speedup"] = row["level3_s"] / row["level2_s"]
    rows.append(row)
    print(f"{model}: init compile+run {row['level3_s']:.2f} s at level 3, "
          f"{row['level2_s']:.2f} s at level 2 ({row['speedup']:.2f}x); "
          f"same bits: {row['same_bits']}", flush=True)
  report = {"machine": common.machine(), "argv": sys.argv[1:], "rows": rows}
  print(report["machine"])
  os.makedirs(os.path.dirname(a.out), exist_ok=True)
  with open(a.out, "w") as f:
    json.dump(report, f, indent=1)


if __name__ == "__main__":
  main()
