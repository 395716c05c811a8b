"""Smoke tests of experiments/benchmarks/vs_fedjax.py: plumbing, not figures.

The script runs as subprocesses (as a user runs it); ftte_jax's side on the
generated 'tiny' dataset, and FedJAX made unimportable on purpose, so the
tests do not depend on whether FedJAX is installed.
"""

import json
import os
import subprocess
import sys

import pytest

from experiments.benchmarks import vs_fedjax

REPO = vs_fedjax.REPO


def _script(args, tmp_path, env=None):
  return subprocess.run(
      [sys.executable, "-m", "experiments.benchmarks.vs_fedjax", *args],
      cwd=REPO, capture_output=True, text=True, timeout=600, check=False,
      env={**os.environ, "JAX_PLATFORMS": "cpu",
           "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "cache"),
           **(env or {})})


def test_flops_per_update_counts_three_passes_of_the_macs():
  # 5 steps x 32 examples x 3 passes x 2 FLOPs x (784*200 + 200*200 + 200*10).
  assert vs_fedjax.flops_per_update("mlp", 5, 32) == 190_848_000
  assert vs_fedjax.macs_per_example("lenet5") == 693_000


@pytest.mark.slow
def test_ftte_side_tiny_writes_steady_and_end_to_end(tmp_path):
  out = tmp_path / "vs"
  p = _script([
      "--side=ftte", "--models=mlp", "--num_clients=8",
      "--clients_per_round=4", "--rounds=3", "--matmul_n=128",
      "--ftte_extra=--dataset=tiny,--local_steps=1,--batch_size=8",
      "--e2e_repeats=2", f"--out={out}"], tmp_path)
  assert p.returncode == 0, p.stderr[-3000:]
  report = json.loads((tmp_path / "vs.json").read_text())
  assert {"machine", "matmul_peak_flops_per_s", "results", "table"} <= set(
      report)
  (res,) = report["results"]
  assert res["model"] == "mlp" and res["client_updates"] == 12
  assert list(res["sides"]) == ["ftte"]
  r = res["sides"]["ftte"]
  assert len(r["round_s"]) == 3
  assert r["steady_updates_per_s"] > 0 and 0 < r["peak_fraction"]
  for phase in ("e2e_cold", "e2e_warm"):
    e = r[phase]
    assert e["wall_s"] > 0 and e["updates_per_s"] == 12 / e["wall_s"]
    # The shown run is the median (here the faster of two) of the repeats.
    assert len(e["walls_s"]) == 2 and e["wall_s"] == min(e["walls_s"])
  # Every cold run starts empty and fills the cache the warm run reads.
  assert r["e2e_cold"]["cache_entries_before"] == 0
  assert r["e2e_warm"]["cache_entries_before"] > 0
  text = (tmp_path / "vs.txt").read_text()
  assert "| mlp | ftte_jax |" in text and report["table"] in text


@pytest.mark.slow
def test_without_fedjax_prints_install_hint_and_exits_0(tmp_path):
  fake = tmp_path / "fake" / "fedjax"
  fake.mkdir(parents=True)
  (fake / "__init__.py").write_text("raise ImportError('simulated')\n")
  p = _script(["--side=fedjax", f"--fedjax_python={sys.executable}",
               f"--out={tmp_path / 'vs'}"], tmp_path,
              env={"PYTHONPATH": str(tmp_path / "fake")})
  assert p.returncode == 0, p.stderr[-3000:]
  assert "fedjax not importable" in p.stdout
  assert "pip install fedjax==0.0.17" in p.stdout
  assert not (tmp_path / "vs.json").exists()
