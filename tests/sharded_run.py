"""Runs a small engine with its K clients split across 1, 2 and 4 devices
for each case named on the command line; prints the final parameters as
JSON. Needs XLA_FLAGS=--xla_force_host_platform_device_count=4
(tests/test_sharding.py starts it so). The case ``scaffold`` runs
examples/scaffold.py's per-device state through ``experiment.build``."""

import importlib.util
import json
import sys
from pathlib import Path

import jax
import numpy as np

from helpers import (build_engine, const_fleet, make_dataset, run_steps,
                     tiny_config, tiny_model)
from ftte_jax import experiment
from ftte_jax.core import algorithms

REPO = Path(__file__).resolve().parents[1]


def run_scaffold(devices: int, steps: int = 6):
  spec = importlib.util.spec_from_file_location(
      "scaffold", REPO / "examples" / "scaffold.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = tiny_config("fedavg", engine_kw=dict(
      buffer_size=4, client_batching="map", mesh_devices=devices),
                       memory_tier_fractions=(2.0,), rounds=steps)
  exp = experiment.build(config, module.scaffold)
  state = exp.init_state()
  for _ in range(steps):
    state, _ = exp.step_fn(exp.env, state)
  table = jax.tree.leaves(state.device_state)[0]
  return {"devices": exp.num_devices, "seen": jax.device_count(),
          "params": [np.asarray(p).tolist() for p in
                     jax.tree.leaves(jax.device_get(state.params))],
          "state": [np.asarray(p).tolist() for p in
                    jax.tree.leaves(jax.device_get(state.device_state))],
          "state_shards": len({str(s.index) for s in table.addressable_shards}),
          "applied": int(state.counters.updates_applied)}


def run(algorithm: str, batching: str, devices: int, steps: int = 20):
  apply, params = tiny_model()
  _, _, data = make_dataset(num_clients=16, per_client=12, equal=False)
  config = algorithms.preset(algorithm,
                             concurrency=4 if algorithm == "fedavg" else 8,
                             buffer_size=4, local_steps=3, batch_size=4,
                             client_lr=0.1, client_batching=batching,
                             mesh_devices=devices)
  fleet = const_fleet(16, speed=np.linspace(1e5, 1e6, 16), sigma=0.3)
  sim, env, state = build_engine(config, apply, params, data, fleet)
  state = run_steps(sim, env, state, steps)
  return {"devices": len(sim.mesh.devices.ravel()) if sim.mesh else 1,
          "seen": jax.device_count(),
          "params": [np.asarray(p).tolist() for p in
                     jax.tree.leaves(jax.device_get(state.params))],
          "applied": int(state.counters.updates_applied)}


if __name__ == "__main__":
  out = {}
  for case in sys.argv[1:]:
    if case == "scaffold":
      out[case] = {d: run_scaffold(d) for d in (1, 2, 4)}
      continue
    alg, batching = case.split(":")
    out[case] = {d: run(alg, batching, d) for d in (1, 2, 4)}
  print("RESULT " + json.dumps(out))
