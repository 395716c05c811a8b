"""Subset search: exact DP vs brute force, greedy vs exact, build_plan."""

import itertools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ftte_jax import models
from ftte_jax.core import masks
from ftte_jax.search import groups
from ftte_jax.search import knapsack
from ftte_jax.search import memory
from ftte_jax.search import plan as plan_lib

SGD, ADAM = optax.sgd(0.1), optax.adam(1e-3)


def _random_problem(rng, num_tensors, num_levels, num_layers):
  """Integer-cost instance with nested levels and non-additive activations."""
  layer = np.sort(rng.integers(0, num_layers, num_tensors))
  inc = rng.integers(1, 12, (num_tensors, num_levels))
  option = np.concatenate([np.zeros((num_tensors, 1)), np.cumsum(inc, 1)], 1)
  valid = np.ones((num_tensors, num_levels + 1), bool)
  valid[:, 1:-1] = rng.random((num_tensors, num_levels - 1)) < 0.8
  ins = rng.integers(1, 25, num_layers).astype(float)
  logits = float(rng.integers(0, 5))
  stored = np.array([ins[e + 1:].sum() for e in range(num_layers)]) + logits
  problem = knapsack.SearchProblem(
      option_bytes=option, valid=valid, tensor_layer=layer,
      needs_input=rng.random(num_tensors) < 0.6, input_bytes=ins,
      stored_bytes=stored, base_bytes=float(rng.integers(0, 20)))
  gain = rng.random((num_tensors, num_levels)) * rng.integers(1, 4, (
      num_tensors, 1))
  values = np.concatenate([np.zeros((num_tensors, 1)), np.cumsum(gain, 1)], 1)
  return problem, values.astype(np.float32), ins, logits


def _brute_force(problem, values, ins, logits, budget):
  """Enumerates every level choice; memory written from the docstring."""
  t_count, k_count = values.shape
  lv = np.asarray(list(itertools.product(range(k_count), repeat=t_count)))
  t = np.arange(t_count)
  ok = problem.valid[t, lv].all(1)
  on = lv > 0
  layer = np.where(on, problem.tensor_layer, 10**6)
  e = layer.min(1)  # [M] earliest trained layer (10**6: none).
  suffix = np.append(np.cumsum(ins[::-1])[::-1], 0.0)  # sum_{l >= i} ins[l]
  e_c = np.minimum(e, len(ins) - 1)
  act = np.where(e < 10**6, suffix[e_c + 1] + logits, 0.0)
  kernel_at_e = (on & problem.needs_input & (layer == e[:, None])).any(1)
  act += np.where(kernel_at_e, ins[e_c], 0.0)
  mem = problem.base_bytes + problem.option_bytes[t, lv].sum(1) + act
  val = values[t, lv].sum(1)
  feasible = ok & (mem <= budget)
  return float(val[feasible].max()) if feasible.any() else 0.0


@pytest.mark.parametrize("num_tensors,num_levels,num_layers,seed", [
    (6, 2, 4, 0),  # 12 groups as nested fractions.
    (12, 1, 5, 1),  # 12 whole-tensor groups.
    (4, 3, 3, 2),
])
def test_exact_equals_brute_force(num_tensors, num_levels, num_layers, seed):
  rng = np.random.default_rng(seed)
  ratios = []
  for _ in range(35):
    problem, values, ins, logits = _random_problem(rng, num_tensors,
                                                   num_levels, num_layers)
    full = problem.base_bytes + problem.option_bytes[:, -1].sum() + ins.sum() \
        + logits
    budget = float(rng.integers(int(problem.base_bytes), int(full) + 2))
    want = _brute_force(problem, values, ins, logits, budget)
    got = knapsack.solve(problem, values, budget, "exact", num_cells=256,
                       resolution=1.0)
    assert got["importance"] == pytest.approx(want, rel=1e-5, abs=1e-5)
    assert got["memory_bytes"] <= budget
    np.testing.assert_allclose(
        values[np.arange(num_tensors), got["levels"]].sum(), want, rtol=1e-5,
        atol=1e-5)
    greedy = knapsack.solve(problem, values, budget, "greedy", num_cells=256,
                          resolution=1.0)
    assert greedy["memory_bytes"] <= budget
    assert greedy["importance"] <= got["importance"] + 1e-5
    if want > 0:
      ratios.append(greedy["importance"] / want)
  print(f"greedy/exact importance: mean {np.mean(ratios):.3f} "
        f"min {np.min(ratios):.3f} over {len(ratios)} instances")


def test_coarse_resolution_stays_feasible_and_within_gap():
  rng = np.random.default_rng(7)
  for _ in range(20):
    problem, values, ins, logits = _random_problem(rng, 6, 2, 4)
    full = problem_full = problem.base_bytes + problem.option_bytes[:, -1].sum()
    budget = float(rng.integers(int(problem.base_bytes) + 30,
                                int(problem_full + ins.sum()) + 40))
    del full
    got = knapsack.solve(problem, values, budget, "exact", num_cells=8)
    assert got["memory_bytes"] <= budget
    r = got["resolution_bytes"]
    m = int((got["levels"] > 0).sum())
    # Documented gap: at least the optimum under budget - (m + 1) * r ... and
    # in particular under budget - (T + 1) * r.
    lower = _brute_force(problem, values, ins, logits,
                         budget - (values.shape[0] + 1) * r)
    assert got["importance"] >= lower - 1e-5
    del m


def test_exact_is_jittable_and_vmappable_over_budgets():
  rng = np.random.default_rng(3)
  problem, values, _, _ = _random_problem(rng, 5, 2, 3)
  budgets = [problem.base_bytes + 40.0, problem.base_bytes + 80.0]
  ds = [knapsack.discretize(problem, b, num_cells=128, resolution=1.0)[0]
        for b in budgets]
  stacked = jax.tree.map(lambda *x: jnp.stack(x), *ds)
  fn = jax.jit(jax.vmap(lambda d: knapsack.solve_exact(d, values, 128)[1]))
  vals = fn(stacked)
  for b, v in zip(budgets, vals):
    ref = knapsack.solve(problem, values, b, "exact", num_cells=128,
                       resolution=1.0)["importance"]
    assert float(v) == pytest.approx(ref, rel=1e-6)
  assert vals[1] >= vals[0]


def _mlp(fractions=groups.DEFAULT_FRACTIONS):
  model = models.get_model("mlp", 4, hidden=(16, 16))
  params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 8)))["params"]
  rng = np.random.default_rng(0)
  fisher = jax.tree.map(lambda p: np.abs(rng.normal(size=p.shape)), params)
  info = groups.analyze(model, params, (1, 8))
  return info, groups.make_groups(info, fractions), params, fisher


def test_build_plan_min_policy():
  info, spec, params, fisher = _mlp(groups.PAPER_FRACTIONS)
  full = memory.memory_from_sizes(info, spec, spec.sizes[:, -1], 8, SGD)
  mem = np.array([full["total"] * 0.8, full["total"] * 2, full["total"]])
  plan, report = plan_lib.build_plan(info, spec, params, fisher, mem, SGD,
                                     policy="min", batch_size=8)
  assert isinstance(plan, masks.MaskPlan)
  assert plan.num_tiers == 1
  np.testing.assert_array_equal(plan.client_tier, [0, 0, 0])
  tier = report["tiers"][0]
  assert tier["memory"]["total"] <= mem.min()
  assert float(plan.memory_bytes[0]) == pytest.approx(tier["memory"]["total"])
  assert 0 < tier["importance_fraction"] < 1
  assert float(plan.upload_bytes[0]) == 4 * tier["trained_params"]
  chex.assert_trees_all_equal_shapes(
      plan.masks, jax.tree.map(lambda p: jnp.zeros((1,) + p.shape), params))


@pytest.mark.slow
def test_build_plan_per_tier_is_monotone():
  info, spec, params, fisher = _mlp()
  full = memory.memory_from_sizes(info, spec, spec.sizes[:, -1], 8, ADAM)
  mem = np.array([full["total"] * 1.02, full["total"] * 0.7,
                  full["total"] * 0.9, full["total"] * 0.7])
  plan, report = plan_lib.build_plan(info, spec, params, fisher, mem, ADAM,
                                     policy="per_tier", batch_size=8,
                                     method="greedy")
  np.testing.assert_array_equal(plan.client_tier, [2, 0, 1, 0])
  vals = [t["importance"] for t in report["tiers"]]
  assert vals == sorted(vals)
  assert report["tiers"][2]["importance_fraction"] == pytest.approx(1.0)
  assert all(t["memory"]["total"] <= t["budget_bytes"]
             for t in report["tiers"])
  plan2, _ = plan_lib.build_plan(info, spec, params, fisher, mem, ADAM,
                                 tier_of_client=[1, 0, 1, 0],
                                 policy="per_tier", batch_size=8)
  assert plan2.num_tiers == 2


def test_build_plan_bad_inputs():
  info, spec, params, fisher = _mlp()
  mem = np.full(3, 1e7)
  build = lambda *a, **kw: plan_lib.build_plan(info, spec, params, *a, **kw)
  with pytest.raises(ValueError, match="minimum feasible"):
    build(fisher, np.array([1e7, 100.0]), SGD)
  with pytest.raises(ValueError, match="policy"):
    build(fisher, mem, SGD, policy="max")
  with pytest.raises(ValueError, match="method"):
    build(fisher, mem, SGD, method="ilp")
  with pytest.raises(TypeError, match="optimizer"):
    build(fisher, mem, "adam")
  with pytest.raises(ValueError, match="tier_of_client"):
    build(fisher, mem, SGD, policy="per_tier", tier_of_client=[0, 2, 2])
  with pytest.raises(ValueError, match="importance scores"):
    build(np.ones((2, 2)), mem, SGD)


@pytest.mark.parametrize("frozen_weights", ["ram", "flash"])
def test_problem_memory_equals_memory_model(frozen_weights):
  # The search's cost of any level choice is the memory model's RAM total,
  # with frozen weights in RAM or in flash.
  info, spec, params, _ = _mlp(groups.PAPER_FRACTIONS)
  problem = knapsack.make_problem(info, spec, 8, ADAM, frozen_weights)
  rng = np.random.default_rng(0)
  for _ in range(20):
    levels = rng.integers(0, spec.sizes.shape[1], spec.num_tensors)
    levels = np.where(spec.valid[np.arange(spec.num_tensors), levels],
                      levels, 0)
    sizes = spec.sizes[np.arange(spec.num_tensors), levels]
    want = memory.memory_from_sizes(info, spec, sizes, 8, ADAM,
                                    frozen_weights)["total"]
    assert knapsack.problem_memory(problem, levels) == pytest.approx(want)


def test_flash_budget_trains_more_and_reports_flash():
  # At the same RAM budget, frozen weights in flash free the RAM they took:
  # the search trains at least as much, and the report's flash bytes are
  # the untrained weights.
  info, spec, params, fisher = _mlp(groups.PAPER_FRACTIONS)
  full = memory.memory_from_sizes(info, spec, spec.sizes[:, -1], 8, SGD)
  budget = np.array([full["total"] * 0.5])
  reports = {}
  for where in ("ram", "flash"):
    _, report = plan_lib.build_plan(info, spec, params, fisher, budget, SGD,
                                    batch_size=8, frozen_weights=where)
    reports[where] = report["tiers"][0]
  assert (reports["flash"]["importance"] >= reports["ram"]["importance"])
  assert reports["flash"]["trained_params"] > reports["ram"]["trained_params"]
  assert reports["ram"]["memory"]["flash"] == 0.0
  assert reports["flash"]["memory"]["flash"] == 4.0 * (
      info.num_params - reports["flash"]["trained_params"])
  assert reports["flash"]["memory"]["total"] <= budget[0]


@pytest.mark.slow
def test_joint_micro_batch_search_equals_brute_force():
  # Every (micro-batch count, level per tensor) pair enumerated with the
  # memory model itself; the joint exact search (integer byte costs,
  # 1-byte cells) finds the same best importance, at the smallest m.
  info, spec, params, fisher = _mlp(groups.PAPER_FRACTIONS)
  values = np.asarray(plan_lib.group_values(spec, fisher))
  choices = (1, 2, 4, 8)
  full = memory.memory_from_sizes(info, spec, spec.sizes[:, -1], 8, SGD)
  t = np.arange(spec.num_tensors)
  grid = np.asarray(list(itertools.product(
      range(spec.sizes.shape[1]), repeat=spec.num_tensors)))
  grid = grid[spec.valid[t, grid].all(1)]
  mems = {m: np.asarray([memory.memory_from_sizes(
      info, spec, spec.sizes[t, levels], 8, SGD, "flash", m)["total"]
                         for levels in grid]) for m in choices}
  vals = values[t, grid].sum(1)
  chosen = []
  for frac in (0.15, 0.3, 0.6):
    budget = frac * full["total"]
    best = (-1.0, 0)
    for m in choices:
      v = float(vals[mems[m] <= budget].max(initial=-1.0))
      if v > best[0] * (1 + 1e-6):
        best = (v, m)
    problems = {m: knapsack.make_problem(info, spec, 8, SGD, "flash", m)
                for m in choices}
    m, out = plan_lib.solve_joint(problems, values, budget, "exact", 1024,
                                  1.0)
    assert out["importance"] == pytest.approx(best[0], rel=1e-5)
    assert out["memory_bytes"] <= budget
    assert m == best[1]
    chosen.append(m)
  assert max(chosen) > 1  # micro-batching wins somewhere.


@pytest.mark.slow
@pytest.mark.parametrize("method", ["exact", "greedy"])
def test_trained_parameter_cap_is_a_second_constraint(method):
  # With a cap on trained parameters (an upload budget) the choice never
  # trains more, and the exact search equals brute force under both
  # constraints.
  info, spec, params, fisher = _mlp(groups.PAPER_FRACTIONS)
  values = np.asarray(plan_lib.group_values(spec, fisher))
  full = memory.memory_from_sizes(info, spec, spec.sizes[:, -1], 8, SGD)
  budget = 0.7 * full["total"]
  t = np.arange(spec.num_tensors)
  grid = np.asarray(list(itertools.product(
      range(spec.sizes.shape[1]), repeat=spec.num_tensors)))
  grid = grid[spec.valid[t, grid].all(1)]
  mem = np.asarray([memory.memory_from_sizes(
      info, spec, spec.sizes[t, lv], 8, SGD, "flash")["total"] for lv in grid])
  trained = spec.numel[t, grid].sum(1)
  vals = values[t, grid].sum(1)
  free = knapsack.solve(knapsack.make_problem(info, spec, 8, SGD, "flash"),
                        values, budget, method, 1024, 1.0)
  free_trained = int(spec.numel[t, free["levels"]].sum())
  cap = free_trained // 2
  out = knapsack.solve(
      knapsack.make_problem(info, spec, 8, SGD, "flash",
                            max_trained_params=cap),
      values, budget, method, 1024, 1.0)
  got = int(spec.numel[t, out["levels"]].sum())
  assert 0 < got <= cap and out["memory_bytes"] <= budget
  if method == "exact":
    ok = (mem <= budget) & (trained <= cap)
    assert out["importance"] == pytest.approx(vals[ok].max(), rel=1e-5)


def test_build_plan_refuses_nan_importance_and_infinite_budgets():
  info, spec, params, fisher = _mlp()
  mem = np.array([1e6, 2e6])
  bad = jax.tree.map(lambda f: np.full_like(f, np.nan), fisher)
  with pytest.raises(ValueError, match="importance must be finite"):
    plan_lib.build_plan(info, spec, params, bad, mem, SGD, batch_size=8)
  with pytest.raises(ValueError, match="finite byte counts"):
    plan_lib.build_plan(info, spec, params, fisher, np.array([np.inf, 1e6]),
                        SGD, batch_size=8)
