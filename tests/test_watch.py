"""Watching a run: the progress bar on a pseudo-terminal, log lines
elsewhere, TensorBoard events read back, and launch.plot's figure.

End-to-end checks through ``launch.main`` (a smoke run's events and a plot
of two smoke workdirs) are in tests/test_launch.py.
"""

import fcntl
import io
import json
import logging
import os
import pty
import struct
import termios
import types

import numpy as np
import pytest
from absl import flags

from launch import plot
from launch import watch


def _rows(n, every=5):
  """Metric rows as launch.main writes them (the fields the watcher and
  the plot read, and a few more)."""
  return [{"round": r, "virtual_time_s": 0.5 * r, "test_accuracy": 0.1 + r / 100,
           "test_loss": 2.0 - r / 50, "updates_applied": 4 * r,
           "client_updates_per_s": 100.0 + r, "wall_s": 1.0 + r / 10,
           "bytes_up": 1000 * (r + 1), "bytes_down": 3000 * (r + 1),
           "mean_staleness": None if r == 0 else 1.5}
          for r in range(0, n + 1, every)]


@pytest.fixture
def terminal():
  """A pseudo-terminal 120 columns wide: (stream to write, read-all)."""
  master, slave = pty.openpty()
  fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))
  stream = os.fdopen(slave, "w")

  def read():
    stream.flush()
    out = b""
    os.set_blocking(master, False)
    try:
      while True:
        out += os.read(master, 65536)
    except BlockingIOError:
      pass
    return out.decode()

  yield stream, read
  stream.close()
  os.close(master)


def test_auto_is_a_bar_on_a_terminal_and_lines_elsewhere(terminal,
                                                         monkeypatch):
  stream, _ = terminal
  assert watch.progress_mode("auto", stream) == "bar"
  assert watch.progress_mode("auto", io.StringIO()) == "log"
  assert watch.progress_mode("log", stream) == "log"
  assert watch.progress_mode("bar", io.StringIO()) == "bar"
  # Without tqdm a terminal gets the lines.
  monkeypatch.setattr(watch, "_importable", lambda module: False)
  assert watch.progress_mode("auto", stream) == "log"


def test_bar_shows_rounds_virtual_time_accuracy_rate_and_eta(terminal):
  stream, read = terminal
  rows = _rows(10)
  w = watch.Watcher("bar", rounds=20, history=rows[:1], stream=stream)
  for r in range(1, 8):
    w.step(types.SimpleNamespace(version=np.int32(r),
                                 clock=np.float32(0.5 * r)))
    if r % 5 == 0:
      w.row(rows[1])
  w._bar.refresh()  # pylint: disable=protected-access  (tqdm refreshes at most 10/s)
  out = read()
  w.close()
  bar = out.replace("\r", "\n").splitlines()
  last = [l for l in bar if "rounds" in l][-1]
  assert "7/20 rounds" in last
  assert "vt=3.5s" in last and "acc=0.1500" in last and "upd/s=105" in last
  assert "<" in last and "round/s" in last  # elapsed<remaining, rate.
  # The evaluation's line is written above the bar, not through logging.
  assert watch.log_line(rows[1]) in out


def test_log_mode_writes_one_line_per_evaluation(caplog):
  rows = _rows(10)
  stream = io.StringIO()
  w = watch.Watcher("log", rounds=10, history=[], stream=stream)
  with caplog.at_level(logging.INFO):
    for row in rows:
      w.step(types.SimpleNamespace(version=row["round"], clock=0.0))
      w.row(row)
  w.close()
  assert stream.getvalue() == ""
  lines = [r.getMessage() for r in caplog.records]
  assert lines == [watch.log_line(r) for r in rows]
  assert lines[-1].startswith("round    10  virtual_time        5.0s  "
                              "accuracy 0.2000  loss 1.8000  updates     40")


def _events(logdir):
  from tensorboard.backend.event_processing import event_accumulator
  acc = event_accumulator.EventAccumulator(str(logdir))
  acc.Reload()
  return acc


def test_tensorboard_events_read_back(tmp_path):
  rows = _rows(20)
  w = watch.Watcher("log", rounds=20, history=[], workdir=str(tmp_path),
                    writers=["tensorboard"])
  for row in rows:
    w.row(row)
  w.close()
  acc = _events(tmp_path / watch.TENSORBOARD_DIR)
  tags = set(acc.Tags()["scalars"])
  # Every numeric field but the round (the step); None is not a scalar.
  assert tags == {"virtual_time_s", "test_accuracy", "test_loss",
                  "updates_applied", "client_updates_per_s", "wall_s",
                  "bytes_up", "bytes_down", "mean_staleness"}
  for tag in ("test_accuracy", "virtual_time_s", "bytes_up"):
    events = acc.Scalars(tag)
    assert [e.step for e in events] == [r["round"] for r in rows]
    np.testing.assert_array_equal(
        [e.value for e in events],
        np.float32([r[tag] for r in rows]))
  assert [e.step for e in acc.Scalars("mean_staleness")] == [5, 10, 15, 20]


def test_tensorboard_resume_keeps_only_the_checkpoints_rows(tmp_path):
  rows = _rows(20)
  w = watch.Watcher("log", rounds=20, history=[], workdir=str(tmp_path),
                    writers=["tensorboard"])
  for row in rows:  # logged up to round 20, then killed ...
    w.row(row)
  w.close()
  # ... and resumed from the checkpoint of round 10.
  w = watch.Watcher("log", rounds=20, history=rows[:3], start_round=10,
                    workdir=str(tmp_path), writers=["tensorboard"])
  again = [dict(r, test_accuracy=0.9) for r in rows[3:]]
  for row in again:
    w.row(row)
  w.close()
  events = _events(tmp_path / watch.TENSORBOARD_DIR).Scalars("test_accuracy")
  assert [e.step for e in events] == [0, 5, 10, 15, 20]
  np.testing.assert_allclose([e.value for e in events],
                             [0.1, 0.15, 0.2, 0.9, 0.9], rtol=1e-6)


def _flags(*args):
  fv = flags.FlagValues()
  watch.define_flags(fv)
  fv(["main", *args])
  return fv


def test_check_flags_names_the_flag(monkeypatch):
  watch.check_flags(_flags("--metrics=tensorboard", "--progress=bar"))
  with pytest.raises(ValueError, match=r"--metrics=csv: unknown writer 'csv'"
                     r"; valid: tensorboard"):
    watch.check_flags(_flags("--metrics=csv"))
  monkeypatch.setattr(watch, "_importable", lambda module: False)
  with pytest.raises(ValueError, match=r"^--metrics=tensorboard needs the "
                     r"tensorboard package \(pip install "
                     r"'ftte_jax\[tensorboard\]'\)"):
    watch.check_flags(_flags("--metrics=tensorboard"))
  with pytest.raises(ValueError, match=r"^--progress=bar needs tqdm"):
    watch.check_flags(_flags("--progress=bar"))
  watch.check_flags(_flags("--progress=auto"))  # auto falls back instead.


def _workdir(path, algorithm, rows, finished=True):
  path.mkdir()
  (path / "metrics.jsonl").write_text(
      "".join(json.dumps(r) + "\n" for r in rows))
  (path / "config.json").write_text(json.dumps(
      {"algorithm": algorithm, "experiment": {"target_accuracy": 0.15}}))
  if finished:
    (path / "summary.json").write_text("{}")
  return str(path)


def test_plot_labels_and_refusals(tmp_path):
  a = _workdir(tmp_path / "a", "ftte", _rows(20))
  b = _workdir(tmp_path / "b", "fedbuff", _rows(10), finished=False)
  label, rows, target = plot.load_run(a)
  assert (label, len(rows), target) == ("ftte (a)", 5, 0.15)
  assert plot.load_run(b)[0] == "fedbuff (b), unfinished"
  with pytest.raises(ValueError, match="no metrics.jsonl"):
    plot.load_run(str(tmp_path))
  (tmp_path / "c").mkdir()
  (tmp_path / "c" / "metrics.jsonl").write_text("")
  with pytest.raises(ValueError, match="no metric rows"):
    plot.load_run(str(tmp_path / "c"))
  out = plot.draw([plot.load_run(a)[:2], plot.load_run(b)[:2]], 0.15,
                  str(tmp_path / "fig.png"))
  assert open(out, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
