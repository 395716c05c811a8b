"""The time-aware search: importance per second, exact against brute force."""

import itertools

import jax
import numpy as np
import optax
import pytest

from ftte_jax import models
from ftte_jax.search import groups
from ftte_jax.search import knapsack
from ftte_jax.search import memory
from ftte_jax.search import plan as plan_lib

from test_search import _random_problem

SGD = optax.sgd(0.1)


def _random_time_model(rng, problem, num_levels):
  """Positive per-level times growing with the level, non-increasing
  per-earliest-layer times, a forward-only time below all of them."""
  t_count = problem.option_bytes.shape[0]
  num_layers = problem.input_bytes.shape[0]
  inc = rng.random((t_count, num_levels)) * rng.choice([0.1, 1.0, 10.0],
                                                       (t_count, 1))
  option_s = np.concatenate([np.zeros((t_count, 1)), np.cumsum(inc, 1)], 1)
  steps = np.sort(rng.random(num_layers) * 5)[::-1]
  none_s = float(rng.random() + 0.1)
  return knapsack.TimeModel(option_s=option_s, layer_s=none_s + steps,
                            none_s=none_s)


def _brute_force_ratio(problem, values, tm, budget):
  """Best importance / time over every non-empty feasible choice."""
  t_count, k_count = values.shape
  t = np.arange(t_count)
  best = 0.0
  for lv in itertools.product(range(k_count), repeat=t_count):
    lv = np.asarray(lv)
    if not (lv > 0).any() or not problem.valid[t, lv].all():
      continue
    if knapsack.problem_memory(problem, lv) > budget:
      continue
    best = max(best, values[t, lv].sum() /
               knapsack.problem_time(tm, problem, lv))
  return best


@pytest.mark.parametrize("num_tensors,num_levels,num_layers,seed", [
    (6, 2, 4, 0), (8, 1, 5, 1), (4, 3, 3, 2)])
def test_importance_per_time_equals_brute_force(num_tensors, num_levels,
                                                num_layers, seed):
  rng = np.random.default_rng(seed)
  iterations, moved = [], 0
  for _ in range(25):
    problem, values, ins, logits = _random_problem(rng, num_tensors,
                                                   num_levels, num_layers)
    tm = _random_time_model(rng, problem, num_levels)
    full = problem.base_bytes + problem.option_bytes[:, -1].sum() + \
        ins.sum() + logits
    budget = float(rng.integers(int(problem.base_bytes), int(full) + 2))
    want = _brute_force_ratio(problem, values, tm, budget)
    got = knapsack.solve(problem, values, budget, "exact", num_cells=256,
                         resolution=1.0, objective="importance_per_time",
                         time_model=tm)
    assert got["memory_bytes"] <= budget
    assert got["objective"] == pytest.approx(want, rel=1e-5, abs=1e-9)
    lv = got["levels"]
    if want > 0:
      assert got["time_s"] == pytest.approx(
          knapsack.problem_time(tm, problem, lv))
      assert got["importance"] / got["time_s"] == pytest.approx(
          got["objective"])
    # The importance objective is never beaten on importance, and never
    # beats the ratio objective on the ratio.
    imp = knapsack.solve(problem, values, budget, "exact", num_cells=256,
                         resolution=1.0, time_model=tm)
    assert imp["importance"] >= got["importance"] - 1e-5
    if want > 0:
      assert imp["importance"] / imp["time_s"] <= got["objective"] * (
          1 + 1e-6)
      moved += imp["importance"] / imp["time_s"] < got["objective"] * (
          1 - 1e-4)
    iterations.append(got["iterations"])
  # The instances exercise the trade: the ratio's choice is often not the
  # importance's.
  assert moved >= 5
  print(f"Dinkelbach iterations: mean {np.mean(iterations):.1f} max "
        f"{max(iterations)}; ratio beat importance's choice {moved}/25")


def test_importance_per_time_refuses_greedy_and_needs_a_time_model():
  rng = np.random.default_rng(0)
  problem, values, _, _ = _random_problem(rng, 3, 1, 2)
  with pytest.raises(ValueError, match="needs a task time model"):
    knapsack.solve(problem, values, 100.0, objective="importance_per_time")
  tm = _random_time_model(rng, problem, 1)
  with pytest.raises(ValueError, match="search_method='exact'"):
    knapsack.solve(problem, values, 100.0, "greedy",
                   objective="importance_per_time", time_model=tm)
  with pytest.raises(ValueError, match="search_objective must be one of"):
    knapsack.solve(problem, values, 100.0, objective="speed")


def _model(name):
  module = models.get_model(name, 10)
  params = module.init(jax.random.PRNGKey(0), np.zeros((1, 28, 28, 1)))
  params = params["params"]
  info = groups.analyze(module, params, (32, 28, 28, 1))
  return info, groups.make_groups(info, groups.PAPER_FRACTIONS), params


@pytest.mark.parametrize("name", ["mlp", "lenet5"])
def test_flops_parts_add_up_to_the_flops_model(name):
  info, spec, _ = _model(name)
  fwd, after, weight = knapsack.flops_parts(info, spec)
  rng = np.random.default_rng(0)
  t = np.arange(spec.num_tensors)
  for _ in range(30):
    lv = rng.integers(0, spec.sizes.shape[1], spec.num_tensors)
    lv = np.where(spec.valid[t, lv], lv, 0)
    sizes = spec.sizes[t, lv]
    on = lv > 0
    e = spec.layer[on].min() if on.any() else None
    got = fwd + (after[e] + weight[t, lv].sum() if on.any() else 0.0)
    assert got == pytest.approx(memory.flops_from_sizes(info, spec, sizes),
                                rel=1e-9)


def test_time_model_hand_computed():
  info, spec, _ = _model("mlp")
  fwd, after, weight = knapsack.flops_parts(info, spec)
  # 160 examples on a 1 GFLOP/s device with 1 MB/s up and 4 MB/s down.
  tm = knapsack.make_time_model(info, spec, 160, 1e-9, 1e-6 + 0.25e-6)
  problem = knapsack.make_problem(info, spec, 32, SGD)
  head = spec.num_tensors - 1  # the last dense layer's kernel or bias.
  lv = np.zeros(spec.num_tensors, np.int64)
  lv[head] = spec.sizes.shape[1] - 1
  e = spec.layer[head]
  want = (160 * 1e-9 * (fwd + after[e] + weight[head, -1]) +
          1.25e-6 * 4 * spec.numel[head, -1])
  assert knapsack.problem_time(tm, problem, lv) == pytest.approx(want)
  assert knapsack.problem_time(tm, problem, np.zeros_like(lv)) == \
      pytest.approx(160e-9 * fwd)


def test_build_plan_trades_importance_for_a_shorter_task():
  # LeNet-5 on slow links: per second, a smaller subset wins; the search
  # reports each tier's task time, and the ratio is never worse.
  info, spec, params = _model("lenet5")
  fisher = jax.tree.map(lambda p: np.abs(np.asarray(p)) + 1e-3, params)
  n = 20
  mem = np.full(n, 0.3 * 2.95e6)
  seconds = (np.full(n, 1 / 2e8), np.full(n, 1 / 2e4 + 1 / 2e4))
  common = dict(batch_size=32, frozen_weights="flash",
                micro_batches=(1, 2, 4, 8), device_seconds=seconds,
                examples_per_task=160)
  _, imp = plan_lib.build_plan(info, spec, params, fisher, mem, SGD,
                               **common)
  _, fast = plan_lib.build_plan(info, spec, params, fisher, mem, SGD,
                                objective="importance_per_time", **common)
  a, b = imp["tiers"][0], fast["tiers"][0]
  assert fast["objective"] == "importance_per_time"
  assert b["task_time_s"] < a["task_time_s"]
  assert b["importance"] <= a["importance"]
  assert b["importance"] / b["task_time_s"] >= a["importance"] / a[
      "task_time_s"] * (1 - 1e-6)
  assert b["memory"]["total"] <= 0.3 * 2.95e6
  with pytest.raises(ValueError, match="needs a task time model"):
    plan_lib.build_plan(info, spec, params, fisher, mem, SGD,
                        objective="importance_per_time", batch_size=32)


def test_task_time_inputs_mirror_the_engine():
  # planning feeds the search the engine's nominal-time ingredients.
  from ftte_jax.experiment import planning
  from launch import flags as flags_lib
  cfg = flags_lib.resolve_args([
      "--dataset=tiny", "--model=mlp", "--num_clients=16", "--partition=iid",
      "--concurrency=8", "--buffer_size=4", "--local_steps=3",
      "--batch_size=8", "--proxy_examples=0", "--pretrain_steps=0",
      "--fleet_profile=mcu:0.5,phone_high:0.5",
      "--search_objective=importance_per_time"]).config
  data = planning.load_data(cfg).train
  fleet, _ = planning.make_fleet(cfg, 1e6)
  got = planning.task_time_inputs(cfg, data, fleet)
  assert got["objective"] == "importance_per_time"
  assert got["examples_per_task"] == 24.0
  per_flop, per_byte = got["device_seconds"]
  np.testing.assert_allclose(per_flop, 1 / np.asarray(fleet.speed, float))
  np.testing.assert_allclose(per_byte, 1 / np.asarray(fleet.bw_up, float) +
                             1 / np.asarray(fleet.bw_down, float))
  with pytest.raises(ValueError, match="search_method='exact'"):
    flags_lib.resolve_args(["--search_objective=importance_per_time",
                            "--search_method=greedy"])
