"""Driving a built experiment: the jitted server step, evaluations, re-search.

``build(config)`` runs the host-side planning once (``planning.make_setup``)
and binds the engine to it. ``Experiment.run`` drives the jitted server
step with evaluations every ``eval_every`` steps. Evaluation rounds are
absolute (``round % eval_every == 0``), so a run resumed from a checkpoint
logs exactly the rows an uninterrupted run would.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from ftte_jax import compilation
from ftte_jax.core import client
from ftte_jax.core import engine
from ftte_jax.core import extensions as extensions_lib
from ftte_jax.core import keys
from ftte_jax.core import one_shot
from ftte_jax.core import personal
from ftte_jax.experiment import memory_plan
from ftte_jax.experiment import planning
from ftte_jax.experiment import report
from ftte_jax.experiment.config import ExperimentConfig
from ftte_jax.experiment.config import validate


# XLA's CPU backend hands dots and reductions to YNNPACK by default; this
# keeps its reductions and leaves the dots to XLA's own library calls.
_CPU_LIBRARY_FUSIONS = {
    "xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_REDUCE"}


def step_compiler_options() -> dict:
  """XLA options of the step programs (``step``, ``steps``).

  On the CPU, two choices, each timed on the FedJAX workload of
  ``experiments/benchmarks/vs_fedjax.py`` by
  ``experiments/benchmarks/step_options.py`` (docs/design.md, "Jit
  boundary"); other backends keep their defaults:

  * LLVM optimization level 2. The step's time goes to dots and
    convolutions in library kernels that the level does not touch; level 3
    only spends longer optimizing the few hundred small bookkeeping kernels
    around them. It compiles faster and runs as fast.
  * No YNNPACK dot fusions (``_CPU_LIBRARY_FUSIONS``, where this XLA has
    the option): the clients' small dots (batches of 32 rows) run faster
    as XLA's own dot calls, and the step compiles no slower.

  The results are equally valid but not the bits of XLA's defaults (the
  pinned fingerprints, ``tests/test_reproducibility.py``, hold either way).
  """
  if jax.default_backend() != "cpu":
    return {}
  options = {"xla_backend_optimization_level": 2}
  if _xla_accepts(tuple(_CPU_LIBRARY_FUSIONS.items())):
    options.update(_CPU_LIBRARY_FUSIONS)
  return options


@functools.cache
def _xla_accepts(options: tuple[tuple[str, str], ...]) -> bool:
  """Whether this XLA compiles with ``options`` ((name, value) pairs): an
  experimental option may be missing from older or newer releases. Costs
  one trivial compile a process (a cache hit where the persistent cache is
  on)."""
  try:
    jax.jit(lambda x: x, compiler_options=dict(options)).lower(
        np.float32(0)).compile()
  except Exception as e:  # pylint: disable=broad-except
    if "INVALID_ARGUMENT" in str(e):
      return False
    raise
  return True


def evaluate_compiler_options() -> dict:
  """XLA options of the evaluation: ``one_shot``'s (level 2; on the CPU
  the elemental emitters).

  An evaluation runs a few times a run, and its time goes to the model's
  dots and convolutions, which run in library kernels either way; the
  rest (loss, argmax, sums) is a few small kernels. On the 2-core CPU the
  MLP's and LeNet-5's evaluations compile in 50% and 40% of the default's
  time, with the same bits, and run as fast
  (``experiments/benchmarks/startup.py``; docs/design.md, "Jit boundary").
  """
  return one_shot.compiler_options()


# A run in which no update arrives over this many task outcomes stops with
# stopped_by "no_updates" (``no_update_window``). At dropout 0.99 an honest
# run has 1000 failures in a row with probability 4e-5.
NO_UPDATE_TASKS = 1000
# engine.collect_arrivals' cap on the events of a step (refill='arrival'):
# 64 K; a step in which no update arrives saw that many failed tasks.
EVENTS_PER_UPDATE = 64
# A task's duration is its nominal time times exp(task_sigma * z), z a
# draws.normal value, which lies in (-5.5, 5.5) (tests/test_faults.py).
MAX_JITTER_Z = 6.0


def no_update_window(config: ExperimentConfig) -> int:
  """Server steps in which no update arrives after which ``run`` stops
  (``stopped_by: "no_updates"``): enough steps for ``NO_UPDATE_TASKS``
  tasks to have ended, at K a step (refill 'step', or ``count_timeouts``)
  or 64 K (refill 'arrival': a step that receives nothing took the
  engine's 64 K events)."""
  e = config.engine
  per_step = e.buffer_size * (
      1 if e.refill == "step" or e.count_timeouts else EVENTS_PER_UPDATE)
  return max(1, -(-NO_UPDATE_TASKS // per_step))


def _arrived(row: dict) -> int | None:
  """Updates that arrived by ``row``: applied, or refused as non-finite
  (what ``on_divergence`` governs); None for rows without counters."""
  if "updates_applied" not in row:
    return None
  return row["updates_applied"] + row.get("updates_nonfinite", 0)


def _stalled(history: list[dict], window: int) -> bool:
  """Whether the logged rows show ``window`` or more server steps in which
  no update arrived. Read from the rows (checkpointed with the state), so
  a resumed run stops where an uninterrupted one does."""
  arrived = _arrived(history[-1])
  if arrived is None:  # rows given by a caller, without counters.
    return False
  since = next(r for r in history if _arrived(r) == arrived)
  return history[-1]["round"] - since["round"] >= window


def check_updates_can_arrive(config: ExperimentConfig,
                             env: engine.Environment, setup) -> None:
  """Refuses a run in which no update can ever arrive: every eligible
  device abandons every task, or (without re-search, which may change the
  masks) the deadline is shorter than any eligible device's fastest task.

  Raises:
    ValueError: naming the flag or the trace file.
  """
  eligible = np.asarray(env.eligible)
  drop = np.asarray(env.fleet.dropout)
  trace = config.fleet.trace_path
  source = (f"trace_path={trace}: every eligible device has dropout 1" if
            trace else f"dropout={config.fleet.dropout:g}: every task is "
            "abandoned")
  if not (eligible & (drop < 1)).any():
    raise ValueError(f"{source}, so no update can ever arrive")
  e = config.engine
  if config.search.research_every or (e.deadline_s is None and
                                      e.deadline_factor >= 1):
    return  # a factor >= 1 leaves the slowest first task within it.
  n = config.data.num_clients
  # The shortest a task can take: on a device holding the model (its
  # download is the mask's part only), at the most favourable jitter. One
  # jitted call, as make_environment's deadline: eager, its dozen ops
  # would each compile on their own.
  nominal, _ = one_shot.jit(
      lambda f, p, s: engine.nominal_duration(
          e.batch_size, f, p, jnp.arange(n), s, jnp.ones(n, bool)))(
              env.fleet, setup.plan, env.num_steps)
  fastest = np.asarray(nominal, np.float64) * np.exp(
      -MAX_JITTER_Z * float(env.fleet.task_sigma))
  ok = eligible & (drop < 1)
  deadline = float(env.deadline)
  if not (fastest[ok] <= deadline).any():
    flag = (f"deadline_s={e.deadline_s:g}" if e.deadline_s is not None else
            f"deadline_factor={e.deadline_factor:g} (a deadline of "
            f"{deadline:.3g} s)")
    raise ValueError(f"{flag} is shorter than any task can take (the "
                     f"fastest eligible device needs at least "
                     f"{fastest[ok].min():.3g} s), so no update can ever "
                     "arrive")


@dataclasses.dataclass
class Experiment:
  """A built experiment: its setup, the engine bound to it, jitted functions."""

  setup: planning.Setup
  env: engine.Environment
  sim: engine.Simulator
  plan_report: dict  # the latest search's report (a re-search replaces it).
  # How client_chunk=0 was resolved (memory_plan.Plan.as_dict); None when
  # the chunk was given.
  client_plan: dict | None = None
  step_fn: Callable = dataclasses.field(init=False)
  steps_fn: Callable = dataclasses.field(init=False)
  eval_fn: Callable = dataclasses.field(init=False)
  # The held-out set: a dict with "x", "y" and any extras, placed like env.
  test: dict = dataclasses.field(init=False)
  # Per-device evaluation (holdout_fraction > 0): the jitted function, the
  # held-out slices and the devices evaluated; None without a hold-out.
  personal_fn: Callable | None = dataclasses.field(init=False, default=None)
  personal_args: tuple = dataclasses.field(init=False, default=())
  # ``compile``'s executables by name ("step" or "steps", "evaluate"), and
  # each one's persistent-cache status (``compilation.compile_all``).
  programs: dict = dataclasses.field(init=False, default_factory=dict)
  program_status: dict = dataclasses.field(init=False, default_factory=dict)
  # The compiled step's memory and XLA's cost analysis
  # (memory_plan.ProgramMemory.as_dict), once compiled.
  step_memory: dict | None = dataclasses.field(init=False, default=None)

  def __post_init__(self):
    # With a virtual-time budget a step may have to be undone (exact
    # stops), so its input state must survive: no donation then.
    donate = () if self.config.max_virtual_time is not None else (1,)
    options = step_compiler_options()
    eval_options = evaluate_compiler_options()
    # With a clients mesh every array lives replicated on all its devices
    # (and processes); the step shards the K clients itself.
    self.env = self.place(self.env)
    self.test = self.place(dict(self.setup.test))
    self.step_fn = jax.jit(self.sim.step, donate_argnums=donate,
                           compiler_options=options)
    # Chunks undo a step past the budget themselves: always donated.
    self.steps_fn = jax.jit(self.sim.steps, donate_argnums=1,
                            compiler_options=options)
    self.eval_fn = jax.jit(self.sim.evaluate, compiler_options=eval_options)
    if self.setup.holdout is not None:
      self._build_personal()

  def _build_personal(self) -> None:
    """The jitted per-device evaluation over the fixed evaluated devices."""
    cfg, holdout = self.config, self.setup.holdout
    clients = personal.sample_clients(holdout.num_clients,
                                      cfg.personal_eval_clients, cfg.seed)
    comp = self.sim.components
    if comp.loss_fn is None:
      raise ValueError("holdout_fraction: per-device fine-tuning needs a "
                       "loss_fn (the run's client_update gave none)")
    update = client.sgd(comp.loss_fn, cfg.engine.batch_size,
                        self.setup.model.tx, max(cfg.personal_steps, 1))
    self.personal_fn = jax.jit(personal.make_personal_eval(
        comp.metrics_fn, update, cfg.personal_steps,
        cfg.personal_mix,
        int(np.asarray(holdout.counts)[clients].max()),
        # One device at a time on CPU, where vmapped per-device weights run
        # as slow batched matmuls (experiments/benchmarks/personal_eval.py).
        chunk=1 if jax.default_backend() == "cpu" else 64))
    self.personal_args = self.place((holdout, jax.numpy.asarray(clients)))

  def evaluate_personal(self, state: engine.SimState) -> dict:
    """Per-device accuracies at ``state`` (``personal.summarize``); {}
    without a hold-out."""
    if self.personal_fn is None:
      return {}
    key = keys.fold_in(keys.fold_in(keys.root(self.config.seed),
                                    planning.KEY_PERSONAL),
                       int(state.version))
    scores = self.personal_fn(key, state.params, state.plan.masks,
                              state.plan.client_tier, self.env.data,
                              *self.personal_args)
    return personal.summarize(scores, np.asarray(self.env.fleet.tier))

  @property
  def config(self) -> ExperimentConfig:
    return self.setup.config

  @property
  def info(self) -> dict:
    """Static facts about the run, for summaries and tests."""
    s = self.setup
    return {"data": s.data_info, "plan": self.plan_report,
            "init": s.init_report,
            "full_model_memory_bytes": s.model.full_memory_bytes,
            "fleet_memory_tiers": list(s.fleet_memory_tiers),
            "num_params": optax.tree_utils.tree_size(s.model.params),
            "client_plan": self.client_plan,
            # How the step's K clients fill the clients mesh.
            "client_padding": engine.padding_report(
                self.sim.mesh, self.config.engine.buffer_size)}

  def place(self, tree):
    """``tree`` replicated on the clients mesh (as it is without one).

    Under ``jax.distributed`` every process holds the same host values (the
    same seed builds the same data, model and state), so each contributes
    its local copy of the global, replicated array.
    """
    if self.sim.mesh is None:
      return tree
    replicated = NamedSharding(self.sim.mesh, P())

    def put(x):
      if isinstance(x, jax.core.Tracer):  # traced (eval_shape): no place.
        return x
      if jax.process_count() == 1:
        return jax.device_put(x, replicated)
      return jax.make_array_from_process_local_data(replicated, np.asarray(x))

    return jax.tree.map(put, tree)

  def place_state(self, state: engine.SimState) -> engine.SimState:
    """``state`` placed for the step: replicated on the clients mesh, the
    per-device table split by device (``engine.device_state_sharding``)."""
    state = self.place(state)
    if self.sim.mesh is None or not jax.tree.leaves(state.device_state):
      return state
    sharding = engine.device_state_sharding(
        self.sim.mesh, jax.tree.leaves(state.device_state)[0].shape[0])

    def put(x):
      host = np.asarray(jax.device_get(x))
      return jax.make_array_from_callback(host.shape, sharding,
                                          lambda idx: host[idx])

    return state.replace(device_state=jax.tree.map(put, state.device_state))

  @property
  def num_devices(self) -> int:
    """Devices the clients of a step are split across."""
    return 1 if self.sim.mesh is None else self.sim.mesh.devices.size

  def init_state(self) -> engine.SimState:
    """Round-0 state, starting when the probe round (if any) ended."""
    probe = self.setup.probe
    key = keys.fold_in(keys.root(self.config.seed), planning.KEY_ENGINE)
    key, params, plan, start = self.place((
        key, self.setup.model.params, self.setup.plan,
        engine.Start.of(clock=probe.time_s, bytes_up=probe.bytes_up,
                        bytes_down=probe.bytes_down)))
    return one_shot.jit(self.sim.init)(key, self.env, params, plan, start)

  def evaluate(self, params) -> dict:
    out = self.programs.get("evaluate", self.eval_fn)(params, self.test)
    return {k: float(v) for k, v in jax.device_get(out).items()}

  def compile(self, state: engine.SimState) -> float:
    """Compiles the step program the run uses and the evaluation (JAX's
    persistent cache, when on, supplies what it holds); returns the
    seconds it took."""
    t0 = time.perf_counter()
    if self.config.steps_per_call == 1:
      step = ("step", self.step_fn, (self.env, state))
    else:
      step = ("steps", self.steps_fn, (self.env, state, 1, 1.0))
    self.programs, self.program_status = compilation.compile_all(
        [step, ("evaluate", self.eval_fn, (state.params, self.test))])
    self.step_memory = memory_plan.memory_report(self.programs[step[0]])
    return time.perf_counter() - t0

  def finished(self, state: engine.SimState) -> bool:
    """Whether ``rounds`` is reached (a budget stop is found by stepping)."""
    return int(state.version) >= self.config.rounds

  # The run loop: the stop conditions (rounds, budget, target, no arrivals)
  # are checked in one place and one order, which resume relies on.
  def run(self, state: engine.SimState | None = None,
          history: list[dict] | None = None,
          on_eval: Callable[[engine.SimState, dict], None] | None = None,
          on_step: Callable[[engine.SimState], None] | None = None,
          sync_every: int | None = None,
          ) -> tuple[engine.SimState, list[dict], dict]:
    """Runs server steps until ``rounds`` or the virtual-time budget.

    A step whose last arrival would pass ``max_virtual_time`` is not taken,
    so a run never overshoots its budget. While a target accuracy is set
    and not (or no longer) reached, the model is evaluated after every step
    and the exact crossing step is logged as an extra row
    (``"crossing": true``), so time to target does not depend on
    ``eval_every``. With ``steps_per_call`` != 1 (and no target being
    tracked) the steps up to the next evaluation, re-search or sync point
    run as one jitted call (``Simulator.steps``), bit-identical to single
    steps.

    Args:
      state: state to continue from (a restored checkpoint); fresh if None.
      history: metric rows already logged before ``state`` (on resume).
      on_eval: called with (state, row) after each logged row.
      on_step: called with the state at every sync point (checkpointing).
      sync_every: sync points are rounds that are multiples of this; None:
        every step when ``on_step`` is given.

    Returns:
      (final state, metric rows, timing dict with wall_s, compile_s, steps
      and stopped_by: rounds, max_virtual_time, divergence, fleet_depleted,
      or no_updates: ``no_update_window`` steps in which no update arrived,
      or all ``rounds`` steps without one).
    """
    cfg = self.config
    sync = sync_every or (1 if on_step else cfg.rounds)
    state = self.init_state() if state is None else self.place_state(state)
    log = _Log(self, list(history or []), on_eval)
    compile_s = 0.0 if self.finished(state) else self.compile(state)
    log.start_loop()
    if not log.history:
      log(state)
    stopped_by = "rounds"
    refused = int(state.counters.steps_refused)
    window = no_update_window(cfg)
    while not self.finished(state):
      if _stalled(log.history, window):
        stopped_by = "no_updates"
        break
      tracking = (cfg.target_accuracy is not None and
                  log.history[-1]["test_accuracy"] < cfg.target_accuracy)
      state, over = self._advance(state, log, tracking, sync)
      if over:
        stopped_by = "max_virtual_time"
        break
      if on_step and int(state.version) % sync == 0:
        on_step(state)
      if self._depleted(state):
        stopped_by = "fleet_depleted"
        break
      if cfg.on_divergence == "stop" and self._diverged(state, log, refused):
        stopped_by = "divergence"
        break
    if log.history[-1]["round"] != int(state.version):
      log(state)  # stopped by the budget between evaluations
    if stopped_by == "rounds" and _arrived(log.history[-1]) == 0:
      # Every step ran, every task of them failed: nothing was trained. (A
      # budget that ends a run before its first arrival is a result.)
      stopped_by = "no_updates"
    return state, log.history, {
        "wall_s": time.perf_counter() - log.t_start, "compile_s": compile_s,
        "steps": log.steps, "stopped_by": stopped_by}

  def _advance(self, state: engine.SimState, log: _Log, tracking: bool,
               sync: int) -> tuple[engine.SimState, bool]:
    """One step, or (``steps_per_call`` != 1, not tracking a target) a
    chunk of steps up to the next event; returns the new state and whether
    the budget stopped it."""
    cfg = self.config
    budget = cfg.max_virtual_time
    if cfg.steps_per_call == 1:
      new_state, _ = self.programs.get("step", self.step_fn)(self.env, state)
      if budget is not None and float(new_state.clock) > budget:
        return state, True
      return self._after_step(new_state, log, tracking, 1), False
    r = int(state.version)
    events = [cfg.eval_every, sync, cfg.search.research_every or cfg.rounds]
    n = min([cfg.rounds - r] + [e - r % e for e in events])
    if tracking:
      n = 1
    elif cfg.steps_per_call > 1:
      n = min(n, cfg.steps_per_call)
    state, taken, over = self.programs.get("steps", self.steps_fn)(
        self.env, state, n, float("inf") if budget is None else budget)
    if int(taken):
      state = self._after_step(state, log, tracking, int(taken))
    return state, bool(over)

  def _depleted(self, state: engine.SimState) -> bool:
    """No task is in flight: every live device's battery ran out (only
    with batteries; without, slots never stay empty)."""
    return (self.env.fleet.battery_j is not None and
            not bool(state.in_flight))

  @staticmethod
  def _diverged(state: engine.SimState, log: _Log, refused_before: int
                ) -> bool:
    """A step was refused (non-finite result) or the test loss blew up."""
    return (int(state.counters.steps_refused) > refused_before or
            not math.isfinite(log.history[-1]["test_loss"]))

  def _after_step(self, state: engine.SimState, log: _Log,
                  tracking: bool, taken: int) -> engine.SimState:
    """Re-search and logging after ``taken`` steps (none of them due one
    before the last)."""
    cfg = self.config
    log.steps += taken
    r = int(state.version)
    every = cfg.search.research_every
    if every and r % every == 0 and r < cfg.rounds:
      state = self.research(state)
    regular = r % cfg.eval_every == 0 or r == cfg.rounds
    if tracking:
      evaluation = self.evaluate(state.params)
      hit = evaluation["test_accuracy"] >= cfg.target_accuracy
      if hit or regular:
        log(state, evaluation, crossing=hit, personal=regular)
    elif regular:
      log(state)
    return state

  def research(self, state: engine.SimState) -> engine.SimState:
    """Searches again with importance at the current global model."""
    key = keys.fold_in(keys.root(self.config.seed), planning.KEY_PROBE)
    # The search runs on this process's host copy; its plan is placed
    # like the state.
    plan, self.plan_report, probe = planning.search_plan(
        self.config, self.setup.model, jax.device_get(state.params),
        self.setup.data, self.setup.fleet,
        keys.fold_in(key, int(state.version)), self.setup.proxy)
    return engine.replan(state, self.place(plan), probe.bytes_up,
                         probe.bytes_down)

  def summary(self, state: engine.SimState, history: list[dict],
              timing: dict) -> dict:
    """The end-of-run summary (written to summary.json by the launcher)."""
    out = report.summary(self.config, self.setup, self.env, self.info, state,
                         history, timing)
    out.update(num_devices=self.num_devices,
               client_padding=self.info["client_padding"],
               num_processes=jax.process_count(),
               backend=jax.default_backend(),
               startup_s={**self.setup.phases,
                          "compile_s": timing["compile_s"]},
               compilation_cache=dict(self.program_status))
    if self.client_plan is not None:
      out["client_plan"] = self.client_plan
    if self.step_memory is not None:
      out["step_memory"] = self.step_memory
    return out


class _Log:
  """Metric rows of a run: counters, evaluation, wall time, throughput."""

  def __init__(self, exp: Experiment, history: list[dict], on_eval):
    self.exp, self.history, self.on_eval = exp, history, on_eval
    self.t_start = self.t_loop = time.perf_counter()
    self.steps = 0

  def start_loop(self):
    self.t_loop = time.perf_counter()

  def __call__(self, state, evaluation=None, crossing=False,
               personal=True) -> dict:
    row = report.counters_row(state)
    row.pop("staleness_hist")
    row.update(evaluation or self.exp.evaluate(state.params))
    if personal:
      row.update(self.exp.evaluate_personal(state))
    if crossing:
      row["crossing"] = True
    now = time.perf_counter()
    row["wall_s"] = now - self.t_start
    row["client_updates_per_s"] = (
        self.steps * self.exp.config.engine.buffer_size /
        max(now - self.t_loop, 1e-9))
    self.history.append(row)
    if self.on_eval:
      self.on_eval(state, row)
    return row


def build(config: ExperimentConfig,
          extensions: engine.Extensions | Callable[..., engine.Extensions]
          | None = None) -> Experiment:
  """Loads everything and builds the engine for ``config``.

  Args:
    config: the experiment.
    extensions: the user's algorithm pieces (``extensions.Extensions``), or
      a factory ``extensions(config, model) -> Extensions`` called once the
      model is built (``model``: a ``planning.Model``, with ``apply_fn``,
      ``params`` and the client optimizer ``tx``); every piece not given
      is built from ``config.engine``.

  Raises:
    ValueError: a bad option (named) or extension (named, with the shape it
      must have), before any training is compiled.
  """
  validate(config)
  setup = planning.make_setup(config)
  t0 = time.perf_counter()
  e = config.engine
  env = engine.make_environment(e, setup.data, setup.fleet, setup.plan)
  check_updates_can_arrive(config, env, setup)
  # A plan that no re-search replaces is static: the client update can
  # skip what no mask trains (client.leaf_kinds).
  static = not config.search.research_every
  max_steps = int(np.asarray(env.num_steps).max())
  kinds = client.leaf_kinds(setup.plan.masks) if static else None
  if callable(extensions):
    extensions = extensions(config, setup.model)
    if not isinstance(extensions, engine.Extensions):
      raise ValueError("extensions: the factory must return an Extensions, "
                       f"got {type(extensions).__name__}")
  # client_chunk=0 (auto): the chunk whose step fits the devices' memory.
  e, memory = memory_plan.plan_engine(
      e, setup.model.apply_fn, env, setup.model.params, setup.plan,
      max_steps, setup.model.tx, kinds, config.device_memory_budget,
      donate=config.max_virtual_time is None,
      compiler_options=step_compiler_options(), extensions=extensions,
      task=setup.model.task)
  sim = engine.make_simulator(e, setup.model.apply_fn, max_steps,
                              client_tx=setup.model.tx, kinds=kinds,
                              extensions=extensions, task=setup.model.task)
  extensions_lib.check(sim.components, setup.model.params, setup.plan.masks,
                       env.data, _first_batch(setup.test,
                                              e.eval_batch_size))
  setup.phases["engine_s"] = time.perf_counter() - t0
  return Experiment(setup=setup, env=env, sim=sim,
                    plan_report=setup.plan_report,
                    client_plan=memory and memory.as_dict())


def _first_batch(test: dict, size: int) -> dict:
  """The shapes of one evaluation batch of ``test``."""
  return {k: jax.ShapeDtypeStruct((min(size, v.shape[0]),) + v.shape[1:],
                                  v.dtype) for k, v in dict(test).items()}
