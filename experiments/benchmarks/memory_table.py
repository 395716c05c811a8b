r"""The step's memory at K = 10,000 from XLA's buffer assignment, and the
client chunk the memory plan picks for a 16 GB device.

  python -m experiments.benchmarks.memory_table [--budget=16e9]

For the MLP and LeNet-5, N = 100,000 clients over a 60,000-example pool
(``accelerator.py``'s workload: FedAvg, 5 local steps of batch 32), it
runs ``memory_plan.plan_clients`` as on an accelerator: the step traced
with ``jax.default_backend()`` answering "gpu" (``vmap`` for
``client_batching='auto'``, XLA's convolutions), ``client_chunk=0``, the
widest chunk that fits ``--budget`` bytes. Twice per model: FedAvg's
weights are known before training (the chunks are streamed into a running
sum), and with FTTE's variance weight (``variance_beta=1``) every update
is kept for the weighting (``map``: a [K, ...] buffer). Every program the
plan compiled is listed with ``Compiled.memory_analysis``'s figures.

The compiles are the CPU's (XLA:CPU's buffer assignment): a GPU's differs
in its fusions and workspaces, which ``memory_plan.USABLE_FRACTION``
leaves room for, and on the device the plan compiles for the device.
Writes ``experiments/benchmarks/results/memory_plan_cpu.{json,md}``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import types

import jax

from experiments.benchmarks import accelerator
from experiments.benchmarks.common import machine
from ftte_jax.experiment import memory_plan

GIB = 2 ** 30


def plan_rows(model: str, n: int, k: int, budget: float, pool: int
              ) -> list[dict]:
  args = types.SimpleNamespace(pool=pool, seed=0, local_steps=5,
                               batch_size=32, client_lr=0.05, server_lr=1.0)
  bench = accelerator.Bench(args)
  out = []
  real = jax.default_backend
  jax.default_backend = lambda: "gpu"  # trace as on an accelerator.
  try:
    config = bench.context(model, n, k)[0]
    for name, extra in (("fedavg (streamed sum)", {}),
                        ("variance weight (buffered)",
                         {"variance_beta": 1.0})):
      cfg = dataclasses.replace(config, client_chunk=0, **extra)
      measure = lambda b, c, cfg=cfg: bench.compile(
          model, n, k, dataclasses.replace(cfg, client_batching=b,
                                           client_chunk=c))[0]
      row = {"model": model, "n": n, "k": k, "weights": name,
             "budget_bytes": budget}
      try:
        plan = memory_plan.plan_clients(cfg, measure, 1, budget, widest=True)
        row.update(status="fits", batching=plan.batching, chunk=plan.chunk,
                   plan=plan.as_dict())
      except ValueError as e:
        row.update(status=f"does not fit: {e}")
        # What the plan measured before it gave up.
        row["plan"] = {"measured": [
            {"batching": key[3].client_batching,
             "chunk": key[3].client_chunk, **v[0].as_dict()}
            for key, v in bench.programs.items()
            if key[:3] == (model, n, k) and key[3].variance_beta ==
            cfg.variance_beta]}
      out.append(row)
      print(json.dumps({k_: v for k_, v in row.items() if k_ != "plan"}),
            flush=True)
  finally:
    jax.default_backend = real
  return out


def markdown(rows: list[dict]) -> str:
  lines = ["| model | weights | batching | chunk | arguments GiB | "
           "temporaries GiB | peak GiB | within 90% of the budget | picked |",
           "|---|---|---|---:|---:|---:|---:|---|---|"]
  for r in rows:
    usable = memory_plan.USABLE_FRACTION * r["budget_bytes"]
    for m in r["plan"]["measured"]:
      picked = (r["status"] == "fits" and m["batching"] == r["batching"] and
                m["chunk"] == r["chunk"])
      lines.append(
          f"| {r['model']} | {r['weights']} | {m['batching']} | "
          f"{m['chunk'] if m['batching'] != 'vmap' else 'all'} | "
          f"{m['argument_bytes'] / GIB:.2f} | {m['temp_bytes'] / GIB:.2f} | "
          f"{m['peak_bytes'] / GIB:.2f} | "
          f"{'yes' if m['peak_bytes'] <= usable else 'no'} | "
          f"{'**picked**' if picked else ''} |")
    if r["status"] != "fits":
      lines.append(f"| {r['model']} | {r['weights']} | | | | | | | "
                   "nothing fits |")
  return "\n".join(lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--budget", type=float, default=16e9,
                      help="bytes per device (16 GB)")
  parser.add_argument("--models", default="mlp,lenet5")
  parser.add_argument("--k", type=int, default=10_000)
  parser.add_argument("--n", type=int, default=100_000)
  parser.add_argument("--pool", type=int, default=60_000)
  parser.add_argument("--out", default=os.path.join(
      accelerator.RESULTS, "memory_plan_cpu"))
  a = parser.parse_args()
  rows = []
  for model in a.models.split(","):
    rows += plan_rows(model, a.n, a.k, a.budget, a.pool)
  table = markdown(rows)
  text = (f"{machine()}\n\nK = {a.k:,}, N = {a.n:,}, budget "
          f"{a.budget / 1e9:.0f} GB per device (the plan uses "
          f"{memory_plan.USABLE_FRACTION:.0%}); XLA:CPU's memory_analysis of the "
          "step, traced as on an accelerator.\n\n" + table + "\n")
  print("\n" + text)
  os.makedirs(os.path.dirname(a.out), exist_ok=True)
  with open(a.out + ".md", "w") as f:
    f.write(text)
  with open(a.out + ".json", "w") as f:
    json.dump({"machine": machine(), "argv": vars(a), "rows": rows,
               "table": table}, f, indent=1)


if __name__ == "__main__":
  main()
