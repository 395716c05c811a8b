"""Helpers shared by the benchmark and experiment scripts: machine, timing,
the FedJAX workload, worker subprocesses and reports."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time

import jax

REPO = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))


def machine() -> str:
  """One line naming the machine the numbers come from."""
  dev = jax.devices()[0]
  cpu = platform.processor() or platform.machine()
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          cpu = line.split(":", 1)[1].strip()
          break
  except OSError:
    pass
  return (f"{platform.system()} {platform.machine()}, {os.cpu_count()} cores "
          f"({cpu}); jax {jax.__version__} backend={jax.default_backend()} "
          f"device={dev.device_kind}")


def best_time(fn, repeats: int = 3, number: int = 1) -> float:
  """Best-of-``repeats`` seconds per call of ``fn`` (which must block)."""
  best = float("inf")
  for _ in range(repeats):
    t = time.perf_counter()
    for _ in range(number):
      fn()
    best = min(best, (time.perf_counter() - t) / number)
  return best


def fedjax_workload(model: str, *extra: str):
  """The resolved config of ``vs_fedjax.py``'s ftte_jax side for ``model``
  (FedAvg, 1,000 clients, K = C = 100, default ``client_chunk``), with
  ``extra`` launch flags after it."""
  from launch import flags as flags_lib  # pylint: disable=g-import-not-at-top
  args = ["--algorithm=fedavg", f"--model={model}", "--num_clients=1000",
          "--concurrency=100", "--buffer_size=100", *flags_lib.SCRATCH_ARGS,
          *extra]
  return flags_lib.resolve_args(args).config


def worker_json(module: str, *args: str) -> dict:
  """Runs ``python -m module args`` in a fresh process from the repository
  and returns its last line of output, a JSON object."""
  out = subprocess.run([sys.executable, "-m", module, *args], cwd=REPO,
                       capture_output=True, text=True, check=True)
  return json.loads(out.stdout.splitlines()[-1])


def write_report(path: str, report: dict) -> None:
  """Prints the report's machine line and writes the report as JSON."""
  print(report["machine"])
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    json.dump(report, f, indent=1)
