"""Benchmark: personalized evaluation of a whole fleet in one jitted call.

Run: python -m experiments.benchmarks.personal_eval [--devices=10000]
     [--loop_devices=200] [--chunks=1,64]
     [--out=experiments/benchmarks/results/personal_eval_cpu.json]

Each of ``--devices`` devices holds 16 training and 4 held-out MNIST-shaped
examples (random: the cost does not depend on the values) and an MLP
(784-200-200-10) mask that trains its last layer; each is fine-tuned for 5
local steps (batch 8) and its global, fine-tuned and interpolated models are
scored on its held-out slice. Compared:

  one call  ``personal.make_personal_eval`` over every device (``lax.map`` of
            vmapped chunks of c devices, for each c in ``--chunks``), jitted
            once, timed once after compilation;
  loop      the same per-device computation jitted once and called from a
            Python loop, one device per call; timed over ``--loop_devices``
            devices and scaled to the fleet (its cost is linear in devices).

Memory: XLA's compiled temporary buffers of each program
(``memory_analysis``), besides the fleet's data, which both share. Prints
the machine, writes a JSON.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments.benchmarks import common
from ftte_jax import models
from ftte_jax.core import client
from ftte_jax.core import losses
from ftte_jax.core import personal
from ftte_jax.data import client_data


def _fleet(n: int, train: int, held: int, seed: int = 0):
  rng = np.random.default_rng(seed)
  per = train + held
  x = rng.random((n * per, 28, 28, 1), dtype=np.float32)
  y = rng.integers(0, 10, n * per).astype(np.int32)
  rows = np.arange(n * per).reshape(n, per)
  data = client_data.from_partition(x, y, list(rows[:, :train]))
  holdout = client_data.from_partition(x, y, list(rows[:, train:]))
  return data, holdout


def _temp_bytes(compiled) -> float | None:
  try:
    return float(compiled.memory_analysis().temp_size_in_bytes)
  except Exception:  # pylint: disable=broad-except
    return None  # not every backend reports it.


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument("--devices", type=int, default=10000)
  ap.add_argument("--loop_devices", type=int, default=200)
  ap.add_argument("--chunks", default="1,64")
  ap.add_argument("--out", default=None)
  args = ap.parse_args()
  model = models.get_model("mlp", 10)
  params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 28, 28, 1)))
  params = params["params"]
  apply = lambda p, x: model.apply({"params": p}, x)
  names = sorted(params)
  masks = {k: jax.tree.map(
      lambda p, last=(k == names[-1]): jnp.full((1,) + p.shape, float(last)),
      v) for k, v in params.items()}
  data, holdout = _fleet(args.devices, 16, 4)
  tier = jnp.zeros(args.devices, jnp.int32)
  task = losses.classification(apply)
  update = client.sgd(task.loss, 8, optax.sgd(0.05), 5)
  one_eval = jax.jit(personal.make_personal_eval(task.metrics, update, 5, 0.5,
                                                 4, chunk=1))
  key = jax.random.PRNGKey(1)
  clients = jnp.arange(args.devices, dtype=jnp.int32)
  fleet_args = (key, params, masks, tier, data, holdout, clients)
  calls = {}
  for chunk in (int(c) for c in args.chunks.split(",")):
    fleet_eval = jax.jit(personal.make_personal_eval(task.metrics, update, 5,
                                                     0.5, 4, chunk=chunk))
    t0 = time.perf_counter()
    compiled = fleet_eval.lower(*fleet_args).compile()
    compile_s = time.perf_counter() - t0
    t_call = common.best_time(
        lambda c=compiled: jax.block_until_ready(c(*fleet_args)), repeats=1)
    calls[chunk] = {"one_call_s": t_call, "compile_s": compile_s,
                    "temp_bytes": _temp_bytes(compiled)}
  one = lambda i: one_eval(key, params, masks, tier, data, holdout,
                           clients[i:i + 1])
  one_compiled = one_eval.lower(key, params, masks, tier, data, holdout,
                                clients[:1]).compile()
  jax.block_until_ready(one(0))
  m = min(args.loop_devices, args.devices)
  t_loop = common.best_time(lambda: [jax.block_until_ready(one(i).accuracy)
                                     for i in range(m)], repeats=2) / m
  for c in calls.values():
    c["speedup_vs_loop"] = t_loop * args.devices / c["one_call_s"]
  result = {
      "machine": common.machine(), "devices": args.devices,
      "one_call_by_chunk": calls, "loop_s_per_device": t_loop,
      "loop_devices_timed": m,
      "loop_s_fleet_estimate": t_loop * args.devices,
      "per_device_call_temp_bytes": _temp_bytes(one_compiled),
      "fleet_data_bytes": float(data.x.nbytes + holdout.x.nbytes),
  }
  print(json.dumps(result, indent=2))
  if args.out:
    with open(args.out, "w") as f:
      json.dump(result, f, indent=2)


if __name__ == "__main__":
  main()
