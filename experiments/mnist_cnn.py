"""LeNet-5 on the real MNIST split: FedAvg and FedBuff, IID and Dirichlet.

The 10,000-image MNIST file is split by seed into an 8,000-image training
pool (partitioned over ``--num_clients`` clients, IID or Dirichlet(alpha))
and 2,000 held-out test images. Each (algorithm, partition) pair is one
``experiment.build(...).run()``; the script prints one table row per run and
writes every run's summary and evaluation history to ``--out`` (JSON).

The fleet is mildly heterogeneous (lognormal speeds, a few stragglers) so
that virtual time separates the synchronous FedAvg from the buffered
FedBuff; every device can hold full-model training (no memory tiers).

Run: python -m experiments.mnist_cnn [--rounds 100] [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from typing import Sequence

import jax

from ftte_jax.core import algorithms
from ftte_jax import experiment
from ftte_jax.core import fleet

TABLE_KEYS = ("algorithm", "partition", "rounds", "final_accuracy",
              "best_accuracy", "virtual_time_s", "rounds_to_target",
              "time_to_target_s", "wall_s")


def machine() -> str:
  """One line naming where the numbers come from."""
  return (f"{platform.system()} {platform.machine()}, {os.cpu_count()} cores; "
          f"jax {jax.__version__} backend={jax.default_backend()}")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--algorithms", default="fedavg,fedbuff",
                 help="comma-separated presets (fedavg, fedbuff, fedasync)")
  p.add_argument("--partitions", default="iid,dirichlet",
                 help="comma-separated: iid, dirichlet")
  p.add_argument("--dirichlet_alpha", type=float, default=0.5)
  p.add_argument("--dataset", default="mnist",
                 help="mnist (real split); 'tiny' only for smoke tests")
  p.add_argument("--model", default="lenet5")
  p.add_argument("--num_clients", type=int, default=100)
  p.add_argument("--buffer_size", type=int, default=10,
                 help="K: clients per FedAvg round / updates per FedBuff step")
  p.add_argument("--concurrency", type=int, default=20,
                 help="C for the asynchronous presets (FedAvg uses C = K)")
  p.add_argument("--local_steps", type=int, default=10)
  p.add_argument("--batch_size", type=int, default=32)
  p.add_argument("--client_lr", type=float, default=0.1)
  p.add_argument("--client_momentum", type=float, default=0.0)
  p.add_argument("--rounds", type=int, default=100)
  p.add_argument("--eval_every", type=int, default=10)
  p.add_argument("--target_accuracy", type=float, default=0.95)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--out", default=os.path.join(tempfile.gettempdir(),
                                               "ftte_mnist_cnn.json"))
  p.add_argument("--quiet", action="store_true", help="no per-eval lines")
  return p.parse_args(argv)


def make_config(args: argparse.Namespace, algorithm: str,
                partition: str) -> experiment.ExperimentConfig:
  """The ExperimentConfig of one (algorithm, partition) run."""
  kw = dict(buffer_size=args.buffer_size, local_steps=args.local_steps,
            batch_size=args.batch_size, client_lr=args.client_lr,
            client_momentum=args.client_momentum)
  if algorithm == "fedasync":
    kw.pop("buffer_size")
  if algorithm != "fedavg":
    kw["concurrency"] = args.concurrency
  return experiment.ExperimentConfig(
      engine=algorithms.preset(algorithm, **kw),
      data=experiment.DataConfig(dataset=args.dataset,
                                 num_clients=args.num_clients,
                                 partition=partition,
                                 dirichlet_alpha=args.dirichlet_alpha),
      fleet=fleet.FleetConfig(speed_sigma=0.5, straggler_fraction=0.1,
                              straggler_slowdown=5.0, task_sigma=0.1),
      # Every device can train the full model: this run is about accuracy,
      # not memory, so no client is excluded by a memory tier.
      memory_tier_fractions=None,
      model=args.model, rounds=args.rounds, eval_every=args.eval_every,
      target_accuracy=args.target_accuracy, seed=args.seed)


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


def main(argv: Sequence[str] | None = None) -> dict:
  """Runs every (algorithm, partition) pair; prints and returns the results."""
  args = parse_args(argv)
  runs = []
  for algorithm in args.algorithms.split(","):
    for partition in args.partitions.split(","):
      cfg = make_config(args, algorithm, partition)
      label = (f"dirichlet({args.dirichlet_alpha:g})"
               if partition == "dirichlet" else partition)
      t0 = time.perf_counter()
      exp = experiment.build(cfg)

      def on_eval(state, row, algorithm=algorithm, label=label):
        if not args.quiet:
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
          "data": {k: v for k, v in exp.info["data"].items()
                   if k != "padding"},
          "history": [{k: r[k] for k in ("round", "virtual_time_s",
                                         "test_accuracy", "test_loss")}
                      for r in history],
          "config": cfg.to_dict()})
  table = format_table(runs)
  print(machine())
  print(f"MNIST pool split, {args.model}, {args.num_clients} clients, "
        f"K={args.buffer_size}, local_steps={args.local_steps}, "
        f"batch={args.batch_size}, client_lr={args.client_lr}, "
        f"target={args.target_accuracy}")
  print(table)
  result = {"machine": machine(), "args": vars(args), "table": table,
            "runs": runs}
  if args.out:
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
      json.dump(result, f, indent=1, default=str)
    print(f"wrote {args.out}")
  return result


if __name__ == "__main__":
  main()
