"""A run split over two processes (jax.distributed, CPU collectives through
gloo) equals one process: the launcher end to end, checkpoints compared."""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from ftte_jax import checkpointing
from ftte_jax import experiment
from launch import flags as flags_lib

REPO = Path(__file__).resolve().parents[1]
CONFIG = [f"--flagfile={REPO / 'experiments' / 'smoke.flags'}"]
SMOKE = [*CONFIG, "--compilation_cache=off", "--checkpoint_every=10"]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _launch(args, devices=1):
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
             PYTHONPATH=os.pathsep.join([str(REPO),
                                         os.environ.get("PYTHONPATH", "")]))
  return subprocess.Popen([sys.executable, "-m", "launch.main", *SMOKE, *args],
                          cwd=REPO, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)


def _final_params(workdir):
  config = flags_lib.resolve_args(CONFIG).config
  exp = experiment.build(config)
  meta = json.loads((Path(workdir) / "config.json").read_text())
  ckpt = checkpointing.Checkpointer(Path(workdir) / "checkpoints",
                                    meta["config_sha256"])
  state, _ = ckpt.restore_latest(jax.eval_shape(exp.init_state))
  ckpt.close()
  return jax.device_get(state.params)


def _two_processes(workdir):
  port = _free_port()
  procs = [_launch([f"--workdir={workdir}",
                    f"--coordinator_address=127.0.0.1:{port}",
                    "--num_processes=2", f"--process_id={i}"])
           for i in range(2)]
  outs = [p.communicate(timeout=600) for p in procs]
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  assert "summary (" in outs[0][0] and "summary (" not in outs[1][0]
  return json.loads((workdir / "summary.json").read_text())


@pytest.mark.slow
def test_two_processes_equal_one(tmp_path):
  two = _two_processes(tmp_path / "two")
  # Both processes restore the checkpoint of round 10 and finish again.
  shutil.rmtree(tmp_path / "two" / "checkpoints" / "20")
  (tmp_path / "two" / "summary.json").unlink()
  again = _two_processes(tmp_path / "two")
  assert again["resumed_from_round"] == 10
  assert again["params_sha256"] == two["params_sha256"]
  assert two["num_processes"] == 2 and two["num_devices"] == 2
  singles = {}
  for devices in (1, 2):
    p = _launch([f"--workdir={tmp_path / str(devices)}"], devices)
    _, err = p.communicate(timeout=600)
    assert p.returncode == 0, err[-3000:]
    singles[devices] = json.loads(
        (tmp_path / str(devices) / "summary.json").read_text())
  assert singles[2]["num_devices"] == 2 and singles[1]["num_devices"] == 1
  # The same computation on the same two devices: the same bits.
  assert two["params_sha256"] == singles[2]["params_sha256"]
  got = _final_params(tmp_path / "two")
  for devices in (1, 2):
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6),
                 got, _final_params(tmp_path / str(devices)))


@pytest.mark.slow
def test_distributed_flags_go_together(tmp_path):
  p = _launch([f"--workdir={tmp_path / 'w'}",
               "--coordinator_address=127.0.0.1:1"])
  _, err = p.communicate(timeout=120)
  assert p.returncode == 2 and "go together" in err
  assert not (tmp_path / "w").exists()
