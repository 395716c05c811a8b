r"""Do FTTE's gains over FedAvg grow with the number of devices?

  python -m experiments.scaling_devices --out_dir=runs/scaling-devices
  python -m experiments.scaling_devices --devices=100,500 --rounds=100 ...

The paper reports that FTTE's advantage grows with the fleet. For each
device count N in ``--devices`` this runs ``experiments.compare`` (FTTE,
FedBuff and FedAvg, each its own ``launch.main`` process, resumable) on one
shared setup in which only N changes: every device draws its data from the
same distribution (``partition=sampled``: Dirichlet(0.3) label proportions
and 32 examples drawn with replacement from the MNIST pool, so the
per-device distribution does not depend on N; a split of the pool would
give each device fewer examples as N grows) and its speed from the same
straggler mix; the server keeps the same ``C`` tasks in flight and steps on
the same buffer ``K``; every algorithm starts from the same model,
pretrained on the server's proxy set (the default setting). Every config
flag of ``launch.main`` sets the shared setup; the defaults below are this
study's.

Writes ``scaling.md``/``scaling.json`` in ``--out_dir`` (time-to-target
reduction ``1 - t/t_fedavg`` of FTTE and FedBuff per N, with final
accuracies and the memory and upload ratios) and, with matplotlib,
``scaling.png``. The runs stay in ``<out_dir>/N<n>/<algorithm>``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from absl import flags

from launch import flags as flags_lib
from launch import sweep

FLAGS = flags.FLAGS
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ALGORITHMS = ("ftte", "fedbuff", "fedavg")
# The study's shared setup; any config flag given on the command line wins.
STUDY = (
    "--dataset=mnist", "--partition=sampled", "--dirichlet_alpha=0.3",
    "--examples_per_client=32", "--model=mlp", "--straggler_fraction=0.9",
    "--straggler_slowdown=10", "--task_sigma=0.2", "--concurrency=100",
    "--buffer_size=10", "--local_steps=5", "--batch_size=32",
    "--client_lr=0.05", "--memory_policy=ignore", "--rounds=300",
    "--eval_every=10", "--target_accuracy=0.87",
    "--first_download=deployed")


def _define() -> None:
  flags_lib.define_config_flags()
  flags.DEFINE_list("devices", ["100", "500", "2000", "10000"],
                    "device counts N to compare at")
  flags.DEFINE_string("out_dir", "runs/scaling-devices",
                      "parent of the per-N comparisons and of the tables")
  flags_lib.define_checkpoint_flags()


def study_args(given: list[str], n: int) -> list[str]:
  """The shared launch.main arguments at ``n`` devices (``given`` wins).

  Raises:
    ValueError: an invalid option, or fewer devices than tasks in flight.
  """
  own = {a.split("=", 1)[0] for a in given}
  args = [a for a in STUDY if a.split("=", 1)[0] not in own] + list(given)
  args = [a for a in args if not a.startswith("--num_clients=")]
  args.append(f"--num_clients={n}")
  flags_lib.resolve_args(args)  # checks every option before any run.
  return args


def rows_of(compare: dict, n: int) -> dict:
  """One table row from a compare.json: per-algorithm figures at N."""
  by = {r["algorithm"]: r for r in compare["rows"]}
  row = {"devices": n}
  for alg in ALGORITHMS:
    r = by.get(alg, {})
    row[f"{alg}_final_accuracy"] = r.get("final_accuracy")
    row[f"{alg}_time_to_target_s"] = r.get("time_to_target_s")
    if alg != "fedavg":
      row[f"{alg}_reduction_vs_fedavg"] = r.get("speedup_vs_fedavg")
      row[f"{alg}_memory_ratio"] = r.get("memory_ratio_vs_fedavg")
      row[f"{alg}_upload_ratio"] = r.get("upload_ratio_vs_fedavg")
  return row


def plot(rows: list[dict], path: str) -> str | None:
  """Time-to-target reduction against N; None without matplotlib."""
  try:
    import matplotlib  # pylint: disable=g-import-not-at-top
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  fig, ax = plt.subplots(figsize=(5.5, 3.8))
  for alg in ("ftte", "fedbuff"):
    pts = [(r["devices"], r[f"{alg}_reduction_vs_fedavg"]) for r in rows
           if r[f"{alg}_reduction_vs_fedavg"] is not None]
    if pts:
      ax.plot(*zip(*pts), marker="o", label=alg)
  ax.set_xscale("log")
  ax.set_xlabel("devices N")
  ax.set_ylabel("time-to-target reduction vs FedAvg")
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path


def _run(fv: flags.FlagValues) -> None:
  given = flags_lib.given_args(fv)
  per_n = {int(n): study_args(given, int(n)) for n in fv.devices}
  rows = []
  for n, args in per_n.items():
    out = os.path.abspath(os.path.join(fv.out_dir, f"N{n}"))
    cmd = [sys.executable, "-m", "experiments.compare", *args,
           f"--algorithms={','.join(ALGORITHMS)}", f"--compare_dir={out}",
           *flags_lib.checkpoint_args(fv)]
    print(f"N={n}: {' '.join(cmd[2:])}", flush=True)
    subprocess.run(cmd, cwd=REPO, check=True)
    with open(os.path.join(out, "compare.json")) as f:
      rows.append(rows_of(json.load(f), n))
  md = (sweep.markdown_table(rows) + "\nreduction = 1 - t_target / "
        "t_target(FedAvg) in virtual time; ratios are to FedAvg. Shared "
        f"setup: {' '.join(per_n[min(per_n)][:-1])}\n")
  png = plot(rows, os.path.join(fv.out_dir, "scaling.png"))
  from ftte_jax import checkpointing  # pylint: disable=g-import-not-at-top
  checkpointing.write_text(os.path.join(fv.out_dir, "scaling.md"), md)
  checkpointing.write_json(os.path.join(fv.out_dir, "scaling.json"),
                           {"rows": rows, "args": per_n, "plot": png})
  print(md, flush=True)


def _check(fv: flags.FlagValues) -> None:
  given = flags_lib.given_args(fv)
  for n in fv.devices:
    if not n.isdigit() or int(n) < 1:
      raise ValueError(f"devices: {n!r} is not a positive integer")
    study_args(given, int(n))


def run() -> None:
  flags_lib.run_app(_define, flags_lib.checked_main(_check, _run))


if __name__ == "__main__":
  run()
