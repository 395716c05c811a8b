"""Benchmark: subset-search speed, greedy/exact quality, memory model vs XLA.

Run: python -m experiments.benchmarks.search_speed

Prints the machine; the time of one 100-group search (exact DP and greedy,
after compilation) on a 13-layer MLP with channel fractions {1/8,1/4,1/2,1};
the mean greedy/exact importance ratio over random instances; and the ratio
of the analytic full-model training memory to XLA's compiled memory analysis.
"""

import os
import platform
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from ftte_jax import models
from ftte_jax.search import groups
from ftte_jax.search import knapsack
from ftte_jax.search import memory


class DeepMLP(nn.Module):
  """13 Dense layers, the last without bias: 25 tensors x 4 fractions."""

  @nn.compact
  def __call__(self, x):
    for _ in range(12):
      x = nn.relu(nn.Dense(64)(x))
    return nn.Dense(16, use_bias=False)(x)


class SmallCNN(nn.Module):

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(32, (3, 3))(x))
    x = nn.avg_pool(x, (2, 2), (2, 2))
    x = nn.relu(nn.Conv(64, (3, 3))(x))
    x = nn.avg_pool(x, (2, 2), (2, 2))
    x = x.reshape(x.shape[0], -1)
    x = nn.relu(nn.Dense(128)(x))
    return nn.Dense(10)(x)


def _timeit(fn, repeats=20):
  jax.block_until_ready(fn())  # compile
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t0)
  return float(np.median(times))


def bench_speed():
  model = DeepMLP()
  shape = (1, 32)
  params = jax.eval_shape(model.init, jax.random.key(0),
                          jnp.zeros(shape))["params"]
  info = groups.analyze(model, params, shape)
  spec = groups.make_groups(info, groups.PAPER_FRACTIONS)
  problem = knapsack.make_problem(info, spec, 32, optax.adam(1e-3))
  full = knapsack.problem_memory(problem, spec.sizes.shape[1] - 1
                               + np.zeros(spec.num_tensors, np.int64))
  rng = np.random.default_rng(0)
  per_channel = rng.gamma(1.0, size=spec.sizes.shape[0])
  values = np.asarray(spec.sizes * per_channel[:, None], np.float32)
  values *= rng.uniform(0.5, 1.5, values.shape).cumsum(1) / np.arange(
      1, values.shape[1] + 1)
  values[:, 0] = 0
  values = np.maximum.accumulate(values, axis=1)
  budget = 0.6 * full
  print(f"100-group search: {spec.num_groups} groups, {spec.num_tensors} "
        f"tensors, {len(info.layers)} layers, budget {budget / 1e6:.2f} MB "
        f"(60% of full-model training memory)")
  for num_cells in (1024, 4096):
    d, nc = knapsack.discretize(problem, budget, num_cells)
    exact = jax.jit(knapsack.solve_exact, static_argnames="num_cells")
    t0 = time.perf_counter()
    jax.block_until_ready(exact(d, values, num_cells=nc))
    compile_s = time.perf_counter() - t0
    t = _timeit(lambda: exact(d, values, num_cells=nc))
    ve = knapsack.solve(problem, values, budget, "exact", num_cells)
    print(f"  exact  (num_cells={nc}, resolution {float(d.resolution):.0f} B):"
          f" {t * 1e3:8.2f} ms/search after compile ({compile_s:.2f} s first"
          f" call); importance {ve['importance']:.2f}, memory "
          f"{ve['memory_bytes'] / budget:.4f} of budget")
  greedy = jax.jit(knapsack.solve_greedy)
  d, _ = knapsack.discretize(problem, budget, 1024)
  t = _timeit(lambda: greedy(d, values))
  vg = knapsack.solve(problem, values, budget, "greedy", 1024)
  print(f"  greedy (num_cells=1024): {t * 1e3:8.2f} ms/search; importance "
        f"{vg['importance']:.2f} ({vg['importance'] / ve['importance']:.3f} of"
        f" exact)")
  ratios = []
  for frac in np.linspace(0.3, 1.0, 15):
    ex = knapsack.solve(problem, values, frac * full, "exact", 4096)
    gr = knapsack.solve(problem, values, frac * full, "greedy", 4096)
    if ex["importance"] > 0:
      ratios.append(gr["importance"] / ex["importance"])
  print(f"  greedy/exact on this model over 15 budgets (30%..100%): mean "
        f"{np.mean(ratios):.3f}, min {np.min(ratios):.3f}")


def bench_random_ratio(num=200):
  rng = np.random.default_rng(1)
  ratios, gaps = [], []
  t_count, k_count, num_layers = 12, 4, 6
  for _ in range(num):
    layer = np.sort(rng.integers(0, num_layers, t_count))
    option = np.concatenate([np.zeros((t_count, 1)), np.cumsum(
        rng.integers(1, 50, (t_count, k_count)), 1)], 1)
    ins = rng.integers(1, 100, num_layers).astype(float)
    stored = np.array([ins[e + 1:].sum() for e in range(num_layers)]) + 5
    problem = knapsack.SearchProblem(
        option_bytes=option, valid=np.ones(option.shape, bool),
        tensor_layer=layer, needs_input=rng.random(t_count) < 0.5,
        input_bytes=ins, stored_bytes=stored, base_bytes=10.0)
    values = np.concatenate([np.zeros((t_count, 1)), np.cumsum(
        rng.random((t_count, k_count)), 1)], 1).astype(np.float32)
    full = 10 + option[:, -1].sum() + stored[0] + ins[0]
    budget = float(rng.uniform(0.2, 0.9) * full)
    ex = knapsack.solve(problem, values, budget, "exact", 2048, resolution=1.0)
    gr = knapsack.solve(problem, values, budget, "greedy", 2048, resolution=1.0)
    if ex["importance"] > 0:
      ratios.append(gr["importance"] / ex["importance"])
      gaps.append(gr["importance"] <= ex["importance"] + 1e-5)
  print(f"greedy/exact importance over {len(ratios)} random instances "
        f"(12 tensors x 4 levels, 6 layers, integer costs): mean "
        f"{np.mean(ratios):.3f}, min {np.min(ratios):.3f}, greedy <= exact "
        f"in {np.mean(gaps) * 100:.0f}%")


def xla_ratio(model, shape, batch_size, tx):
  params = jax.jit(model.init)(jax.random.key(0), jnp.zeros(shape))["params"]
  info = groups.analyze(model, params, shape)
  spec = groups.make_groups(info)
  ours = memory.memory_from_sizes(info, spec, spec.sizes[:, -1], batch_size,
                                  tx)
  xla = memory.xla_training_memory(model, params,
                                   (batch_size,) + tuple(shape[1:]), tx)
  return ours, xla


def bench_xla():
  print("full-model training memory, analytic vs XLA memory_analysis "
        "(arguments + outputs - aliased + temporaries):")
  mlp = models.get_model("mlp", 10)
  for name, model, shape in [("MLP 784-200-200-10", mlp, (1, 784)),
                             ("CNN 2-conv 28x28", SmallCNN(), (1, 28, 28, 1))]:
    for opt, tx in (("sgd", optax.sgd(0.1)), ("adam", optax.adam(1e-3))):
      for b in (32, 128):
        ours, xla = xla_ratio(model, shape, b, tx)
        print(f"  {name:20s} {opt:5s} batch {b:4d}: analytic "
              f"{ours['total'] / 1e6:7.2f} MB (act {ours['activations'] / 1e6:6.2f})"
              f"  XLA {xla / 1e6:7.2f} MB  ratio {ours['total'] / xla:.3f}")


def main():
  print(f"machine: {platform.machine()} {platform.processor() or ''} "
        f"{os.cpu_count()} CPUs, {platform.system()}; jax {jax.__version__} "
        f"{jax.devices()[0].platform} ({jax.devices()[0].device_kind})")
  bench_speed()
  bench_random_ratio()
  bench_xla()


if __name__ == "__main__":
  main()
