"""LeNet-5 on the real MNIST split: FedAvg and FedBuff, IID and Dirichlet.

The 10,000-image MNIST file is split by seed into an 8,000-image training
pool (partitioned over ``--num_clients`` clients, IID or Dirichlet(alpha))
and 2,000 held-out test images. Each (algorithm, partition) pair is one
``experiment.build(...).run()``; the script prints one table row per run and
writes every run's summary and evaluation history to ``--out`` (JSON).

The fleet is mildly heterogeneous (lognormal speeds, a few stragglers) so
that virtual time separates the synchronous FedAvg from the buffered
FedBuff; every device can hold full-model training (no memory tiers).

Every config flag of ``launch.main`` applies (``--helpfull`` lists them),
with this script's defaults (``DEFAULTS``); ``--algorithms`` and
``--partitions`` take the place of ``--algorithm`` and ``--partition``.
Options a preset pins take the pinned value (FedAvg: concurrency = K;
FedAsync: K = 1), as in ``experiments.compare``.

Run: python -m experiments.mnist_cnn [--rounds=100] [--out=results.json]
"""

from __future__ import annotations

import json
import os
import tempfile
import time

from absl import flags

from experiments.benchmarks.common import machine
from ftte_jax import experiment
from ftte_jax.core import algorithms
from ftte_jax.data import partition
from launch import flags as flags_lib

FLAGS = flags.FLAGS
TABLE_KEYS = ("algorithm", "partition", "rounds", "final_accuracy",
              "best_accuracy", "virtual_time_s", "rounds_to_target",
              "time_to_target_s", "wall_s")
# Where this script's setting differs from the library's defaults.
DEFAULTS = {
    "concurrency": 20,  # C of the asynchronous presets (FedAvg: C = K).
    "local_steps": 10,
    "client_lr": 0.1,
    "target_accuracy": 0.95,
    # Mildly heterogeneous devices, so that virtual time separates the
    # synchronous FedAvg from the buffered FedBuff.
    "speed_sigma": 0.5,
    "straggler_fraction": 0.1,
    "straggler_slowdown": 5.0,
    "task_sigma": 0.1,
    # Every device can train the full model: this run is about accuracy,
    # not memory, so no client is excluded by a memory tier.
    "memory_tier_fractions": "none",
}
_OWN_FLAGS = ("algorithms", "partitions", "out", "quiet")


def define_flags(fv: flags.FlagValues = flags.FLAGS) -> None:
  """Registers the config flags (with ``DEFAULTS``) and the script's own."""
  flags_lib.define_config_flags(fv, defaults=DEFAULTS,
                                exclude=("algorithm", "partition"))
  flags.DEFINE_list("algorithms", ["fedavg", "fedbuff"], "presets to run, "
                    f"of {algorithms.PRESETS}", flag_values=fv)
  flags.DEFINE_list("partitions", ["iid", "dirichlet"], "partitions each "
                    f"algorithm runs on, of {partition.PARTITIONS}",
                    flag_values=fv)
  flags.DEFINE_string("out", os.path.join(tempfile.gettempdir(),
                                          "ftte_mnist_cnn.json"),
                      "JSON file for the results ('' for none)",
                      flag_values=fv)
  flags.DEFINE_bool("quiet", False, "no per-eval lines", flag_values=fv)


def make_config(fv: flags.FlagValues, algorithm: str,
                partition: str) -> experiment.ExperimentConfig:
  """The ExperimentConfig of one (algorithm, partition) run.

  Raises:
    ValueError: an invalid option (the message names it).
  """
  # From scratch (random start, all weights in RAM), as first published.
  args = flags_lib.for_algorithm(
      [*flags_lib.SCRATCH_ARGS, *flags_lib.given_args(fv)], algorithm,
      [f"--partition={partition}"])
  return flags_lib.resolve_args(args).config


def format_table(rows: list[dict]) -> str:
  """Fixed-width table of the runs' headline figures."""
  head = (f"{'algorithm':<9} {'partition':<14} {'rounds':>6} {'final_acc':>9} "
          f"{'best_acc':>8} {'virt_time_s':>11} {'rnd@tgt':>7} "
          f"{'time@tgt_s':>10} {'wall_s':>7}")
  lines = [head, "-" * len(head)]
  fmt = lambda v, f: "-" if v is None else format(v, f)
  for r in rows:
    lines.append(
        f"{r['algorithm']:<9} {r['partition']:<14} {r['rounds']:>6d} "
        f"{r['final_accuracy']:>9.4f} {r['best_accuracy']:>8.4f} "
        f"{r['virtual_time_s']:>11.1f} {fmt(r['rounds_to_target'], 'd'):>7} "
        f"{fmt(r['time_to_target_s'], '.1f'):>10} {r['wall_s']:>7.1f}")
  return "\n".join(lines)


def make_configs(fv: flags.FlagValues
                 ) -> list[tuple[str, str, experiment.ExperimentConfig]]:
  """(algorithm, partition, config) of every run.

  Raises:
    ValueError: an invalid option (the message names it).
  """
  return [(a, p, make_config(fv, a, p))
          for a in fv.algorithms for p in fv.partitions]


def run_all(fv: flags.FlagValues = flags.FLAGS) -> dict:
  """Runs every (algorithm, partition) pair; prints and returns the results.

  Raises:
    ValueError: an invalid option, before anything runs.
  """
  configs = make_configs(fv)
  runs = []
  for algorithm, partition, cfg in configs:
    label = (f"dirichlet({cfg.data.dirichlet_alpha:g})"
             if partition == "dirichlet" else partition)
    t0 = time.perf_counter()
    exp = experiment.build(cfg)

    def on_eval(state, row, algorithm=algorithm, label=label):
      del state
      if not fv.quiet:
        print(f"  {algorithm:<8} {label:<14} round {row['round']:>4} "
              f"t={row['virtual_time_s']:>8.1f}s "
              f"acc={row['test_accuracy']:.4f} loss={row['test_loss']:.4f}",
              flush=True)

    state, history, timing = exp.run(on_eval=on_eval)
    s = exp.summary(state, history, timing)
    runs.append({
        "algorithm": algorithm, "partition": label,
        "rounds": s["rounds"], "final_accuracy": s["final_accuracy"],
        "final_loss": s["final_loss"], "best_accuracy": s["best_accuracy"],
        "virtual_time_s": s["virtual_time_s"],
        "rounds_to_target": s["rounds_to_target"],
        "time_to_target_s": s["time_to_target_s"],
        "client_updates": s["client_updates"],
        "mean_staleness": s["mean_staleness"],
        "updates_dropped": s["updates_dropped"],
        "wall_s": time.perf_counter() - t0, "compile_s": s["compile_s"],
        "data": {k: v for k, v in exp.info["data"].to_dict().items()
                 if k != "layout"},
        "history": [{k: r[k] for k in ("round", "virtual_time_s",
                                       "test_accuracy", "test_loss")}
                    for r in history],
        "config": cfg.to_dict()})
  table = format_table(runs)
  first = configs[0][2]
  print(machine())
  print(f"MNIST pool split, {first.model}, {first.data.num_clients} clients, "
        f"K={first.engine.buffer_size}, local_steps="
        f"{first.engine.local_steps}, batch={first.engine.batch_size}, "
        f"client_lr={first.engine.client_lr}, "
        f"target={first.target_accuracy}")
  print(table)
  result = {"machine": machine(),
            "args": flags_lib.flag_values(fv, _OWN_FLAGS), "table": table,
            "runs": runs}
  if fv.out:
    os.makedirs(os.path.dirname(os.path.abspath(fv.out)), exist_ok=True)
    with open(fv.out, "w") as f:
      json.dump(result, f, indent=1, default=str)
    print(f"wrote {fv.out}")
  return result


main = flags_lib.checked_main(make_configs, run_all)


if __name__ == "__main__":
  flags_lib.run_app(define_flags, main)
