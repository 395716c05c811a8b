"""Helpers shared by the benchmark and experiment scripts: machine, timing."""

from __future__ import annotations

import os
import platform
import time

import jax


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
