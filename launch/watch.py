"""Watching a run of ``launch.main``: progress on the terminal, metric writers.

``--progress`` chooses how the run reports as it goes: a progress bar
(tqdm: rounds, virtual time, last accuracy, client updates/s, ETA) when
stderr is a terminal, one log line per evaluation when it is not (a log
file, CI, ``launch.sweep``'s run.log). tqdm is an optional extra
(``pip install ftte_jax[progress]``): without it ``auto`` falls back to the
log lines. The core dependencies stay those of the design (JAX and the
libraries of its ecosystem); a bar is a convenience, not a need.

``--metrics`` adds writers of the metric rows beside ``metrics.jsonl``:
``tensorboard`` writes them as TensorBoard scalar events (step = round)
to ``WORKDIR/tensorboard/``, with the ``tensorboard`` package's own event
writer and protos, no TensorFlow (``pip install ftte_jax[tensorboard]``,
which is also what views them: ``tensorboard --logdir WORKDIR``). Like
``metrics.jsonl``, the events are rewritten from the checkpoint's rows when
a run resumes, so no round is logged twice.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from typing import IO, Sequence

from absl import flags
from absl import logging

PROGRESS = ("auto", "bar", "log")
METRIC_WRITERS = ("tensorboard",)
TENSORBOARD_DIR = "tensorboard"
# Row fields that are not metrics of the model or the simulation.
_NOT_SCALARS = ("round",)


def define_flags(fv: flags.FlagValues = flags.FLAGS) -> None:
  """Registers --progress and --metrics."""
  flags.DEFINE_enum(
      "progress", "auto", list(PROGRESS), "how a run reports as it goes: "
      "'bar', a progress bar (rounds, virtual time, last accuracy, client "
      "updates/s, ETA; needs tqdm: pip install ftte_jax[progress]); 'log', "
      "a log line per evaluation; 'auto', the bar when stderr is a terminal "
      "and tqdm is installed, else the lines", flag_values=fv)
  flags.DEFINE_list(
      "metrics", [], "writers of the metric rows besides metrics.jsonl, "
      f"comma-separated, of {list(METRIC_WRITERS)}: 'tensorboard' writes "
      "them as TensorBoard events in WORKDIR/tensorboard (pip install "
      "ftte_jax[tensorboard])", flag_values=fv)


def check_flags(fv: flags.FlagValues = flags.FLAGS) -> None:
  """Raises ValueError, naming the flag, for an unknown writer or a
  missing package; cheap, so a launcher calls it before any work."""
  unknown = [w for w in fv.metrics if w not in METRIC_WRITERS]
  if unknown:
    raise ValueError(f"--metrics={','.join(fv.metrics)}: unknown writer "
                     f"{unknown[0]!r}; valid: {', '.join(METRIC_WRITERS)}")
  if "tensorboard" in fv.metrics and not _importable(
      "tensorboard.summary.writer.event_file_writer"):
    raise ValueError("--metrics=tensorboard needs the tensorboard package "
                     "(pip install 'ftte_jax[tensorboard]'), which is not "
                     "installed")
  if fv.progress == "bar" and not _importable("tqdm"):
    raise ValueError("--progress=bar needs tqdm (pip install "
                     "'ftte_jax[progress]'), which is not installed; "
                     "--progress=log writes plain lines")


def _importable(module: str) -> bool:
  try:
    __import__(module)
  except ImportError:
    return False
  return True


def progress_mode(setting: str, stream: IO[str]) -> str:
  """'bar' or 'log' for ``--progress=setting`` writing to ``stream``."""
  if setting != "auto":
    return setting
  isatty = getattr(stream, "isatty", None)
  return "bar" if isatty and isatty() and _importable("tqdm") else "log"


def log_line(row: dict) -> str:
  """One evaluation row as a log line."""
  return (f"round {row['round']:5d}  virtual_time "
          f"{row['virtual_time_s']:10.1f}s  accuracy "
          f"{row['test_accuracy']:.4f}  loss {row['test_loss']:.4f}  "
          f"updates {row['updates_applied']:6d}  updates/s "
          f"{row['client_updates_per_s']:7.1f}  wall {row['wall_s']:6.1f}s")


class TensorBoardWriter:
  """Metric rows as TensorBoard scalar events, one event per row."""

  def __init__(self, logdir: str, history: Sequence[dict]):
    # pylint: disable=g-import-not-at-top
    from tensorboard.compat.proto import event_pb2
    from tensorboard.compat.proto import summary_pb2
    from tensorboard.summary.writer import event_file_writer
    # pylint: enable=g-import-not-at-top
    self._event, self._summary = event_pb2.Event, summary_pb2.Summary
    # The checkpoint's rows are the truth (as for metrics.jsonl): events
    # written after it by an interrupted run are dropped.
    if os.path.isdir(logdir):
      shutil.rmtree(logdir)
    self._writer = event_file_writer.EventFileWriter(logdir)
    for row in history:
      self.write(row)
    self._writer.flush()

  def write(self, row: dict) -> None:
    values = [self._summary.Value(tag=k, simple_value=float(v))
              for k, v in row.items() if k not in _NOT_SCALARS and
              isinstance(v, (int, float)) and not isinstance(v, bool)]
    self._writer.add_event(self._event(
        wall_time=time.time(), step=int(row["round"]),
        summary=self._summary(value=values)))

  def flush(self) -> None:
    self._writer.flush()

  def close(self) -> None:
    self._writer.close()


class Watcher:
  """Progress of a run (bar or log lines) and its extra metric writers.

  ``step(state)`` after every server step moves the bar; ``row(row)`` after
  every evaluation logs the row and hands it to the writers; ``close()``
  at the end.
  """

  def __init__(self, mode: str, rounds: int, history: Sequence[dict],
               start_round: int = 0, workdir: str | None = None,
               writers: Sequence[str] = (), stream: IO[str] | None = None):
    self.mode = mode
    self._writers = []
    if workdir is not None and "tensorboard" in writers:
      self._writers.append(TensorBoardWriter(
          os.path.join(workdir, TENSORBOARD_DIR), history))
    self._bar = None
    self._postfix = {"vt": "-", "acc": "-", "upd/s": "-"}
    if history:
      self._note(history[-1])
    if mode == "bar":
      import tqdm  # pylint: disable=g-import-not-at-top
      self._bar = tqdm.tqdm(
          total=rounds, initial=start_round, unit="round",
          file=stream or sys.stderr, dynamic_ncols=True,
          bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} rounds "
          "[{elapsed}<{remaining}, {rate_fmt}{postfix}]")
      self._bar.set_postfix(self._postfix, refresh=False)

  def _note(self, row: dict) -> None:
    self._postfix.update(
        acc=f"{row['test_accuracy']:.4f}",
        vt=f"{row['virtual_time_s']:.1f}s",
        **{"upd/s": f"{row['client_updates_per_s']:.0f}"})

  def step(self, state) -> None:
    """After a server step (or a chunk of them): moves the bar."""
    if self._bar is None:
      return
    self._postfix["vt"] = f"{float(state.clock):.1f}s"
    self._bar.set_postfix(self._postfix, refresh=False)
    self._bar.update(int(state.version) - self._bar.n)

  def row(self, row: dict) -> None:
    """After an evaluation: the log line (above the bar, if any) and the
    writers."""
    for writer in self._writers:
      writer.write(row)
      writer.flush()
    self._note(row)
    if self._bar is None:
      logging.info(log_line(row))
      return
    self._bar.write(log_line(row), file=self._bar.fp)
    self._bar.set_postfix(self._postfix, refresh=False)
    self._bar.update(int(row["round"]) - self._bar.n)

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()
    for writer in self._writers:
      writer.close()


def start(fv: flags.FlagValues, rounds: int, history: Sequence[dict],
          start_round: int, workdir: str | None) -> Watcher:
  """The watcher ``launch.main``'s flags ask for (``check_flags`` passed).

  Args:
    fv: parsed flags with --progress and --metrics.
    rounds: the run's ``rounds``, the bar's total.
    history: the rows logged before (a resumed run's).
    start_round: the round the run starts from.
    workdir: where writers write; None (a process of a multi-process run
      other than the first, which writes nothing): log lines only, so one
      bar is drawn.
  """
  mode = "log" if workdir is None else progress_mode(fv.progress, sys.stderr)
  return Watcher(mode, rounds, history, start_round, workdir, fv.metrics)
