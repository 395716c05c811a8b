"""Engine throughput versus the compute floor.

For each workload this prints client updates per second of the full engine
(server step: arrivals, ring-buffer gather, K clients trained, weighting,
aggregation, server optimizer, dispatch) and of the *compute floor*: the same
local training (same clients, steps, batch) done by one jitted vmapped call
with no federated machinery. ratio = engine seconds per step / floor seconds
per K updates. The engine's client paths (vmap, lax.map, and the streamed
lax.map that keeps only the running sum) are timed, so the table shows which
one ``client_batching='auto'`` should take on this backend (docs/design.md,
"Client training and batching"); the stream path is compared with the map
floor. Engine and floor both use the static fast path the experiment uses
(``client.leaf_kinds`` of the plan: here the full model, no mask product)
and the engine's local-step loop form. Each workload's floors and engine
paths are compiled first, with the XLA options runs compile the step with
(``experiment.run.step_compiler_options``), and then timed in turn, best
of 5 rounds, so a burst of load on the shared machine hits both sides of a
ratio.

The second table is the gain of that static path when a plan trains a
subset (one tier): the floor's local training of the last ``n`` parameter
tensors, once through the general masked path (gradients of every
parameter, multiplied by the mask) and once with the trained and frozen
leaves split statically (only the trained ones are differentiated, so XLA
prunes the backward pass below the earliest trained layer).

Run: python -m experiments.benchmarks.throughput [--quick]
"""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np

from experiments.benchmarks.common import best_time, machine
from ftte_jax.core import algorithms
from ftte_jax.data import client_data
from ftte_jax.core import engine
from ftte_jax.core import fleet
from ftte_jax.core import masks
from ftte_jax import models
from ftte_jax.core.client import leaf_kinds
from ftte_jax.core import extensions
from ftte_jax.core.client import (LocalData, make_client_optimizer,
                                  make_client_update)
from ftte_jax.experiment import run as experiment_run

WORKLOADS = {
    # name: (model, kwargs, N, C, K, local steps, batch, examples per client)
    "mlp": ("mlp", {}, 1000, 200, 50, 5, 32, 32),
    "cnn": ("lenet5", {}, 200, 40, 10, 5, 32, 32),
}


def build(workload: str, batching: str):
  name, kw, n, c, k, steps, batch, per = WORKLOADS[workload]
  rng = np.random.default_rng(0)
  x = rng.normal(size=(n * per, 28, 28, 1)).astype(np.float32)
  y = rng.integers(0, 10, n * per).astype(np.int32)
  data = client_data.from_partition(x, y, np.split(np.arange(n * per), n))
  model = models.get_model(name, 10, **kw)
  params = model.init(jax.random.PRNGKey(0), x[:1])["params"]
  apply = lambda p, xb: model.apply({"params": p}, xb)
  config = algorithms.preset("fedbuff", concurrency=c, buffer_size=k,
                             local_steps=steps, batch_size=batch,
                             client_lr=0.01, client_batching=batching)
  flt = fleet.make_fleet(fleet.FleetConfig(straggler_fraction=0.5), n, 0)
  plan = masks.full_plan(params, n)
  env = engine.make_environment(config, data, flt, plan)
  sim = engine.make_simulator(config, apply,
                              kinds=leaf_kinds(plan.masks))
  return config, apply, params, env, sim, plan


def engine_runner(workload: str, batching: str, rounds: int):
  """A compiled engine: a function running ``rounds`` server steps."""
  _, _, params, env, sim, plan = build(workload, batching)
  state = jax.jit(sim.init)(jax.random.PRNGKey(0), env, params, plan)
  step = jax.jit(sim.step, donate_argnums=1,
                 compiler_options=experiment_run.step_compiler_options())
  state, _ = step(env, state)
  jax.block_until_ready(state)
  box = [state]

  def run():
    s = box[0]
    for _ in range(rounds):
      s, _ = step(env, s)
    box[0] = jax.block_until_ready(s)

  return run


def interleaved_best(fns: dict, repeats: int, number: dict) -> dict:
  """Best seconds per call of each compiled function, timed in turn.

  Alternating the functions within each repeat makes a burst of load on
  this shared machine hit all of them, not one side of a ratio.
  """
  best = {name: float("inf") for name in fns}
  for _ in range(repeats):
    for name, fn in fns.items():
      best[name] = min(best[name], best_time(fn, 1, number[name]))
  return best


def floor_runner(workload: str, batching: str, last_n: int | None = None,
                 static: bool = True):
  """A compiled floor: one jitted call training the K clients.

  ``last_n``: train only the last ``n`` tensors (None: the full model);
  ``static``: the split fast path (else the general masked path).
  """
  config, apply, params, env, _, plan = build(workload, "vmap")
  if last_n is not None:
    plan = masks.make_plan(params, [masks.last_n_mask(params, last_n)],
                           np.zeros(env.data.num_clients, np.int32))
  k = config.buffer_size
  upd = make_client_update(apply, config.batch_size,
                           make_client_optimizer(config.client_lr),
                           config.local_steps,
                           # the engine's loop form (rolled by default).
                           unroll=True if config.unroll_local_steps else 1,
                           kinds=leaf_kinds(plan.masks) if static else None)
  base = jax.tree.map(lambda p: jnp.broadcast_to(p, (k,) + p.shape), params)
  ones = jax.tree.map(lambda m: jnp.broadcast_to(m[0], (k,) + m.shape[1:]),
                      plan.masks)
  keys = jax.random.split(jax.random.PRNGKey(0), k)
  offsets, counts = env.data.offsets[:k], env.data.counts[:k]
  steps = jnp.full((k,), config.local_steps, jnp.int32)
  data = env.data
  # The engine's XLA options, so that the floor is a fair one.
  options = experiment_run.step_compiler_options()

  def one(key, base, mask, offset, count, n_steps):
    local = LocalData(source=data, offset=offset, count=count,
                      num_steps=n_steps)
    return upd(key, base, mask, local)[:2]

  if batching == "vmap":
    f = jax.jit(jax.vmap(one), compiler_options=options)
  else:
    f = jax.jit(lambda *a: jax.lax.map(lambda b: one(*b), a),
                compiler_options=options)
  args = (keys, base, ones, offsets, counts, steps)
  jax.block_until_ready(f(*args))
  return lambda: jax.block_until_ready(f(*args))


def time_floor(workload: str, batching: str, last_n: int | None = None,
               static: bool = True) -> float:
  """Seconds for the K clients' local training alone, one jitted call."""
  return best_time(floor_runner(workload, batching, last_n, static),
                   repeats=5, number=3)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true",
                      help="fewer timed rounds (smoke run)")
  parser.add_argument("--workloads", default="mlp,cnn")
  parser.add_argument("--json", default=None, help="also write results here")
  args = parser.parse_args()
  rounds = 3 if args.quick else 10
  print("machine:", machine())
  print(f"{'workload':8} {'path':5} {'floor upd/s':>12} {'engine upd/s':>13} "
        f"{'ratio':>6} {'ratio vs vmap floor':>20}")
  results = []
  for w in args.workloads.split(","):
    k = WORKLOADS[w][4]
    fns = {("floor", b): floor_runner(w, b) for b in ("vmap", "map")}
    fns.update({("engine", b): engine_runner(w, b, rounds)
                for b in ("vmap", "map", "stream")})
    best = interleaved_best(fns, repeats=5, number={
        name: 1 if name[0] == "engine" else 3 for name in fns})
    floors = {b: best[("floor", b)] for b in ("vmap", "map")}
    floors["stream"] = floors["map"]
    for b in ("vmap", "map", "stream"):
      t = best[("engine", b)] / rounds
      row = dict(workload=w, path=b, floor_updates_per_s=k / floors[b],
                 engine_updates_per_s=k / t, ratio=t / floors[b],
                 ratio_vs_vmap_floor=t / floors["vmap"])
      results.append(row)
      print(f"{w:8} {b:5} {row['floor_updates_per_s']:12.1f} "
            f"{row['engine_updates_per_s']:13.1f} {row['ratio']:6.2f} "
            f"{row['ratio_vs_vmap_floor']:20.2f}")
  print("auto path on this backend (fedbuff, no variance weight):",
        extensions.resolve_batching(algorithms.preset("fedbuff"), True))
  print(f"\n{'workload':8} {'trained':18} {'masked upd/s':>13} "
        f"{'static upd/s':>13} {'gain':>6}")
  sparse = []
  for w in args.workloads.split(","):
    k = WORKLOADS[w][4]
    for n in (2, 4, None):
      general, split = (time_floor(w, "map", n, static)
                        for static in (False, True))
      row = dict(workload=w, trained=f"last {n} tensors" if n else "all",
                 masked_updates_per_s=k / general,
                 static_updates_per_s=k / split, gain=general / split)
      sparse.append(row)
      print(f"{w:8} {row['trained']:18} {row['masked_updates_per_s']:13.1f} "
            f"{row['static_updates_per_s']:13.1f} {row['gain']:6.2f}")
  results = {"engine": results, "sparse": sparse}
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"machine": machine(), "results": results}, f, indent=1)


if __name__ == "__main__":
  main()
