"""Issue 32's two engine items: a step's clients padded to the mesh, and
mixed precision.

* Padding: with 8 devices and K = 10 the auto mesh takes all 8 devices; a
  step's K clients are padded to 16 with zero-weight slots that train
  nothing and count nowhere. Final parameters equal one device's to 1e-6,
  and every counter is equal exactly.
* Mixed precision: ``compute_dtype='bfloat16'`` runs the clients' forward
  and backward passes in bf16 with float32 master parameters and a
  float32 aggregate. On the smoke setup (``experiments/smoke.flags``) it
  tracks float32: final test accuracy within 0.05 and test loss within 10%
  (stated tolerance), nothing non-finite (no refused step, no non-finite
  update, finite parameters), and the parameters stay float32.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from ftte_jax import experiment
from launch import flags as flags_lib

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
# Tolerances of bf16 against float32 on the smoke setup.
ACCURACY_TOLERANCE = 0.05
LOSS_RELATIVE_TOLERANCE = 0.10

# Runs K = 10 on mesh_devices=0 (auto: all 8) and 1 for each case; prints
# the final parameters, counters and the padding report as JSON.
_PADDED_RUN = r"""
import json, sys, jax, numpy as np, helpers
from ftte_jax import experiment
from ftte_jax.experiment import report
out = {}
for case in sys.argv[1:]:
  algorithm, batching = case.split(":")
  runs = {}
  for devices in (0, 1):
    kw = dict(buffer_size=10, client_batching=batching, mesh_devices=devices,
              local_steps=3, batch_size=4, memory_policy="ignore")
    if algorithm != "fedavg":
      kw["concurrency"] = 20
    config = helpers.tiny_config(algorithm, engine_kw=kw, rounds=8,
                                 eval_every=8, data=dict(num_clients=40))
    exp = experiment.build(config)
    state, history, _ = exp.run()
    counters = report.counters_row(state)
    runs[devices] = {
        "devices": exp.num_devices, "seen": jax.device_count(),
        "padding": exp.info.get("client_padding"),
        "params": [np.asarray(p).ravel().tolist()
                   for p in jax.tree.leaves(jax.device_get(state.params))],
        "counters": {k: v for k, v in counters.items()
                     if k not in ("wall_s",)},
        "accuracy": history[-1]["test_accuracy"]}
  out[case] = runs
print("RESULT " + json.dumps(out))
"""
CASES = ("fedbuff:stream", "ftte:map", "fedavg:vmap")


@pytest.fixture(scope="module")
def padded_runs():
  env = dict(os.environ,
             XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu",
             PYTHONPATH=os.pathsep.join([str(TESTS), str(REPO),
                                         os.environ.get("PYTHONPATH", "")]))
  p = subprocess.run([sys.executable, "-c", _PADDED_RUN, *CASES],
                     capture_output=True, text=True, env=env, timeout=1200,
                     cwd=REPO)
  assert p.returncode == 0, p.stderr[-3000:]
  line = [l for l in p.stdout.splitlines() if l.startswith("RESULT ")][-1]
  return json.loads(line[len("RESULT "):])


@pytest.mark.slow  # a subprocess with 8 forced host devices
@pytest.mark.parametrize("case", CASES)
def test_k10_uses_all_8_devices_and_equals_one_device(padded_runs, case):
  auto, one = padded_runs[case]["0"], padded_runs[case]["1"]
  assert auto["seen"] == 8 and auto["devices"] == 8 and one["devices"] == 1
  # 10 clients on 8 devices: 2 a device, 16 slots, 6 of them padding.
  assert auto["padding"] == {"buffer_size": 10, "padded_size": 16,
                             "devices": 8, "padding_fraction": 0.375}
  assert one["padding"] == {"buffer_size": 10, "padded_size": 10,
                            "devices": 1, "padding_fraction": 0.0}
  # Padding slots count nowhere: every counter is exactly one device's.
  assert auto["counters"] == one["counters"]
  assert auto["counters"]["updates_applied"] > 0
  for a, b in zip(auto["params"], one["params"]):
    np.testing.assert_allclose(a, b, atol=1e-6)


def _smoke(*extra):
  """The smoke setup's config (``experiments/smoke.flags``), with ``extra``."""
  args = [f"--flagfile={REPO / 'experiments' / 'smoke.flags'}", *extra]
  return flags_lib.resolve_args(args).config


@pytest.fixture(scope="module")
def precision_runs():
  out = {}
  for dtype in ("float32", "bfloat16"):
    exp = experiment.build(_smoke(f"--compute_dtype={dtype}"))
    state, history, _ = exp.run()
    out[dtype] = (state, history[-1])
  return out


def test_bf16_tracks_float32_on_the_smoke_setup(precision_runs):
  (s32, r32), (s16, r16) = precision_runs["float32"], precision_runs[
      "bfloat16"]
  assert abs(r16["test_accuracy"] - r32["test_accuracy"]) <= (
      ACCURACY_TOLERANCE)
  assert abs(r16["test_loss"] - r32["test_loss"]) <= (
      LOSS_RELATIVE_TOLERANCE * r32["test_loss"])
  # bf16 is really used: the parameters are not float32's bits.
  assert any(not np.array_equal(a, b) for a, b in zip(
      jax.tree.leaves(s16.params), jax.tree.leaves(s32.params)))


def test_bf16_never_goes_non_finite_and_keeps_float32_masters(
    precision_runs):
  state, row = precision_runs["bfloat16"]
  assert int(state.counters.steps_refused) == 0
  assert int(state.counters.updates_nonfinite) == 0
  assert np.isfinite(row["test_loss"])
  for leaf in jax.tree.leaves(state.params):
    assert leaf.dtype == np.float32 and np.isfinite(np.asarray(leaf)).all()
  for leaf in jax.tree.leaves(state.ring.params):
    assert leaf.dtype == np.float32


def test_compute_dtype_is_an_option_with_float32_default():
  assert _smoke().engine.compute_dtype == "float32"
  with pytest.raises(ValueError, match="compute_dtype"):
    _smoke("--compute_dtype=float16")
