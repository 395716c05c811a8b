"""An exclusive lock on a run's workdir, held for the life of the run.

Two runs writing one workdir would mix their outputs (one's config.json,
the other's summary.json, checkpoints from both) and both report success.
``acquire`` therefore takes an exclusive ``flock`` on ``<workdir>/.lock``
before the launcher reads or clears anything there, and writes into the
file who holds it (PID, host, start time, command), so a refused run can
name the holder. The kernel drops an ``flock`` when its process dies, so a
lock whose holder was killed is free: the next run takes it over and warns
with the record the dead holder left. ``release`` removes the file.

Where the filesystem has no ``flock`` (some network filesystems without a
lock daemon), the record alone decides: a live PID on this host holds the
workdir, anything else is stale (a warning says the lock is then only
advisory).
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import json
import os
import socket
import sys
import time

LOCK_FILE = ".lock"


class WorkdirBusyError(RuntimeError):
  """Another live process holds the workdir."""


@dataclasses.dataclass
class WorkdirLock:
  """A held lock. ``stale``: what a previous holder that did not release
  it left (a one-line description), else None; ``advisory``: the
  filesystem refused ``flock`` and only the record protects the workdir."""

  path: str
  fd: int | None
  created: str | None  # the outermost directory acquire made, if any.
  stale: str | None = None
  advisory: bool = False

  def release(self) -> None:
    """Removes the lock file (if still ours), then directories that
    ``acquire`` created and that are empty; idempotent."""
    if self.fd is None:
      return
    try:
      if os.path.samestat(os.fstat(self.fd), os.stat(self.path)):
        os.remove(self.path)
    except OSError:
      pass
    os.close(self.fd)
    self.fd = None
    _remove_created(os.path.dirname(self.path), self.created)


def _remove_created(workdir: str, created: str | None) -> None:
  """Removes the directories ``acquire`` made (``created`` and those below
  it down to ``workdir``) while they are empty: a run refused after the
  lock leaves nothing behind."""
  if created is None:
    return
  d = os.path.abspath(workdir)
  while True:
    try:
      os.rmdir(d)
    except OSError:
      return
    if d == created:
      return
    d = os.path.dirname(d)


def _makedirs(path: str) -> str | None:
  """``os.makedirs(path)``; returns the outermost directory it created."""
  path = os.path.abspath(path)
  top, d = None, path
  while not os.path.exists(d):
    top, d = d, os.path.dirname(d)
  os.makedirs(path, exist_ok=True)
  return top


def _record() -> dict:
  return {"pid": os.getpid(), "host": socket.gethostname(),
          "started": time.strftime("%Y-%m-%d %H:%M:%S"),
          "command": " ".join([os.path.basename(sys.argv[0]), *sys.argv[1:]]
                              )[:200] if sys.argv else ""}


def _read(fd: int) -> dict | None:
  """The record in an open lock file; None if empty or unreadable."""
  try:
    os.lseek(fd, 0, os.SEEK_SET)
    text = os.read(fd, 1 << 16).decode("utf-8", "replace")
    record = json.loads(text)
  except (OSError, ValueError):
    return None
  return record if isinstance(record, dict) else None


def _write(fd: int, record: dict) -> None:
  os.ftruncate(fd, 0)
  os.lseek(fd, 0, os.SEEK_SET)
  os.write(fd, (json.dumps(record) + "\n").encode())
  os.fsync(fd)


def describe(record: dict | None) -> str:
  """'process 123 on host h (started ..., command ...)'."""
  if not record:
    return "another process (its record is unreadable)"
  text = f"process {record.get('pid')} on host {record.get('host')}"
  extra = [f"started {record['started']}"] if record.get("started") else []
  if record.get("command"):
    extra.append(f"command '{record['command']}'")
  return text + (f" ({', '.join(extra)})" if extra else "")


def pid_alive(pid) -> bool:
  """Whether a process ``pid`` exists on this host."""
  if not isinstance(pid, int) or pid <= 0:
    return False
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # exists, another user's.
    return True
  return True


def _busy(workdir: str, record: dict | None, advisory: bool = False
          ) -> WorkdirBusyError:
  hint = (f"; this filesystem has no file locks: if that process is gone, "
          f"delete {os.path.join(workdir, LOCK_FILE)}" if advisory else "")
  return WorkdirBusyError(
      f"--workdir={workdir} is in use by {describe(record)}; wait for it to "
      f"finish or choose another --workdir{hint}")


def acquire(workdir: str) -> WorkdirLock:
  """Locks ``workdir`` (created if missing) for this process.

  Raises:
    WorkdirBusyError: a live process holds it (the message names it).
    OSError: the directory or the lock file cannot be made.
  """
  created = _makedirs(workdir)
  path = os.path.join(workdir, LOCK_FILE)
  try:
    return _acquire(workdir, path, created)
  except BaseException:
    _remove_created(workdir, created)
    raise


def _acquire(workdir: str, path: str, created: str | None) -> WorkdirLock:
  while True:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
        return _advisory(workdir, path, fd, created)
      record = _read(fd)
      os.close(fd)
      raise _busy(workdir, record) from None
    # A holder releasing between our open and flock removed the file we
    # opened: lock the file now at ``path`` instead.
    try:
      same = os.path.samestat(os.fstat(fd), os.stat(path))
    except FileNotFoundError:
      same = False
    if same:
      break
    os.close(fd)
  previous = _read(fd)
  _write(fd, _record())
  stale = None
  if previous is not None:
    stale = (f"--workdir={workdir}: took over the lock of "
             f"{describe(previous)}, which no longer holds it (killed or "
             "crashed)")
  return WorkdirLock(path, fd, created, stale)


def _advisory(workdir: str, path: str, fd: int, created: str | None
              ) -> WorkdirLock:
  """No flock here: a live PID of this host in the record holds the lock."""
  previous = _read(fd)
  if previous and previous.get("pid") != os.getpid() and (
      previous.get("host") != socket.gethostname() or
      pid_alive(previous.get("pid"))):
    os.close(fd)
    raise _busy(workdir, previous, advisory=True)
  _write(fd, _record())
  stale = None
  if previous:
    stale = (f"--workdir={workdir}: took over the lock of "
             f"{describe(previous)}, which is no longer running")
  return WorkdirLock(path, fd, created, stale, advisory=True)
