"""``python -m launch.main`` (or another launcher) runs, each forked from
one warm process.

A launch.main process spends about 2 s of CPU on the 2-core machine
starting the interpreter and importing JAX, flax and optax before it reads
a flag. ``Launcher`` starts one server process that imports the launcher
once; each run is a child forked from it that sets ``sys.argv``, sends its
stdout and stderr to files and runs the module as ``python -m`` would
(``runpy``), ending with the run's exit status. So a run is still a process
of its own, with the launcher's real exit path. The server never touches a
JAX backend, so each child initializes its own devices (``--cpu_devices``
works as in a fresh process). Runs that need another environment (a
sitecustomize, an empty home) start a real subprocess instead.
"""

import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

_SERVER = r"""
import atexit, json, os, runpy, sys, traceback
import launch.main  # the launcher and the library, imported once.
for line in sys.stdin:
  request = json.loads(line)
  sys.stdout.flush()
  sys.stderr.flush()
  pid = os.fork()
  if pid == 0:
    code = 70
    try:
      os.chdir(request["cwd"])
      for fd, path in ((1, request["out"]), (2, request["err"])):
        target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(target, fd)
        os.close(target)
      sys.argv = ["-m", *request["argv"]]
      # As python -m runs it (a fresh __main__, so runpy does not warn of
      # the module the server imported); launch.main's run() exits itself.
      sys.modules.pop(request["module"], None)
      runpy.run_module(request["module"], run_name="__main__",
                       alter_sys=True)
      code = 0
    except SystemExit as e:
      if e.code is None or isinstance(e.code, int):
        code = e.code or 0
      else:
        print(e.code, file=sys.stderr)
        code = 1
    except BaseException:  # pylint: disable=broad-except
      traceback.print_exc()
      code = 1
    finally:
      atexit._run_exitfuncs()  # pylint: disable=protected-access
      sys.stdout.flush()
      sys.stderr.flush()
      os._exit(code)
  print(json.dumps({"pid": pid}), flush=True)
  _, status = os.waitpid(pid, 0)
  print(json.dumps({"code": os.waitstatus_to_exitcode(status)}), flush=True)
"""

class Launcher:
  """Runs launch.main with given arguments; the server starts at first use."""

  def __init__(self, repo: Path, scratch: Path):
    self.repo, self.scratch = Path(repo), Path(scratch)
    self._server = None
    self._count = 0

  def _start(self):
    self._server = subprocess.Popen(
        [sys.executable, "-c", _SERVER], cwd=self.repo,
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

  def _read(self, timeout: float) -> dict:
    ready, _, _ = select.select([self._server.stdout], [], [], timeout)
    if not ready:
      raise TimeoutError
    line = self._server.stdout.readline()
    if not line:
      raise RuntimeError("the launch server ended")
    return json.loads(line)

  def run(self, args, timeout: float = 300, module: str = "launch.main"
          ) -> tuple[int, str, str]:
    """``(exit status, stdout, stderr)`` of ``python -m module args``."""
    if self._server is None:
      self._start()
    self._count += 1
    out, err = (self.scratch / f"run{self._count}.{s}" for s in ("out", "err"))
    self._server.stdin.write(json.dumps({
        "module": module, "argv": [str(a) for a in args],
        "cwd": str(self.repo),
        "out": str(out), "err": str(err)}) + "\n")
    self._server.stdin.flush()
    pid = None
    try:
      pid = self._read(timeout)["pid"]
      code = self._read(timeout)["code"]
    except BaseException:
      # A run past its time, or a server gone: start afresh next time, so
      # no late answer is read as the next run's.
      if pid is not None:
        os.kill(pid, signal.SIGKILL)
      self._server.kill()
      self._server.wait()
      self._server = None
      raise
    return code, out.read_text(), err.read_text()

  def close(self) -> None:
    if self._server is not None:
      self._server.stdin.close()
      self._server.wait(timeout=60)
      self._server = None


_SHARED: list[Launcher] = []


def shared() -> Launcher:
  """The test session's launcher (started at first use; conftest.py closes
  it at the end of the session)."""
  if not _SHARED:
    _SHARED.append(Launcher(Path(__file__).resolve().parents[1],
                            Path(tempfile.mkdtemp(prefix="ftte_runs_"))))
  return _SHARED[0]


def close_shared() -> None:
  if _SHARED:
    launcher = _SHARED.pop()
    launcher.close()
    shutil.rmtree(launcher.scratch, ignore_errors=True)
