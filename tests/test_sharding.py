"""The K clients of a step split across 1, 2 and 4 (forced host) devices
give the same global parameters to 1e-6 after 20 steps."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ftte_jax.core import engine

TESTS = Path(__file__).resolve().parent
CASES = ("fedbuff:stream",  # partial sums added across devices (psum)
         "ftte:map",  # deltas sharded along K, variance weight over all K
         "fedavg:vmap",
         "scaffold")  # per-device state, split by device across the mesh


@pytest.fixture(scope="module")
def runs():
  # One process for every case: the forced device count is fixed at start.
  env = dict(os.environ,
             XLA_FLAGS="--xla_force_host_platform_device_count=4",
             JAX_PLATFORMS="cpu",
             PYTHONPATH=os.pathsep.join([str(TESTS), str(TESTS.parent),
                                         os.environ.get("PYTHONPATH", "")]))
  p = subprocess.run([sys.executable, str(TESTS / "sharded_run.py"), *CASES],
                     capture_output=True, text=True, env=env, timeout=900)
  assert p.returncode == 0, p.stderr[-3000:]
  line = [l for l in p.stdout.splitlines() if l.startswith("RESULT ")][-1]
  return json.loads(line[len("RESULT "):])


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES)
def test_one_two_four_devices_agree(runs, case):
  by_devices = runs[case]
  one = by_devices["1"]
  for d, r in by_devices.items():
    assert r["seen"] == 4 and r["devices"] == int(d)
    assert r["applied"] == one["applied"] > 0
    for a, b in zip(r["params"], one["params"]):
      np.testing.assert_allclose(a, b, atol=1e-6)
    for a, b in zip(r.get("state", []), one.get("state", [])):
      np.testing.assert_allclose(a, b, atol=1e-6)
    if "state_shards" in r:  # 16 devices' rows split over the mesh.
      assert r["state_shards"] == int(d)


def test_mesh_devices_at_most_the_devices_there_are():
  with pytest.raises(ValueError, match="mesh_devices=3: at most the 1"):
    engine.client_mesh(3, buffer_size=4)
  assert engine.client_mesh(0, buffer_size=4) is None  # one CPU device here


def test_padding_report_by_hand():
  assert engine.padding_report(None, 10) == {
      "buffer_size": 10, "padded_size": 10, "devices": 1,
      "padding_fraction": 0.0}
