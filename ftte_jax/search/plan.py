"""Mask plans from the subset search: one searched mask per memory tier.

``build_plan`` turns one model analysis (``groups.analyze``) and its groups
(``groups.make_groups``), an importance estimate and the fleet's device
memory into the ``MaskPlan`` the engine consumes, solving one knapsack
(``knapsack.solve``) per memory tier (docs/design.md, Subset search).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ftte_jax.core import masks as masks_lib
from ftte_jax.core.typing import PyTree
from ftte_jax.search import groups as groups_lib
from ftte_jax.search import importance as importance_lib
from ftte_jax.search import knapsack
from ftte_jax.search import memory as memory_lib

POLICIES = ("min", "per_tier")


def assign_tiers(device_memory_bytes: Sequence[float],
                 tier_of_client: Sequence[int] | None, policy: str
                 ) -> tuple[np.ndarray, list[float]]:
  """Tier of each client ([N] int32) and each tier's budget in bytes.

  Policy ``'min'``: a single tier with budget ``min(device_memory_bytes)``
  (the paper's ``M_min``). Policy ``'per_tier'``: tier ``j``'s budget is the
  smallest memory among its clients (``tier_of_client``; when None, one tier
  per distinct memory value, ascending).
  """
  if policy not in POLICIES:
    raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
  mem = np.asarray(device_memory_bytes, np.float64).reshape(-1)
  if mem.size == 0 or not np.all((mem > 0) & np.isfinite(mem)):
    raise ValueError("device_memory_bytes must be a non-empty [N] array of "
                     "positive, finite byte counts")
  if policy == "min":
    tiers = np.zeros(mem.size, np.int32)
  elif tier_of_client is None:
    tiers = np.searchsorted(np.unique(mem), mem).astype(np.int32)
  else:
    tiers = np.asarray(tier_of_client, np.int64).reshape(-1)
    if tiers.shape != mem.shape:
      raise ValueError(f"tier_of_client must have shape {mem.shape} like "
                       f"device_memory_bytes, got {tiers.shape}")
    used = np.unique(tiers)
    if used[0] < 0 or not np.array_equal(used, np.arange(used.size)):
      raise ValueError("tier_of_client must use every tier id 0..T-1, got "
                       f"ids {used.tolist()}")
    tiers = tiers.astype(np.int32)
  return tiers, [float(mem[tiers == j].min()) for j in range(tiers.max() + 1)]


def check_importance_tree(params: PyTree, importance: PyTree) -> None:
  """An importance tree must have the parameters' structure and shapes
  (either may be bare or flax variables): ``group_importance`` would read
  a wrong-shaped leaf's channels silently, and a missing one crash.

  Raises:
    ValueError: naming the first missing, extra or misshapen leaf.
  """
  if not isinstance(importance, Mapping):
    raise ValueError("importance must be a tree shaped like the parameters "
                     "(a nested dict of arrays) or group scores [tensors, "
                     f"levels], got a {type(importance).__name__}")
  got = groups_lib.flat_params(importance)
  want = groups_lib.flat_params(params)
  for path in want:
    if path not in got:
      raise ValueError(f"importance has no leaf {'/'.join(path)} (the "
                       "parameters' tree has it)")
    shape, need = np.shape(got[path]), np.shape(want[path])
    if shape != need:
      raise ValueError(f"importance leaf {'/'.join(path)} has shape {shape}, "
                       f"the parameter's is {need}")
  extra = [p for p in got if p not in want]
  if extra:
    raise ValueError(f"importance has a leaf {'/'.join(extra[0])} that the "
                     "parameters do not")


def group_values(spec: groups_lib.GroupSpec, importance: Any) -> jnp.ndarray:
  """Group scores ``[T, K+1]`` from a Fisher tree, or checked given scores.

  Raises:
    ValueError: a wrong shape, or a score that is not a finite number >= 0
      (a NaN would make every choice look equally bad: an empty mask).
  """
  if isinstance(importance, (np.ndarray, jnp.ndarray)):
    values = jnp.asarray(importance, jnp.float32)
    if values.shape != spec.sizes.shape:
      raise ValueError(f"importance scores must have shape {spec.sizes.shape} "
                       f"[tensors, levels], got {values.shape}")
  else:
    # One compiled call instead of many small eager ops.
    values = jax.jit(lambda f: importance_lib.group_importance(spec, f))(
        importance)
  host = np.asarray(values)
  if not (np.isfinite(host) & (host >= 0)).all():
    raise ValueError("importance must be finite and >= 0 everywhere; got "
                     f"{int((~np.isfinite(host)).sum())} non-finite and "
                     f"{int((host < 0).sum())} negative group scores (a "
                     "diverged probe or a NaN in the model?)")
  return values


def _check_floor(floors: dict, spec: groups_lib.GroupSpec,
                 budget: float, policy: str, batch_size: int) -> float:
  """The minimum feasible training memory over the micro-batch choices
  (``floors``: m -> ``knapsack.min_feasible``); raises if ``budget`` is
  below it."""
  floor_bytes, t, k, m = min(f + (m,) for m, f in floors.items())
  if budget < floor_bytes:
    raise ValueError(
        f"memory budget {budget:.0f} bytes (smallest device, policy="
        f"{policy!r}) is below the minimum feasible training memory "
        f"{floor_bytes:.0f} bytes (training only {'/'.join(spec.paths[t])} at "
        f"fraction {spec.fractions[k - 1]}, batch_size={batch_size} in {m} "
        f"micro-batch(es))")
  return floor_bytes


def solve_joint(problems: dict, values, budget: float, *solve_args,
                floors: dict | None = None) -> tuple[int, dict[str, Any]]:
  """The subset and micro-batch count that maximize the objective together.

  ``problems`` maps each allowed micro-batch count ``m`` to its instance
  (``knapsack.make_problem``); the search solves each and keeps the best
  value, the smallest ``m`` among equals (fewer, larger micro-batches use
  the hardware better). A count whose cheapest mask exceeds the budget is
  skipped. Exact per ``m``, so exact jointly. ``floors`` (m ->
  ``knapsack.min_feasible``) saves recomputing them for every budget.

  Returns:
    ``(m, knapsack.solve's result for m)``.
  """
  if floors is None:
    floors = {m: knapsack.min_feasible(p) for m, p in problems.items()}
  best = None
  for m in sorted(problems):
    if floors[m][0] > budget:
      continue
    out = knapsack.solve(problems[m], values, budget, *solve_args)
    # Float sums of equal choices may differ in the last bits: a larger m
    # must win by more than rounding.
    if best is None or out["objective"] > best[1]["objective"] * (
        1 + 1e-6) + 1e-30:
      best = (m, out)
  if best is None:
    raise ValueError(f"memory budget {budget:.0f} bytes fits no micro-batch "
                     f"count in {sorted(problems)}")
  return best


def _search_tier(info, spec, params, problems, floors, values, budget,
                 to_mask, batch_size, tx, solve_args, frozen_weights
                 ) -> tuple[PyTree, dict[str, Any]]:
  """One tier's mask and its report: choice, memory, FLOPs, importance."""
  m, out = solve_joint(problems, values, budget, *solve_args, floors=floors)
  levels = out["levels"]
  mask = jax.device_get(to_mask(levels))
  breakdown = memory_lib.training_memory(info, spec, params, mask, batch_size,
                                         tx, frozen_weights, m)
  if breakdown["total"] > budget:  # The rounding guarantees this never runs.
    raise AssertionError(f"search exceeded budget: {breakdown['total']} > "
                         f"{budget}")
  total_value = float(jnp.sum(values[:, -1]))
  return mask, {
      "memory": breakdown,
      "micro_batches": m,
      "task_time_s": out["time_s"],
      "objective_value": out["objective"],
      "flops_per_example": memory_lib.training_flops(info, spec, params, mask),
      "importance": out["importance"],
      "importance_fraction": out["importance"] / max(total_value, 1e-30),
      "trained_params": int(spec.numel[np.arange(len(levels)), levels].sum()),
      "selected": {"/".join(spec.paths[t]): spec.fractions[k - 1]
                   for t, k in enumerate(levels) if k > 0},
      "resolution_bytes": out["resolution_bytes"],
      "num_cells": out["num_cells"],
  }


# Longer than 60 lines only by its docstring (every argument of the search).
def build_plan(info: groups_lib.ModelInfo, spec: groups_lib.GroupSpec,
               params: PyTree, importance: Any,
               device_memory_bytes: Sequence[float],
               tx: optax.GradientTransformation,
               tier_of_client: Sequence[int] | None = None,
               policy: str = "min", batch_size: int = 32,
               method: str = "exact", num_cells: int = 1024,
               resolution_bytes: float | None = None,
               frozen_weights: str = "ram",
               micro_batches: Sequence[int] = (1,),
               max_trained_params: int | None = None,
               objective: str = "importance",
               device_seconds: tuple[Sequence[float], Sequence[float]]
               | None = None,
               examples_per_task: float = 0.0
               ) -> tuple[masks_lib.MaskPlan, dict[str, Any]]:
  """Searches one mask per memory tier and packs them into a ``MaskPlan``.

  Args:
    info, spec: the model analysis (``groups.analyze``) and its groups.
    params: the model parameters (bare or ``{'params': ...}``); masks match.
    importance: a Fisher tree shaped like ``params``
      (``importance.fisher_diagonal``) or group scores ``[T, K+1]``.
    device_memory_bytes: ``[N]`` memory of each client.
    tx: the client optimizer (its state is charged per trained parameter).
    tier_of_client: ``[N]`` tier ids ``0..T-1`` (each used) or None.
    policy: 'min' or 'per_tier' (tiers and budgets: ``assign_tiers``).
    batch_size: client batch size (activation memory).
    method: 'exact' (DP) or 'greedy'.
    num_cells: DP cells (resolution = free budget / num_cells).
    resolution_bytes: explicit DP resolution (the table grows to fit).
    frozen_weights: 'ram' or 'flash': where untrained weights are charged
      (``memory`` docstring); budgets are RAM either way.
    micro_batches: the micro-batch counts a device may run its batch as
      (each divides ``batch_size``); each tier's search chooses one jointly
      with the subset (``solve_joint``).
    max_trained_params: at most this many trained parameters per tier (an
      upload budget: 4 bytes each); None: memory alone decides.
    objective: 'importance' (the paper's) or 'importance_per_time'
      (``knapsack`` docstring): importance per second of a tier's expected
      task time; needs ``device_seconds`` and method 'exact'.
    device_seconds: ``([N] seconds per FLOP, [N] seconds per byte)`` of
      each client (``1/speed`` and ``1/bw_up + 1/bw_down``); a tier's task
      time is the mean over its clients. With it every tier reports its
      expected ``task_time_s``.
    examples_per_task: examples a task trains on (local steps x batch).

  Returns:
    ``(MaskPlan, report)``; report has ``tiers`` (per tier: budget_bytes,
    num_clients, memory breakdown and flops_per_example of the chosen mask
    (``memory``), micro_batches, importance(_fraction),
    trained_params, selected groups, resolution) and ``min_feasible_bytes``,
    ``num_groups``, ``method``, ``policy``, ``frozen_weights``,
    ``micro_batch_choices``, ``full_model_memory``.

  Raises:
    ValueError: on a bad option, an importance tree whose structure or
      shapes differ from ``params``, or a budget below the minimum feasible
      memory.
  """
  knapsack.check_method(method)
  knapsack.check_objective(objective, method, device_seconds)
  tiers, budgets = assign_tiers(device_memory_bytes, tier_of_client, policy)
  problems = {int(m): knapsack.make_problem(info, spec, batch_size, tx,
                                           frozen_weights, int(m),
                                           max_trained_params)
              for m in micro_batches}
  if not isinstance(importance, (np.ndarray, jnp.ndarray)):
    check_importance_tree(params, importance)
  values = group_values(spec, importance)
  floors = {m: knapsack.min_feasible(p) for m, p in problems.items()}
  floor_bytes = _check_floor(floors, spec, min(budgets), policy, batch_size)
  to_mask = jax.jit(lambda lv: groups_lib.levels_to_mask(spec, params, lv))
  tier_masks, reports = [], []
  for j, budget in enumerate(budgets):
    time_model = None
    if device_seconds is not None:
      per_flop, per_byte = (np.asarray(a, np.float64).reshape(-1)
                            for a in device_seconds)
      if per_flop.shape != tiers.shape or per_byte.shape != tiers.shape:
        raise ValueError(f"device_seconds must be two [N] arrays like "
                         f"device_memory_bytes {tiers.shape}, got "
                         f"{per_flop.shape} and {per_byte.shape}")
      time_model = knapsack.make_time_model(
          info, spec, examples_per_task, float(per_flop[tiers == j].mean()),
          float(per_byte[tiers == j].mean()))
    mask, report = _search_tier(info, spec, params, problems, floors, values,
                                budget, to_mask, batch_size, tx,
                                (method, num_cells, resolution_bytes,
                                 objective, time_model),
                                frozen_weights)
    tier_masks.append(mask)
    reports.append({"budget_bytes": budget,
                    "num_clients": int((tiers == j).sum()), **report})
  plan = masks_lib.make_plan(
      params, tier_masks, tiers,
      flops_per_example=[r["flops_per_example"] for r in reports],
      memory_bytes=[r["memory"]["total"] for r in reports])
  return plan, {
      "policy": policy, "method": method, "objective": objective,
      "tiers": reports,
      "frozen_weights": frozen_weights,
      "micro_batch_choices": sorted(problems),
      "max_trained_params": max_trained_params,
      "min_feasible_bytes": floor_bytes, "num_groups": spec.num_groups,
      "num_tensors": spec.num_tensors, "num_params": info.num_params,
      "full_model_memory": memory_lib.memory_from_sizes(
          info, spec, spec.sizes[:, -1], batch_size, tx, frozen_weights)}
