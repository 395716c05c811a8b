"""The subset search as a knapsack: which parameter groups fit a budget.

Problem. Tensors ``t = 0..T-1`` (from ``groups.make_groups``) each take one
level ``k in [0, K]`` (first ``sizes[t, k]`` output channels; 0 = frozen) with
importance ``v[t, k]`` (cumulative, ``importance.group_importance``).
Maximize ``sum_t v[t, k_t]`` subject to ``memory(k) <= budget`` where, with
``e`` the earliest layer that trains (``memory`` docstring),

  memory(k) = base + sum_t c[t, k_t]                      (weights, workspace,
            + stored[e] + [some kernel/scale of e trains] * in[e]   grads, opt)

``stored[e]`` decreases with ``e``, so the activation term is not additive
(``memory.activation_cost`` computes it for the objective and greedy's test).

Exact method. For each candidate ``e`` the activation cost is fixed and the
rest is a multiple-choice knapsack: tensors of layers ``< e`` are frozen, and
the input cost ``in[e]`` is folded into every non-zero level of the
kernel/scale tensors of layer ``e``. Solved by dynamic programming over
discretized cost (``lax.scan`` over tensors, ``vmap`` over ``e``), then the
best ``e`` wins. No "layer ``e`` must train" constraint is needed: a mask
whose true earliest layer is ``e' > e`` is charged at least its true memory
under ``e`` (``stored[e] >= stored[e'] + in[e']``), so the maximum over ``e``
equals the true optimum and every returned mask is truly feasible.

Discretization. Costs are rounded UP and the free budget ``budget - base -
stored[e]`` DOWN to a resolution ``r`` bytes, so a returned mask never exceeds
the budget. Optimality gap: the result is at least as good as the true
optimum under the budget ``budget - (m + 1) * r``, where ``m`` is the number
of tensors that mask trains (each rounding loses < r). With ``num_cells``
cells, ``r = max_e(free budget) / num_cells`` unless ``resolution`` is given
(the table then grows to fit it). Integer costs with ``r = 1`` are solved
exactly.

Greedy method. Upgrades ``(t, k)`` sorted by importance gain per byte (cost:
parameter-state bytes plus the activation bytes of making ``t``'s layer the
earliest), accepted in one pass when the exact (discretized) memory stays
within the budget.

Time-aware objective (``objective='importance_per_time'``). A task's
expected time is linear in the levels once ``e`` is fixed, like memory:

  time(k) = layer_s[e] + sum_t option_s[t, k_t]

with ``layer_s[e]`` the forward and input-gradient compute of an earliest
layer ``e`` and ``option_s`` a level's weight-gradient compute plus its
upload and download (``TimeModel``). The search then maximizes
``importance / time`` under the same memory (and upload) budget by
Dinkelbach's method: ``lam = V(S)/T(S)`` of the current choice, then the
exact DP above maximizes ``V - lam T`` (values ``v - lam option_s``, a
per-``e`` offset ``-lam layer_s[e]``), until no choice beats ``lam``. Each
step strictly raises the ratio and there are finitely many choices, so it
ends at the optimum; charging a choice under ``e`` below its true earliest
layer overstates its time (``layer_s`` is non-increasing in ``e``) as it
overstates its memory, so the maximum over ``e`` stays exact. With
importance proportional to the loss decrease of an update and ``C`` tasks in
flight, ``C / time`` updates arrive per second: the ratio is the expected
progress per second of virtual time.

See docs/design.md, Subset search; ``plan.build_plan`` runs one search per
memory tier.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from ftte_jax.search import groups as groups_lib
from ftte_jax.search import memory as memory_lib

METHODS = ("exact", "greedy")
# What the search maximizes (module docstring).
OBJECTIVES = ("importance", "importance_per_time")


@struct.dataclass
class SearchProblem:
  """Costs of a search instance in bytes (host numpy, float64)."""

  option_bytes: np.ndarray  # [T, K+1] gradient + optimizer (+ weight with
  #                           frozen weights in flash, + accumulator with
  #                           micro-batches) bytes per level.
  valid: np.ndarray  # [T, K+1] bool: level selectable (level 0 always).
  tensor_layer: np.ndarray  # [T] int: layer of each tensor.
  needs_input: np.ndarray  # [T] bool: gradient needs the layer input.
  input_bytes: np.ndarray  # [L] stored input bytes of each layer (batch incl.).
  stored_bytes: np.ndarray  # [L] stored bytes if layer e is the earliest.
  base_bytes: float  # [] workspace (+ all weights when frozen ones sit in
  #                     RAM): paid even when nothing trains.
  # [] the most option bytes a choice may use: a cap on the trained
  # parameters, hence on the upload (``make_problem``'s
  # ``max_trained_params``); inf: none.
  option_cap_bytes: float = math.inf

  @property
  def num_layers(self) -> int:
    return int(self.input_bytes.shape[0])


@struct.dataclass
class Discretized:
  """A ``SearchProblem`` at one budget, in integer cells (device arrays)."""

  w_option: jnp.ndarray  # [T, K+1] int32 cells per level (invalid: > cap).
  w_input: jnp.ndarray  # [L] int32 cells of each layer's input.
  cap: jnp.ndarray  # [L] int32 free cells if e is earliest (-1: infeasible).
  tensor_layer: jnp.ndarray  # [T] int32.
  needs_input: jnp.ndarray  # [T] bool.
  resolution: jnp.ndarray  # [] float32 bytes per cell.
  option_cap: jnp.ndarray  # [] int32 most option cells (trained-size cap).


def make_problem(info: groups_lib.ModelInfo, spec: groups_lib.GroupSpec,
                 batch_size: int, tx: optax.GradientTransformation,
                 frozen_weights: str = "ram",
                 micro_batches: int = 1,
                 max_trained_params: int | None = None) -> SearchProblem:
  """Builds the search instance of a model (costs from ``memory``).

  With ``frozen_weights='flash'`` a trained parameter also brings its
  weight into RAM (one more 4-byte slot per level) and the base holds no
  weights. With ``micro_batches = m > 1`` activations are those of a batch
  of ``batch_size / m`` and a trained parameter also has an accumulator
  slot. ``max_trained_params`` caps the trained parameters (and with them
  the upload per update, 4 bytes each): a second constraint that is linear
  in the option bytes, so the DP keeps one table.
  """
  slots = memory_lib.validated_slots(batch_size, spec, tx, frozen_weights,
                                     micro_batches)
  in_flash = frozen_weights == "flash"
  per_param = 1 + slots + in_flash + (micro_batches > 1)
  batch_size = batch_size // micro_batches  # what activations see.
  act = memory_lib.BYTES * batch_size
  ins, _ = memory_lib.layer_arrays(info)
  # The workspace depends on the earliest trained layer like the stored
  # activations do: the excess over the nothing-trains workspace joins
  # stored_bytes[e], the rest is base.
  work = memory_lib.BYTES * memory_lib.workspace_after(info, batch_size)
  return SearchProblem(
      option_bytes=(memory_lib.BYTES * per_param * spec.numel).astype(
          np.float64),
      valid=spec.valid.copy(),
      tensor_layer=spec.layer.copy(),
      needs_input=spec.needs_input.copy(),
      input_bytes=(act * ins).astype(np.float64),
      stored_bytes=(act * memory_lib.stored_after(info) + work[:-1]
                    - work[-1]).astype(np.float64),
      base_bytes=float(memory_lib.BYTES * info.num_params * (not in_flash)
                       + work[-1]),
      option_cap_bytes=(math.inf if max_trained_params is None else
                        float(memory_lib.BYTES * per_param *
                              int(max_trained_params))))


def problem_memory(problem: SearchProblem, levels: np.ndarray) -> float:
  """Exact memory (bytes) of one level per tensor; the search's objective."""
  levels = np.asarray(levels)
  t = np.arange(levels.shape[0])
  _, act = memory_lib.activation_cost(levels > 0, problem.tensor_layer,
                                      problem.needs_input,
                                      problem.stored_bytes, problem.input_bytes)
  return float(problem.base_bytes + problem.option_bytes[t, levels].sum()
               + act)


def min_feasible(problem: SearchProblem) -> tuple[float, int, int]:
  """Cheapest memory that trains anything: (bytes, tensor, level).

  Memory only grows when groups are added, so the cheapest non-empty mask
  trains a single group.
  """
  best = (math.inf, -1, -1)
  t_count, k_count = problem.option_bytes.shape
  for t in range(t_count):
    for k in range(1, k_count):
      if problem.valid[t, k]:
        lv = np.zeros(t_count, np.int64)
        lv[t] = k
        best = min(best, (problem_memory(problem, lv), t, k))
  return best


def discretize(problem: SearchProblem, budget: float, num_cells: int = 1024,
               resolution: float | None = None) -> tuple[Discretized, int]:
  """Rounds costs up and free budgets down to cells (host, float64).

  Args:
    problem: the instance.
    budget: memory budget in bytes.
    num_cells: cells of the DP table; with ``resolution`` None the
      resolution is ``max free budget / num_cells``.
    resolution: bytes per cell; the table then grows to
      ``max(num_cells, ceil(max free budget / resolution))`` cells.

  Returns:
    ``(Discretized, num_cells)``; pass ``num_cells`` to the solvers (static).
  """
  free = budget - problem.base_bytes - problem.stored_bytes  # [L]
  top = max(float(free.max()) if free.size else 0.0, 0.0)
  if resolution is not None:
    if not resolution > 0:
      raise ValueError(f"resolution must be > 0 bytes, got {resolution}")
    num_cells = max(int(num_cells), math.ceil(top / resolution), 1)
    res = float(resolution)
  else:
    if int(num_cells) < 1:
      raise ValueError(f"num_cells must be >= 1, got {num_cells}")
    res = top / num_cells if top > 0 else 1.0
  num_cells = int(num_cells)

  def up(x):
    w = np.ceil(x / res)
    return w + (w * res < x)  # guard float64 rounding: never under-charge.

  cap = np.floor(free / res)
  cap = cap - (cap * res > free)
  cap = np.clip(cap, -1, num_cells).astype(np.int32)
  big = num_cells + 1
  w_opt = np.minimum(up(problem.option_bytes), big)
  w_opt = np.where(problem.valid, w_opt, big).astype(np.int32)
  w_in = np.minimum(up(problem.input_bytes), big).astype(np.int32)
  # Rounded down: options are rounded up, so the cap never lets through
  # more than the true cap.
  opt_cap = min(np.floor(problem.option_cap_bytes / res), num_cells)
  return Discretized(
      option_cap=jnp.asarray(opt_cap, jnp.int32),
      w_option=jnp.asarray(w_opt), w_input=jnp.asarray(w_in),
      cap=jnp.asarray(cap), tensor_layer=jnp.asarray(problem.tensor_layer,
                                                     jnp.int32),
      needs_input=jnp.asarray(problem.needs_input),
      resolution=jnp.asarray(res, jnp.float32)), num_cells


def _weights_for(d: Discretized, e, with_input, num_cells: int):
  """[T, K+1] cells per level and free cells for earliest layer ``e``.

  ``with_input`` False freezes the kernel/scale tensors of layer ``e``;
  True lets them train and pays ``in[e]`` once, up front.
  """
  k = jnp.arange(d.w_option.shape[1])
  at_e_input = (d.tensor_layer == e) & d.needs_input
  allowed = ((d.tensor_layer >= e) & (with_input | ~at_e_input))[:, None] | (
      k[None, :] == 0)
  w = jnp.where(allowed, d.w_option, num_cells + 1)
  cap = jnp.where(with_input, d.cap[e] - d.w_input[e], d.cap[e])
  return w, jnp.minimum(cap, d.option_cap)


def solve_exact(d: Discretized, values: jnp.ndarray, num_cells: int,
                layer_offset: jnp.ndarray | None = None
                ) -> tuple[jnp.ndarray, jnp.ndarray]:
  """Exact multiple-choice knapsack per earliest layer (pure, jittable).

  For each earliest layer ``e`` two knapsacks run: one with the layer's
  kernel/scale tensors frozen, one with them free and ``in[e]`` prepaid (a
  layer may hold several input-needing tensors; the input is stored once).

  Args:
    d: from ``discretize``.
    values: ``[T, K+1]`` cumulative importance (``values[:, 0]`` is ignored
      and treated as 0); entries may be negative.
    num_cells: static DP size returned by ``discretize``.
    layer_offset: ``[L]`` value added to a choice whose earliest layer is
      (charged as) ``e`` (the time-aware objective's ``-lam layer_s``);
      None: 0.

  Returns:
    ``(levels [T] int32, value [] float32)``; all-zero levels (value 0) when
    nothing fits.
  """
  values = jnp.asarray(values, jnp.float32).at[:, 0].set(0.0)
  cells = jnp.arange(num_cells + 1)
  num_layers = d.w_input.shape[0]

  def for_case(e, with_input):
    w, cap = _weights_for(d, e, with_input, num_cells)

    def step(dp, xs):
      w_t, v_t = xs  # [K+1] each.
      idx = cells[None, :] - w_t[:, None]  # [K+1, C]
      cand = jnp.where(idx >= 0, dp[jnp.maximum(idx, 0)] + v_t[:, None],
                       -jnp.inf)
      return jnp.max(cand, axis=0), jnp.argmax(cand, axis=0).astype(jnp.int8)

    dp, choice = jax.lax.scan(step, jnp.zeros(num_cells + 1), (w, values))
    best = jnp.where(cap >= 0, dp[jnp.clip(cap, 0, num_cells)], -jnp.inf)
    if layer_offset is not None:
      best = best + layer_offset[e]

    def back(c, xs):
      choice_t, w_t = xs
      k = choice_t[c].astype(jnp.int32)
      return c - w_t[k], k

    _, levels = jax.lax.scan(back, jnp.clip(cap, 0, num_cells), (choice, w),
                             reverse=True)
    return best, levels

  es = jnp.repeat(jnp.arange(num_layers), 2)
  modes = jnp.tile(jnp.array([False, True]), num_layers)
  bests, levels = jax.vmap(for_case)(es, modes)
  i = jnp.argmax(bests)
  ok = bests[i] > -jnp.inf
  return (jnp.where(ok, levels[i], 0).astype(jnp.int32),
          jnp.where(ok, bests[i], 0.0))


def _fits(d: Discretized, levels: jnp.ndarray) -> jnp.ndarray:
  """Whether levels fit the discretized budget (same test as the DP).

  ``cap[e]`` is the free budget once layer ``e``'s stored activations are
  paid, so ``-cap`` plays ``stored`` in ``memory.activation_cost``: levels
  fit iff option cells + input cells - cap[e] <= 0 (nothing trains: 0).
  """
  used = jnp.sum(jnp.take_along_axis(d.w_option, levels[:, None], 1))
  _, act = memory_lib.activation_cost(levels > 0, d.tensor_layer,
                                      d.needs_input, -d.cap, d.w_input)
  return (used + act <= 0) & (used <= d.option_cap)


def solve_greedy(d: Discretized, values: jnp.ndarray
                 ) -> tuple[jnp.ndarray, jnp.ndarray]:
  """Greedy by importance gain per byte (pure, jittable).

  Returns:
    ``(levels [T] int32, value [] float32)``.
  """
  values = jnp.asarray(values, jnp.float32).at[:, 0].set(0.0)
  t_count, k_count = values.shape
  big = jnp.iinfo(jnp.int32).max // 4
  w_opt = jnp.where(d.w_option > jnp.max(d.cap), big, d.w_option)
  # Activation cells of making a layer the earliest, relative to the last.
  act = (d.cap[-1] - d.cap)[d.tensor_layer] + jnp.where(
      d.needs_input, d.w_input[d.tensor_layer], 0)
  gain = values[:, 1:] - values[:, :-1]
  dcost = jnp.maximum(w_opt[:, 1:] - w_opt[:, :-1], 0) + act[:, None]
  ratio = gain / jnp.maximum(dcost, 1).astype(jnp.float32)
  order = jnp.argsort(-ratio.reshape(-1))
  items_t = order // (k_count - 1)
  items_k = order % (k_count - 1) + 1

  def step(levels, item):
    t, k = item
    cand = levels.at[t].set(k)
    ok = (levels[t] < k) & (d.w_option[t, k] <= jnp.max(d.cap)) & _fits(d, cand)
    return jnp.where(ok, cand, levels), None

  levels, _ = jax.lax.scan(step, jnp.zeros(t_count, jnp.int32),
                           (items_t, items_k))
  value = jnp.sum(jnp.take_along_axis(values, levels[:, None], 1))
  return levels, value


_solve_exact_jit = jax.jit(solve_exact, static_argnames="num_cells")
_solve_greedy_jit = jax.jit(solve_greedy)


def check_method(method: str) -> None:
  if method not in METHODS:
    raise ValueError(f"method must be one of {METHODS}, got {method!r}")


def check_objective(objective: str, method: str, time_model) -> None:
  if objective not in OBJECTIVES:
    raise ValueError(f"search_objective must be one of {OBJECTIVES}, got "
                     f"{objective!r}")
  if objective == "importance_per_time":
    if time_model is None:
      raise ValueError("search_objective='importance_per_time' needs a task "
                       "time model (the fleet's speeds and bandwidths)")
    if method != "exact":
      raise ValueError("search_objective='importance_per_time' runs on the "
                       "exact search; use search_method='exact'")


def solve(problem: SearchProblem, values, budget: float,
          method: str = "exact", num_cells: int = 1024,
          resolution: float | None = None, objective: str = "importance",
          time_model: "TimeModel | None" = None) -> dict[str, Any]:
  """Solves one instance (host entry point; the solvers run jitted).

  Args:
    problem, values, budget: the instance, ``[T, K+1]`` importance and the
      memory budget (bytes).
    method, num_cells, resolution: the solver and its DP table
      (``discretize``).
    objective: 'importance' (the paper's) or 'importance_per_time'
      (module docstring; needs ``time_model`` and the exact method).
    time_model: a task's expected time (``make_time_model``); with it the
      result also reports the choice's ``time_s``.

  Returns:
    Dict: levels ([T] np.int32), importance, objective (importance, or
    importance per second), memory_bytes (exact), time_s (None without a
    time model), resolution_bytes, num_cells, and ``iterations``
    (Dinkelbach's, 0 for importance).
  """
  check_method(method)
  check_objective(objective, method, time_model)
  d, num_cells = discretize(problem, budget, num_cells, resolution)
  values = jnp.asarray(values, jnp.float32)
  iterations = 0
  if objective == "importance_per_time":
    levels, iterations = _solve_ratio(problem, d, values, time_model,
                                      num_cells)
    value = np.asarray(values)[np.arange(levels.size), levels].sum()
  elif method == "exact":
    levels, value = _solve_exact_jit(d, values, num_cells=num_cells)
  else:
    levels, value = _solve_greedy_jit(d, values)
  levels = np.asarray(jax.device_get(levels))
  seconds = (None if time_model is None else
             problem_time(time_model, problem, levels))
  value = float(value)
  return {"levels": levels, "importance": value,
          "objective": (value / seconds if objective == "importance_per_time"
                        else value),
          "memory_bytes": problem_memory(problem, levels),
          "time_s": seconds, "iterations": iterations,
          "resolution_bytes": float(d.resolution), "num_cells": num_cells}


@struct.dataclass
class TimeModel:
  """A task's expected time (seconds) per level choice (module docstring).

  ``time = layer_s[e] + sum_t option_s[t, k_t]`` for earliest trained layer
  ``e``; ``none_s`` when nothing trains (the forward pass alone).
  """

  option_s: np.ndarray  # [T, K+1] float64 s: weight-gradient compute and
  #                       the level's parameters up and down (level 0: 0).
  layer_s: np.ndarray  # [L] float64 s: forward + input-gradient compute.
  none_s: float  # [] s: forward compute only.


def flops_parts(info: groups_lib.ModelInfo, spec: groups_lib.GroupSpec
                ) -> tuple[float, np.ndarray, np.ndarray]:
  """Per-example training FLOPs in additive pieces (``memory`` docstring).

  Returns:
    ``(forward, input_grad [L], weight_grad [T, K+1])``: FLOPs of a choice
    with earliest layer ``e`` are ``forward + input_grad[e] + sum_t
    weight_grad[t, k_t]`` (``memory.flops_from_sizes``), ``forward`` when
    nothing trains.
  """
  fwd, bwd_in = 0.0, []
  for l in info.layers:
    if l.kind == "linear":
      fwd += 2.0 * l.macs + l.out_size * ("bias" in dict(l.param_shapes))
      bwd_in.append(2.0 * l.macs)
    else:
      fwd += float(memory_lib.NORM_FLOPS_PER_ELEMENT * l.out_size)
      bwd_in.append(float(memory_lib.NORM_FLOPS_PER_ELEMENT * l.out_size))
  bwd_in = np.asarray(bwd_in, np.float64)
  after = np.concatenate([np.cumsum(bwd_in[::-1])[::-1][1:], [0.0]])
  frac = spec.sizes / spec.sizes[:, -1:]
  per_tensor = []
  for t in range(spec.num_tensors):
    l = info.layers[spec.layer[t]]
    if l.kind == "linear" and spec.paths[t][-1] == "kernel":
      per_tensor.append(2.0 * l.macs)
    elif l.kind == "linear":
      per_tensor.append(float(l.out_size))
    else:
      per_tensor.append(2.0 * l.out_size)
  return float(fwd), after, np.asarray(per_tensor)[:, None] * frac


def make_time_model(info: groups_lib.ModelInfo, spec: groups_lib.GroupSpec,
                    examples_per_task: float, seconds_per_flop: float,
                    seconds_per_byte: float) -> TimeModel:
  """A task's expected time on a device population.

  Args:
    info, spec: the model analysis and its groups.
    examples_per_task: local steps times batch size.
    seconds_per_flop: the population's mean ``1 / speed`` (the mean of a
      task's compute time over a uniformly chosen device).
    seconds_per_byte: its mean ``1 / bw_up + 1 / bw_down``: a trained
      parameter is uploaded (the masked delta) and downloaded (the
      coordinates it changes), 4 bytes each way.
  """
  for name, v in (("examples_per_task", examples_per_task),
                  ("seconds_per_flop", seconds_per_flop),
                  ("seconds_per_byte", seconds_per_byte)):
    if not (v >= 0 and math.isfinite(v)):
      raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")
  fwd, after, weight = flops_parts(info, spec)
  compute = float(examples_per_task) * float(seconds_per_flop)
  return TimeModel(
      option_s=compute * weight + float(seconds_per_byte) *
      memory_lib.BYTES * spec.numel.astype(np.float64),
      layer_s=compute * (fwd + after), none_s=compute * fwd)


def problem_time(time_model: TimeModel, problem: SearchProblem,
                 levels: np.ndarray) -> float:
  """Expected task time (s) of one level per tensor."""
  levels = np.asarray(levels)
  on = levels > 0
  if not on.any():
    return float(time_model.none_s)
  e = int(np.asarray(problem.tensor_layer)[on].min())
  t = np.arange(levels.shape[0])
  return float(time_model.layer_s[e] +
               time_model.option_s[t, levels].sum())


# Dinkelbach stops when no choice beats the current ratio by this much
# (relative to the ratio); it also stops after _MAX_ITERATIONS.
_RATIO_TOL, _MAX_ITERATIONS = 1e-6, 100


def _solve_ratio(problem: SearchProblem, d: Discretized, values: jnp.ndarray,
                 time_model: TimeModel, num_cells: int
                 ) -> tuple[np.ndarray, int]:
  """Levels maximizing importance / time under the discretized budget.

  Works in normalized units (importance over the whole model's, time over
  the whole model's) so the float32 DP sees numbers near 1.
  """
  v = np.asarray(values, np.float64).copy()
  v[:, 0] = 0.0
  v_scale = max(float(v[:, -1].sum()), 1e-30)
  t_scale = max(float(time_model.layer_s[0] + time_model.option_s[:, -1].sum()
                      ), 1e-30)
  vn, opt_s = v / v_scale, time_model.option_s / t_scale
  layer_s = time_model.layer_s / t_scale
  levels, _ = _solve_exact_jit(d, jnp.asarray(vn, jnp.float32),
                               num_cells=num_cells)
  levels = np.asarray(jax.device_get(levels))
  t = np.arange(levels.size)
  ratio_of = lambda lv: (vn[t, lv].sum() /
                         (problem_time(time_model, problem, lv) / t_scale))
  if not (levels > 0).any():
    return levels, 0
  lam = ratio_of(levels)
  for it in range(1, _MAX_ITERATIONS + 1):
    shifted = vn - lam * opt_s
    shifted[:, 0] = 0.0
    cand, _ = _solve_exact_jit(d, jnp.asarray(shifted, jnp.float32),
                               num_cells=num_cells,
                               layer_offset=jnp.asarray(-lam * layer_s,
                                                        jnp.float32))
    cand = np.asarray(jax.device_get(cand))
    if not (cand > 0).any():
      return levels, it
    new = ratio_of(cand)
    if new <= lam * (1 + _RATIO_TOL):
      return levels, it
    levels, lam = cand, new
  return levels, _MAX_ITERATIONS
