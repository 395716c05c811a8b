"""The experiment runner: the default experiment's memory and payload
ratios, per-tier reporting, and option errors."""

import dataclasses

import chex
import jax
import numpy as np
import pytest

from helpers import SCRATCH_DATA, SCRATCH_SEARCH, SCRATCH_TOP
from ftte_jax.core import algorithms
from ftte_jax import experiment
from ftte_jax.core import exact
from ftte_jax.core import fleet


@pytest.mark.slow  # builds two default experiments on real MNIST
def test_default_experiment_ftte_memory_and_payload_vs_fedavg():
  # The paper's reductions: 80% less device memory, 69% less upload.
  base = experiment.ExperimentConfig()
  exps = {}
  for alg in ("ftte", "fedavg"):
    cfg = dataclasses.replace(base, engine=algorithms.preset(alg))
    exps[alg] = experiment.build(cfg)
  ftte, avg = exps["ftte"], exps["fedavg"]
  mem_ratio = (float(np.max(ftte.setup.plan.memory_bytes)) /
               float(avg.setup.plan.memory_bytes[0]))
  up_ratio = (float(np.max(ftte.setup.plan.upload_bytes)) /
              float(avg.setup.plan.upload_bytes[0]))
  print(f"default experiment: ftte/fedavg peak memory {mem_ratio:.3f}, "
        f"upload per update {up_ratio:.3f}")
  assert mem_ratio <= 0.20
  assert up_ratio <= 0.31
  assert float(avg.setup.plan.memory_bytes[0]) == pytest.approx(
      avg.info["full_model_memory_bytes"])
  assert ftte.setup.probe.clients > 0 and ftte.setup.probe.time_s > 0


def test_ftte_per_tier_run_reports_tier_memory_and_payload():
  cfg = experiment.ExperimentConfig(
      engine=algorithms.preset("ftte", concurrency=8, buffer_size=4,
                               local_steps=2, batch_size=16),
      data=experiment.DataConfig(dataset="tiny", num_clients=16,
                                 partition="iid", **SCRATCH_DATA),
      search=experiment.SearchConfig(policy="per_tier", importance="proxy",
                                     **SCRATCH_SEARCH),
      fleet=fleet.FleetConfig(tier_probs=(0.4, 0.3, 0.3)),
      memory_tier_fractions=(0.6, 0.8, 1.0), model="mlp",
      model_options={"hidden": (32,)}, rounds=6, eval_every=3, **SCRATCH_TOP)
  exp = experiment.build(cfg)
  tiers = exp.info["plan"]["tiers"]
  assert len(tiers) == 3
  mem = [t["memory"]["total"] for t in tiers]
  assert mem[0] <= mem[1] <= mem[2]
  for t, budget in zip(tiers, exp.info["fleet_memory_tiers"]):
    assert t["memory"]["total"] <= budget
  state, history, timing = exp.run()
  summary = exp.summary(state, history, timing)
  assert [r["round"] for r in history] == [0, 3, 6]
  assert summary["tier_memory_bytes"] == pytest.approx(mem)
  assert summary["peak_device_memory_bytes"] == pytest.approx(max(mem))
  ups = np.asarray(exp.setup.plan.upload_bytes)
  assert ups.min() <= summary["upload_bytes_per_update"] <= ups.max()
  assert len(summary["params_sha256"]) == 64


def test_budget_below_minimum_names_budget_and_minimum():
  cfg = experiment.ExperimentConfig(
      engine=algorithms.preset("ftte", concurrency=4, buffer_size=2),
      data=experiment.DataConfig(dataset="tiny", num_clients=8,
                                 partition="iid", **SCRATCH_DATA),
      search=experiment.SearchConfig(importance="proxy", **SCRATCH_SEARCH),
      memory_tier_fractions=(0.01, 1.0), model="mlp", **SCRATCH_TOP)
  with pytest.raises(ValueError, match=r"memory budget \d+ bytes.*minimum "
                     r"feasible training memory \d+ bytes"):
    experiment.build(cfg)


@pytest.mark.parametrize("kwargs, option", [
    (dict(model="vgg"), "model"),
    (dict(rounds=0), "rounds"),
    (dict(target_accuracy=1.5), "target_accuracy"),
    (dict(memory_tier_fractions=(0.5, 0.2)), "memory_tier_fractions"),
    (dict(search=experiment.SearchConfig(method="anneal")), "search_method"),
    (dict(search=experiment.SearchConfig(importance="oracle")),
     "importance"),
    (dict(data=experiment.DataConfig(dataset="imagenet")), "dataset"),
    (dict(data=experiment.DataConfig(num_clients=0)), "num_clients"),
    (dict(data=experiment.DataConfig(num_clients=50)), "concurrency"),
    (dict(max_virtual_time=float("nan")), "max_virtual_time"),
    (dict(seed=-1), "seed"),
    (dict(fleet=fleet.FleetConfig(tier_probs=(0.5, 0.5))), "tier_probs"),
    (dict(fleet=fleet.FleetConfig(dropout=2.0)), "dropout"),
    (dict(search=experiment.SearchConfig(research_every=2)),
     "research_every needs mask='search'"),
])
def test_bad_experiment_options(kwargs, option):
  with pytest.raises(ValueError, match="^" + option):
    experiment.validate(experiment.ExperimentConfig(**kwargs))


def _research_config(rounds, research_every):
  return experiment.ExperimentConfig(
      engine=algorithms.preset("ftte", concurrency=8, buffer_size=4,
                               local_steps=2, batch_size=16),
      data=experiment.DataConfig(dataset="tiny", num_clients=16,
                                 partition="iid", **SCRATCH_DATA),
      search=experiment.SearchConfig(research_every=research_every,
                                     probe_clients=4, **SCRATCH_SEARCH),
      memory_tier_fractions=(0.7, 2.0), model="mlp",
      model_options={"hidden": (32,)}, rounds=rounds, eval_every=2,
      **SCRATCH_TOP)


@pytest.mark.slow  # three runs with re-searches
def test_periodic_research_counts_probe_bytes_and_resumes_exactly():
  once = experiment.build(_research_config(6, 0))
  s_once, _, _ = once.run()
  full = experiment.build(_research_config(6, 2))
  s_full, h_full, _ = full.run()
  # Two re-searches (rounds 2 and 4), each a probe of 4 devices.
  extra = (exact.value(s_full.counters.probe_bytes_down) -
           exact.value(s_once.counters.probe_bytes_down))
  assert extra > 0
  # Interrupt after round 4 (just after a re-search; on_step sees the state
  # a checkpoint would save) and continue: the plan lives in the state, so
  # the result is bit-identical.
  saved = {}

  def keep(state):
    if int(state.version) == 4:
      saved["state"] = jax.device_get(state)

  again = experiment.build(_research_config(6, 2))
  again.run(on_step=keep)
  rows = [r for r in h_full if r["round"] <= 4]
  s_rest, h_rest, _ = again.run(state=jax.device_put(saved["state"]),
                                history=rows)
  assert (experiment.params_sha256(s_rest.params) ==
          experiment.params_sha256(s_full.params))
  assert [r["round"] for r in h_rest] == [r["round"] for r in h_full]
  chex.assert_trees_all_equal(s_rest.counters, s_full.counters)
