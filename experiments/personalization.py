r"""Personalized accuracy, energy and fairness across memory tiers.

  python -m experiments.personalization \
      --flagfile=experiments/mnist_paper_pretrained.flags \
      --memory_policy=exclude --partition=sampled --examples_per_client=32 \
      --out_dir=runs/personalization

FTTE, FedBuff and FedAvg on one shared setup (any ``launch.main`` config
flag; the paper-style MNIST flagfile above pretrains the same starting model
for every algorithm; ``--memory_policy=exclude`` makes FedAvg and FedBuff
leave out the devices that cannot hold full-model training, as they would
in a deployment; ``--partition=sampled`` gives every device 32 examples of
its own Dirichlet(0.3) label mix, so each has a slice to hold out, where a
split of the pool leaves some devices a single example), each device
holding out ``--holdout_fraction`` of its
examples. Each algorithm runs as its own ``launch.main`` process (resumable,
``<out_dir>/<algorithm>``), with the per-device evaluation on: the global
model on every evaluated device's own held-out slice, the model after
``--personal_steps`` of local fine-tuning within the device's mask, and
their interpolation (``--personal_mix``).

Writes ``personalization.md`` / ``.json``: per algorithm, global test
accuracy, personalized accuracy (mean and 10th percentile) of the global,
fine-tuned and interpolated models, time and energy to the target; and per
memory tier, the share of applied updates, mean staleness and personalized
accuracy. With matplotlib, ``personalization.png``.
"""

from __future__ import annotations

import os

from absl import flags

from experiments import compare
from launch import flags as flags_lib
from launch import sweep

FLAGS = flags.FLAGS
ALGORITHMS = ("ftte", "fedbuff", "fedavg")
# The study's per-device evaluation; flags given on the command line win.
STUDY = ("--holdout_fraction=0.2", "--personal_eval_clients=200",
         "--personal_steps=5", "--personal_mix=0.5")
ENERGY_KEYS = ("energy_to_target_j", "energy_j")


def _define() -> None:
  flags_lib.define_config_flags()
  flags.DEFINE_list("algorithms", list(ALGORITHMS), "algorithms compared")
  flags.DEFINE_string("out_dir", "runs/personalization",
                      "parent of the runs and of the tables")
  flags_lib.define_checkpoint_flags()


def rows_of(summaries: dict[str, dict]) -> tuple[list[dict], list[dict]]:
  """(one row per algorithm, one row per algorithm and memory tier)."""
  rows, tiers = [], []
  for alg, s in summaries.items():
    row = {"algorithm": alg, "test_accuracy": s["final_accuracy"],
           "time_to_target_s": s.get("time_to_target_s")}
    for kind in ("global", "tuned", "mixed"):
      row[f"{kind}_mean"] = s.get(f"personal_{kind}_mean")
      row[f"{kind}_p10"] = s.get(f"personal_{kind}_p10")
    for k in ENERGY_KEYS:
      row[k] = s.get(k)
    rows.append(row)
    for t in s.get("tier_fairness", []):
      tiers.append({"algorithm": alg, "tier": t["tier"],
                    "devices": t["devices"],
                    "eligible": t["eligible_devices"],
                    "update_share": t["update_share"],
                    "mean_staleness": t["mean_staleness"],
                    "global": t.get("personal_global"),
                    "tuned": t.get("personal_tuned"),
                    "mixed": t.get("personal_mixed")})
  return rows, tiers


def plot(rows: list[dict], path: str) -> str | None:
  """Bars: global and personalized accuracy, and energy to target."""
  try:
    import matplotlib  # pylint: disable=g-import-not-at-top
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  fig, (ax_a, ax_e) = plt.subplots(1, 2, figsize=(11, 4))
  bars = ("test_accuracy", "global_mean", "tuned_mean", "tuned_p10",
          "mixed_mean", "mixed_p10")
  width = 0.8 / len(bars)
  for j, key in enumerate(bars):
    ax_a.bar([i + j * width for i in range(len(rows))],
             [r[key] or 0.0 for r in rows], width, label=key)
  ax_a.set_xticks([i + 0.4 - width / 2 for i in range(len(rows))],
                  [r["algorithm"] for r in rows])
  ax_a.set_ylim(0, 1)
  ax_a.set_ylabel("accuracy")
  ax_a.legend(fontsize=7)
  ax_e.bar([r["algorithm"] for r in rows],
           [r["energy_to_target_j"] or 0.0 for r in rows])
  ax_e.set_ylabel("fleet energy to target (J; 0: not reached)")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    flags_lib.fail(f"unexpected positional arguments {argv[1:]}")
  try:
    per_alg = compare.algorithm_args(
        [*STUDY, *flags_lib.given_args(FLAGS)], FLAGS.algorithms, [])
  except ValueError as e:
    flags_lib.fail(e)
  out_dir = FLAGS.out_dir
  summaries, _, _ = compare.run_algorithms(per_alg, out_dir)
  rows, tiers = rows_of(summaries)
  md = (sweep.markdown_table(rows) + "\n\nPer memory tier:\n\n" +
        sweep.markdown_table(tiers))
  os.makedirs(out_dir, exist_ok=True)
  png = plot(rows, os.path.join(out_dir, "personalization.png"))
  compare.write_results(out_dir, "personalization", md,
                        {"rows": rows, "tiers": tiers, "args": per_alg}, png,
                        failed=len(summaries) < len(per_alg))


def run() -> None:
  flags_lib.run_app(_define, main)


if __name__ == "__main__":
  run()
