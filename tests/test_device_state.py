"""Per-device state through the launcher: an example run with SCAFFOLD's
control variates, killed with SIGKILL, resumes bit for bit; another
algorithm's workdir is not resumed as it."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from test_launch import SMOKE, finished_steps, summary

REPO = Path(__file__).resolve().parents[1]
ARGS = [f"--flagfile={SMOKE}", "--algorithm=fedavg", "--concurrency=4",
        "--rounds=1500", "--eval_every=100", "--checkpoint_every=100"]

pytestmark = pytest.mark.slow


def scaffold(*args):
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(
      [str(REPO), os.environ.get("PYTHONPATH", "")]))
  return subprocess.Popen(
      [sys.executable, str(REPO / "examples" / "scaffold.py"), *args],
      cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
      text=True)


def test_scaffold_killed_resumes_bit_for_bit(tmp_path):
  ref_dir, dir_ = tmp_path / "reference", tmp_path / "killed"
  ref = scaffold(*ARGS, f"--workdir={ref_dir}")
  victim = scaffold(*ARGS, f"--workdir={dir_}")
  deadline = time.time() + 400
  while not finished_steps(dir_) and victim.poll() is None:
    assert time.time() < deadline, "no checkpoint appeared"
    time.sleep(0.05)
  assert victim.poll() is None, "run ended before it could be killed"
  victim.send_signal(signal.SIGKILL)
  victim.communicate()
  killed_at = finished_steps(dir_)[-1]
  assert killed_at < 1500

  resumed = scaffold(*ARGS, f"--workdir={dir_}")
  out, err = resumed.communicate(timeout=600)
  assert resumed.returncode == 0, err[-2000:]
  assert f"resuming from round {killed_at}" in err
  _, ref_err = ref.communicate(timeout=600)
  assert ref.returncode == 0, ref_err[-2000:]
  got, want = summary(dir_), summary(ref_dir)
  assert got["resumed_from_round"] == killed_at
  assert got["params_sha256"] == want["params_sha256"]
  config = json.loads((dir_ / "config.json").read_text())
  assert config["extensions"] == "scaffold"

  # The same flags without the extensions are another run: refused.
  p = subprocess.run([sys.executable, "-m", "launch.main", *ARGS,
                      f"--workdir={dir_}"], cwd=REPO, capture_output=True,
                     text=True, timeout=300)
  assert p.returncode == 2
  assert "different configuration" in p.stderr
