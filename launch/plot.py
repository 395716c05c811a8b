r"""Plots finished runs: test accuracy against virtual time, rounds and bytes.

  python -m launch.plot WORKDIR [WORKDIR ...] [--out=accuracy.png]

Each WORKDIR is a ``launch.main`` output directory (``launch.sweep`` and
``experiments.compare`` make one per run); its ``metrics.jsonl`` gives the
curve and its ``config.json`` the label (algorithm and directory name).
Three panels: accuracy over virtual seconds, over server rounds, and over
bytes communicated (up + down, log scale), with the target accuracy as a
dotted line when the runs share one. Needs matplotlib (``pip install
ftte_jax[plot]``). Bad input exits with status 2 and one line.
"""

from __future__ import annotations

import importlib.util
import json
import os
from typing import Sequence

from absl import app
from absl import flags

from launch import flags as flags_lib

# (panel title's x label, row -> x value, log scale).
PANELS = (
    ("virtual time (s)", lambda r: r["virtual_time_s"], False),
    ("server rounds", lambda r: r["round"], False),
    ("bytes communicated (up + down)",
     lambda r: r["bytes_up"] + r["bytes_down"], True),
)


def define_flags(fv: flags.FlagValues = flags.FLAGS) -> None:
  flags.DEFINE_string("out", "accuracy.png", "image to write (its suffix "
                      "picks the format: .png, .pdf, .svg)", flag_values=fv)


def load_run(workdir: str) -> tuple[str, list[dict], float | None]:
  """``(label, metric rows, target accuracy or None)`` of one workdir.

  Raises:
    ValueError: naming the workdir, when it holds no readable metrics.
  """
  path = os.path.join(workdir, "metrics.jsonl")
  try:
    with open(path) as f:
      rows = [json.loads(line) for line in f if line.strip()]
  except FileNotFoundError:
    raise ValueError(f"{workdir}: no metrics.jsonl (not a launch.main "
                     "workdir, or the run has not logged yet)") from None
  except (OSError, json.JSONDecodeError) as e:
    raise ValueError(f"{path}: unreadable ({e})") from None
  if not rows:
    raise ValueError(f"{path}: no metric rows yet")
  name = os.path.basename(os.path.normpath(workdir))
  label, target = name, None
  try:
    with open(os.path.join(workdir, "config.json")) as f:
      config = json.load(f)
    label = f"{config['algorithm']} ({name})"
    target = config["experiment"].get("target_accuracy")
  except (OSError, json.JSONDecodeError, KeyError):
    pass  # a label from the directory alone.
  if not os.path.exists(os.path.join(workdir, "summary.json")):
    label += ", unfinished"
  # Crossing rows (the exact step a target was reached) are points of the
  # curve too; rows are in round order already.
  return label, rows, target


def draw(runs: Sequence[tuple[str, list[dict]]], target: float | None,
         path: str) -> str:
  """Writes the three-panel figure of ``runs`` ((label, rows) pairs) to
  ``path``; returns it."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  from matplotlib import ticker  # pylint: disable=g-import-not-at-top
  fig, axes = plt.subplots(1, len(PANELS), figsize=(5 * len(PANELS), 4),
                           sharey=True)
  for label, rows in runs:
    acc = [r["test_accuracy"] for r in rows]
    for ax, (_, x, _) in zip(axes, PANELS):
      ax.plot([x(r) for r in rows], acc, label=label, marker=".", ms=3)
  for ax, (xlabel, _, log) in zip(axes, PANELS):
    if target is not None:
      ax.axhline(target, color="grey", ls=":", lw=1)
    ax.set_xlabel(xlabel)
    ax.grid(alpha=0.3)
    if log:
      ax.set_xscale("log")
      ax.xaxis.set_minor_formatter(ticker.NullFormatter())
  axes[0].set_ylabel("test accuracy")
  axes[0].legend(fontsize="small")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path


def main(argv: list[str]) -> None:
  workdirs = argv[1:]
  if not workdirs:
    flags_lib.fail("name at least one workdir: python -m launch.plot "
                   "WORKDIR [WORKDIR ...]")
  if importlib.util.find_spec("matplotlib") is None:
    flags_lib.fail("launch.plot needs matplotlib (pip install "
                   "'ftte_jax[plot]'), which is not installed")
  try:
    loaded = [load_run(w) for w in workdirs]
  except ValueError as e:
    flags_lib.fail(e)
  targets = {t for _, _, t in loaded}
  target = targets.pop() if len(targets) == 1 else None
  out = flags.FLAGS.out
  try:
    draw([(label, rows) for label, rows, _ in loaded], target, out)
  except (OSError, ValueError) as e:
    flags_lib.fail(f"--out={out}: cannot write it ({e})")
  print(out)


if __name__ == "__main__":
  define_flags()
  app.run(main, flags_parser=flags_lib.parse_or_exit)
