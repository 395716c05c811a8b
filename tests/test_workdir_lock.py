"""launch.workdir_lock: one run per workdir, stale locks taken over.

In-process: ``flock`` locks belong to open file descriptions, so a second
``acquire`` in the same process contends like another process would. Two
real processes on one workdir: tests/test_faults.py.
"""

import errno
import json
import os
import socket
import subprocess
import sys

import pytest

from launch import workdir_lock


def _dead_pid():
  p = subprocess.Popen([sys.executable, "-c", "pass"])
  p.wait()
  return p.pid


def test_second_acquire_is_refused_naming_the_holder(tmp_path):
  wd = tmp_path / "a" / "b"
  lock = workdir_lock.acquire(str(wd))
  record = json.loads((wd / ".lock").read_text())
  assert record["pid"] == os.getpid()
  assert record["host"] == socket.gethostname()
  assert lock.stale is None and not lock.advisory
  with pytest.raises(workdir_lock.WorkdirBusyError) as e:
    workdir_lock.acquire(str(wd))
  msg = str(e.value)
  assert f"--workdir={wd} is in use by process {os.getpid()} on host " \
         f"{socket.gethostname()}" in msg and "another --workdir" in msg
  lock.release()
  lock.release()  # idempotent.
  # The directories acquire made, empty again, are gone: a refused run
  # leaves nothing behind.
  assert not (tmp_path / "a").exists()
  again = workdir_lock.acquire(str(wd))
  again.release()


def test_release_keeps_a_workdir_with_outputs(tmp_path):
  lock = workdir_lock.acquire(str(tmp_path / "w"))
  (tmp_path / "w" / "config.json").write_text("{}")
  lock.release()
  assert sorted(os.listdir(tmp_path / "w")) == ["config.json"]


def test_lock_of_a_dead_process_is_taken_over_with_a_warning(tmp_path):
  pid = _dead_pid()
  (tmp_path / ".lock").write_text(json.dumps(
      {"pid": pid, "host": socket.gethostname(), "started": "then",
       "command": "main.py --rounds=9"}))
  lock = workdir_lock.acquire(str(tmp_path))
  assert f"took over the lock of process {pid} on host" in lock.stale
  assert "main.py --rounds=9" in lock.stale
  assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()
  lock.release()
  assert not (tmp_path / ".lock").exists()


def test_without_flock_a_live_pid_holds_and_a_dead_one_is_stale(
    tmp_path, monkeypatch):
  def no_locks(fd, op):
    raise OSError(errno.ENOLCK, "No locks available")

  monkeypatch.setattr(workdir_lock.fcntl, "flock", no_locks)
  live = {"pid": os.getppid(), "host": socket.gethostname()}
  (tmp_path / ".lock").write_text(json.dumps(live))
  with pytest.raises(workdir_lock.WorkdirBusyError,
                     match=rf"process {os.getppid()} .*no file locks.*delete"):
    workdir_lock.acquire(str(tmp_path))
  dead = {"pid": _dead_pid(), "host": socket.gethostname()}
  (tmp_path / ".lock").write_text(json.dumps(dead))
  lock = workdir_lock.acquire(str(tmp_path))
  assert lock.advisory and f"process {dead['pid']}" in lock.stale
  lock.release()


def test_pid_alive():
  assert workdir_lock.pid_alive(os.getpid())
  assert not workdir_lock.pid_alive(_dead_pid())
  assert not workdir_lock.pid_alive("12") and not workdir_lock.pid_alive(0)
