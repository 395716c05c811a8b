"""experiments/benchmarks/accelerator.py: its helpers, and its --smoke run
on the CPU (so the script a GPU window runs cannot rot)."""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from experiments.benchmarks import accelerator as acc
from ftte_jax.core.algorithms import EngineConfig

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("kind,name", [
    ("NVIDIA H100 80GB HBM3", "H100 SXM"), ("NVIDIA H100 PCIe", "H100 PCIe"),
    ("NVIDIA H200", "H200"), ("NVIDIA A100-SXM4-80GB", "A100"),
    ("TPU v4", "TPU v4"), ("TPU v5 lite", "TPU v5e"), ("TPU v5p", "TPU v5p"),
    ("TPU v6 lite", "TPU v6e")])
def test_peak_table_knows_the_devices(kind, name):
  found, peaks = acc.peak_entry(kind)
  assert found == name and peaks["bf16"] > 0 and peaks["source"]


def test_unknown_device_has_no_peak():
  assert acc.peak_entry("cpu") is None
  assert acc.peak_entry("TPU v2") is None


def test_bf16_is_measured_once_the_engine_has_compute_dtype():
  fields = {f.name for f in dataclasses.fields(EngineConfig)}
  assert acc.has_compute_dtype() == ("compute_dtype" in fields)


def test_timed_steps_end_in_time():
  assert acc.timed_steps(3, 0.0, 100) == 3
  assert acc.timed_steps(3, 1.0, 100) == 3
  assert acc.timed_steps(10, 2.0, 9) == 3  # 4 steps of 2 s fit 9 s, less 1
  assert acc.timed_steps(3, 50.0, 10) == 1  # always one


def test_clients_are_windows_of_the_pool():
  offsets, counts = acc.client_layout(1000, 100, 0)
  assert counts.min() >= 16 and counts.max() <= 64
  assert offsets.min() >= 0 and (offsets + counts).max() <= 100
  x, y = acc.synthetic_pool(100, 0)
  assert x.shape == (100, 28, 28, 1) and y.dtype == np.int32
  np.testing.assert_array_equal(acc.synthetic_pool(100, 0)[1], y)


def _run(tmp_path, *args):
  out = tmp_path / "acc.json"
  p = subprocess.run(
      [sys.executable, "-m", "experiments.benchmarks.accelerator", "--smoke",
       f"--out={out}", *args], cwd=REPO, capture_output=True, text=True,
      timeout=900, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert p.returncode == 0, p.stderr[-3000:]
  return json.loads(out.read_text()), p.stdout


@pytest.mark.slow  # a subprocess compiling three steps
def test_smoke_run_measures_every_path(tmp_path):
  report, stdout = _run(tmp_path)
  assert report["device"]["platform"] == "cpu"
  assert "device: cpu" in stdout and "roofline mlp K=8" in stdout
  rows = {(r["side"], r.get("variant"), r.get("dtype")): r
          for r in report["rows"]}
  for variant in ("auto", "vmap", "map"):
    r = rows[("ftte", variant, "float32")]
    assert r["status"] == "ok", r
    assert r["updates_per_s"] > 0 and r["compile_s"] > 0
    assert r["program"]["peak_bytes"] > 0
    assert r["flops_per_step_model"] == 8 * 5 * 32 * 6 * (
        784 * 200 + 200 * 200 + 200 * 10)
    assert 0 < r["flops_per_step_xla"] and r["fraction_of_matmul_peak"] > 0
  # The plan ran on the CPU's budget: one client at a time, compiled once.
  auto = rows[("ftte", "auto", "float32")]
  assert (auto["batching"], auto["chunk"]) == ("stream", 1)
  assert [m["chunk"] for m in auto["plan"]["measured"]] == [1]
  bf16 = rows[("ftte", "auto", "bfloat16")]
  if acc.has_compute_dtype():
    assert bf16["status"] == "ok"
  else:
    assert bf16["status"] == acc.UNAVAILABLE_BF16
  fedjax = rows[("fedjax", None, None)]
  assert fedjax["status"] == "ok" or fedjax["status"].startswith(
      "skipped: fedjax not importable")
  assert report["stopped_by"] == "done" and "| mlp | 64 | 8 |" in (
      report["table"])


@pytest.mark.slow  # a subprocess
def test_budget_stops_cleanly_and_still_writes(tmp_path):
  report, _ = _run(tmp_path, "--budget_s=0")
  assert report["stopped_by"] == "budget_s"
  statuses = {r["status"] for r in report["rows"]}
  assert statuses <= {"skipped: time budget", acc.UNAVAILABLE_BF16}
  assert len(report["rows"]) == 5


@pytest.mark.slow  # four compiles of the step
def test_rows_take_the_accelerator_path(monkeypatch):
  """Off the CPU (traced as on a GPU, with a device limit between a chunk
  of 8 and all 16 clients at once): auto falls back from vmap to streamed
  chunks, and the vmap row is skipped as over the device, not run."""
  import dataclasses as dc
  import types

  import jax
  from ftte_jax.experiment import memory_plan

  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  bench = acc.Bench(types.SimpleNamespace(
      pool=256, seed=0, local_steps=2, batch_size=8, client_lr=0.05,
      server_lr=1.0, budget_s=1e9, row_reserve_s=0.0, steps=1))
  bench.peaks, bench.matmul = {}, {"f32": 1e9, "bf16": 1e9}
  config = bench.context("mlp", 64, 16)[0]
  peak = lambda b, c: bench.compile("mlp", 64, 16, dc.replace(
      config, client_batching=b, client_chunk=c))[0].peak_bytes
  low, high = peak("stream", 8), peak("vmap", 1)
  assert low < high
  limit = (low + high) / 2
  bench.budget = limit / memory_plan.USABLE_FRACTION
  monkeypatch.setattr(memory_plan, "device_memory", lambda *a: limit)
  auto = bench.row("mlp", 64, 16, "auto", "float32")
  assert auto["status"] == "ok", auto
  assert auto["batching"] == "stream" and 8 <= auto["chunk"] <= 16
  assert auto["plan"]["measured"][0]["batching"] == "vmap"
  vmap = bench.row("mlp", 64, 16, "vmap", "float32")
  assert vmap["status"].startswith("skipped: needs"), vmap
