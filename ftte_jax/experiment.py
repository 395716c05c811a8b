"""One federated experiment from one explicit config: build, run, summarize.

``ExperimentConfig`` names every option (the launcher maps absl flags onto
it one to one; the library never reads flags). ``build(config)`` loads the
data, the model and the fleet, chooses the mask plan (full model, the
``last_n`` rule, or the memory-budgeted subset search after a client probe
round), and returns an ``Experiment`` whose ``run`` drives the jitted server
step with evaluations every ``eval_every`` steps. Evaluation rounds are
absolute (``round % eval_every == 0``), so a run resumed from a checkpoint
logs exactly the rows an uninterrupted run would.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ftte_jax import algorithms, datasets, engine, fleet as fleet_lib
from ftte_jax import groups as groups_lib
from ftte_jax import importance as importance_lib
from ftte_jax import masks as masks_lib
from ftte_jax import memory as memory_lib
from ftte_jax import models as models_lib
from ftte_jax import search as search_lib
from ftte_jax.client import cross_entropy

PyTree = Any
IMPORTANCE_SOURCES = ("clients", "proxy")

# Named streams of the run's root key (fold_in(root, name)).
_KEY_PARAMS, _KEY_ENGINE, _KEY_PROBE = 0, 1, 2


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """Dataset and partition (see ``datasets.load_federated``)."""

  dataset: str = "mnist"
  data_dir: str | None = None
  num_clients: int = 100
  partition: str = "dirichlet"
  dirichlet_alpha: float = 0.5
  shards_per_client: int = 2
  quantity_sigma: float = 1.0
  num_test: int = 2000
  synthetic_alpha: float = 1.0  # FedProx Synthetic(alpha, beta) only.
  synthetic_beta: float = 1.0


@dataclasses.dataclass(frozen=True)
class SearchConfig:
  """Subset search options (used when the engine's mask is ``search``).

  Attributes:
    method: exact (DP knapsack) | greedy.
    policy: min (one mask under the weakest device, the paper) | per_tier.
    channel_fractions: output-channel fractions a tensor may be trained at.
    importance: clients (Fisher from a probe round on devices that can
      train the full model, its time and bytes counted) | proxy (Fisher on
      ``probe_examples`` pool examples at the server, standing in for public
      data; no device time).
    probe_clients: devices in the probe round.
    probe_examples: examples per probe device (or proxy examples in total).
    num_cells: DP resolution cells.
    research_every: every this many server steps, search again with
      importance measured at the current global model (0: never). The new
      masks apply to tasks trained from then on; the re-search probe's bytes
      are counted, its time is not (capable devices probe alongside
      training). The plan lives in the checkpointed state, so a resumed run
      replays it.
  """

  method: str = "exact"
  policy: str = "min"
  channel_fractions: Sequence[float] = groups_lib.PAPER_FRACTIONS
  importance: str = "clients"
  probe_clients: int = 10
  probe_examples: int = 32
  num_cells: int = 1024
  research_every: int = 0


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
  """Everything one run needs; written to ``config.json`` by the launcher.

  Attributes:
    engine: algorithm preset plus overrides (``algorithms.preset``).
    fleet: device profiles; ``memory_tiers`` in bytes unless
      ``memory_tier_fractions`` is set; its ``num_clients`` is taken from
      ``data.num_clients``.
    memory_tier_fractions: device memory tiers as fractions of the model's
      full training memory (analytic, at the engine's batch size), so one
      fleet description fits any model. Overrides ``fleet.memory_tiers``.
    model: name in ``models.MODELS``; model_options its keyword arguments.
    rounds: server steps to run.
    max_virtual_time: stop once the virtual clock passes this (seconds).
    eval_every: evaluate every this many server steps.
    target_accuracy: accuracy whose first crossing defines time-to-target.
    seed: the one root seed (data split, partition, fleet, init, engine).
  """

  engine: algorithms.EngineConfig = algorithms.EngineConfig()
  data: DataConfig = DataConfig()
  fleet: fleet_lib.FleetConfig = fleet_lib.FleetConfig()
  search: SearchConfig = SearchConfig()
  memory_tier_fractions: Sequence[float] | None = (0.2, 1.1, 2.0)
  model: str = "lenet5"
  model_options: dict = dataclasses.field(default_factory=dict)
  rounds: int = 100
  max_virtual_time: float | None = None
  eval_every: int = 10
  target_accuracy: float | None = None
  seed: int = 0

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)


def from_dict(d: dict) -> ExperimentConfig:
  """Inverse of ``ExperimentConfig.to_dict`` (e.g. read from config.json)."""
  d = dict(d)
  sub = {"engine": algorithms.EngineConfig, "data": DataConfig,
         "fleet": fleet_lib.FleetConfig, "search": SearchConfig}
  for name, cls in sub.items():
    if name in d:
      v = dict(d[name])
      for k, x in v.items():
        if isinstance(x, list):
          v[k] = tuple(x)
      d[name] = cls(**v)
  for k in ("memory_tier_fractions",):
    if isinstance(d.get(k), list):
      d[k] = tuple(d[k])
  return ExperimentConfig(**d)


def validate(config: ExperimentConfig) -> None:
  """Checks every option that can be checked without loading anything."""
  algorithms.validate(config.engine, config.data.num_clients)
  if config.memory_tier_fractions is not None:
    fr = list(config.memory_tier_fractions)
    if not fr or any(not f > 0 for f in fr) or fr != sorted(fr):
      raise ValueError("memory_tier_fractions must be positive and ascending, "
                       f"got {fr}")
    if config.fleet.tier_probs and len(config.fleet.tier_probs) != len(fr):
      raise ValueError(f"tier_probs needs one entry per memory tier "
                       f"({len(fr)}), got {list(config.fleet.tier_probs)}")
  fleet_cfg = dataclasses.replace(config.fleet,
                                  num_clients=config.data.num_clients)
  if config.memory_tier_fractions is not None:
    fleet_cfg = dataclasses.replace(
        fleet_cfg, memory_tiers=tuple(config.memory_tier_fractions))
  fleet_lib.validate(fleet_cfg)
  if config.model not in models_lib.MODELS:
    raise ValueError(f"model must be one of {list(models_lib.MODELS)}, got "
                     f"{config.model!r}")
  if config.data.dataset not in datasets.DATASETS:
    raise ValueError(f"dataset must be one of {list(datasets.DATASETS)}, got "
                     f"{config.data.dataset!r}")
  for name in ("rounds", "eval_every"):
    v = getattr(config, name)
    if not (isinstance(v, int) and v >= 1):
      raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
  if config.max_virtual_time is not None and not config.max_virtual_time > 0:
    raise ValueError(f"max_virtual_time must be > 0, got "
                     f"{config.max_virtual_time}")
  if config.target_accuracy is not None and not (
      0.0 < config.target_accuracy <= 1.0):
    raise ValueError(f"target_accuracy must be in (0, 1], got "
                     f"{config.target_accuracy}")
  s = config.search
  if s.method not in search_lib.METHODS:
    raise ValueError(f"search_method must be one of {search_lib.METHODS}, "
                     f"got {s.method!r}")
  if s.policy not in search_lib.POLICIES:
    raise ValueError(f"search_policy must be one of {search_lib.POLICIES}, "
                     f"got {s.policy!r}")
  if s.importance not in IMPORTANCE_SOURCES:
    raise ValueError(f"importance must be one of {IMPORTANCE_SOURCES}, got "
                     f"{s.importance!r}")
  if s.research_every < 0:
    raise ValueError(f"research_every must be >= 0, got {s.research_every}")
  if s.research_every and config.engine.mask != "search":
    raise ValueError("research_every needs mask='search', got mask="
                     f"{config.engine.mask!r}")
  for name in ("probe_clients", "probe_examples", "num_cells"):
    if getattr(s, name) < 1:
      raise ValueError(f"{name} must be >= 1, got {getattr(s, name)}")


def params_sha256(params: PyTree) -> str:
  """SHA-256 of the parameters' bytes in flattening order (for repro checks)."""
  h = hashlib.sha256()
  for leaf in jax.tree.leaves(jax.device_get(params)):
    a = np.ascontiguousarray(leaf)
    h.update(str(a.dtype).encode() + str(a.shape).encode())
    h.update(a.tobytes())
  return h.hexdigest()


@dataclasses.dataclass
class Experiment:
  """A built experiment: static pieces plus jitted functions."""

  config: ExperimentConfig
  model: Any
  apply_fn: Callable
  init_params: PyTree
  env: engine.Environment
  sim: engine.Simulator
  test: tuple[jnp.ndarray, jnp.ndarray]
  info: dict  # dataset info, plan report, memory figures.
  probe: dict  # probe-round time and bytes (zeros without one).
  step_fn: Callable = None
  eval_fn: Callable = None

  def __post_init__(self):
    self.step_fn = jax.jit(self.sim.step, donate_argnums=1)
    self.eval_fn = jax.jit(self.sim.evaluate)

  def init_state(self) -> engine.SimState:
    """Round-0 state; the probe round (if any) has already taken its time."""
    root = jax.random.PRNGKey(self.config.seed)
    state = jax.jit(self.sim.init)(jax.random.fold_in(root, _KEY_ENGINE),
                                   self.env, self.init_params)
    t = jnp.asarray(self.probe["time_s"], jnp.float32)
    cnt = state.counters
    return state.replace(
        clock=state.clock + t, task_arrival=state.task_arrival + t,
        counters=cnt.replace(bytes_up=cnt.bytes_up + self.probe["bytes_up"],
                             bytes_down=cnt.bytes_down +
                             self.probe["bytes_down"]))

  def evaluate(self, params) -> dict:
    out = self.eval_fn(params, *self.test)
    return {k: float(v) for k, v in jax.device_get(out).items()}

  def run(self, state: engine.SimState | None = None,
          history: list[dict] | None = None,
          on_eval: Callable[[engine.SimState, dict], None] | None = None,
          on_step: Callable[[engine.SimState], None] | None = None,
          ) -> tuple[engine.SimState, list[dict], dict]:
    """Runs server steps until ``rounds`` or ``max_virtual_time``.

    Args:
      state: state to continue from (a restored checkpoint); fresh if None.
      history: metric rows already logged before ``state`` (on resume).
      on_eval: called with (state, row) after each evaluation (logging).
      on_step: called with the state after every step (checkpointing).

    Returns:
      (final state, metric rows, timing dict with wall_s and compile_s).
    """
    cfg = self.config
    state = self.init_state() if state is None else state
    history = list(history or [])
    t_start = time.perf_counter()
    compile_s = 0.0
    if int(state.version) < cfg.rounds:
      t0 = time.perf_counter()
      self.step_fn.lower(self.env, state).compile()
      self.eval_fn.lower(state.params, *self.test).compile()
      compile_s = time.perf_counter() - t0
    steps_done = 0
    t_loop = time.perf_counter()

    def log(state):
      row = engine.summary_counters(state)
      row.pop("staleness_hist")
      row.update(self.evaluate(state.params))
      wall = time.perf_counter() - t_loop
      row["wall_s"] = time.perf_counter() - t_start
      row["client_updates_per_s"] = (steps_done * cfg.engine.buffer_size /
                                     max(wall, 1e-9))
      history.append(row)
      if on_eval:
        on_eval(state, row)

    if not history:
      log(state)
    while int(state.version) < cfg.rounds and not (
        cfg.max_virtual_time is not None and
        float(state.clock) >= cfg.max_virtual_time):
      state, _ = self.step_fn(self.env, state)
      steps_done += 1
      r = int(state.version)
      every = cfg.search.research_every
      if every and r % every == 0 and r < cfg.rounds:
        state = self.research(state)
      if r % cfg.eval_every == 0 or r == cfg.rounds:
        log(state)
      if on_step:
        on_step(state)
    if history[-1]["round"] != int(state.version):
      log(state)  # stopped by max_virtual_time between evaluations
    return state, history, {"wall_s": time.perf_counter() - t_start,
                            "compile_s": compile_s, "steps": steps_done}

  def research(self, state: engine.SimState) -> engine.SimState:
    """Searches again with importance at the current global model."""
    key = jax.random.fold_in(jax.random.PRNGKey(self.config.seed),
                             _KEY_PROBE)
    plan, report, probe = _search_plan(
        self.config, self.model, self.apply_fn, state.params, self.env.data,
        self.env.fleet, self.info["full_model_memory_bytes"],
        jax.random.fold_in(key, int(state.version)),
        self.info["data"]["input_shape"])
    self.info["plan"] = report
    cnt = state.counters
    return state.replace(plan=plan, counters=cnt.replace(
        bytes_up=cnt.bytes_up + probe["bytes_up"],
        bytes_down=cnt.bytes_down + probe["bytes_down"]))

  def summary(self, state: engine.SimState, history: list[dict],
              timing: dict) -> dict:
    """The end-of-run summary (written to summary.json by the launcher)."""
    cfg = self.config
    target = cfg.target_accuracy
    reached = [r for r in history
               if target is not None and r["test_accuracy"] >= target]
    counters = engine.summary_counters(state)
    plan = state.plan
    tier_mem = np.asarray(plan.memory_bytes, np.float64)
    used = np.unique(np.asarray(plan.client_tier)[np.asarray(
        self.env.eligible)])
    applied = counters["updates_applied"]
    return {
        "algorithm": cfg.engine.algorithm,
        "final_accuracy": history[-1]["test_accuracy"],
        "final_loss": history[-1]["test_loss"],
        "best_accuracy": max(r["test_accuracy"] for r in history),
        "target_accuracy": target,
        "time_to_target_s": reached[0]["virtual_time_s"] if reached else None,
        "rounds_to_target": reached[0]["round"] if reached else None,
        "rounds": counters["round"],
        "virtual_time_s": counters["virtual_time_s"],
        "client_updates": applied,
        "client_updates_per_s": (timing["steps"] * cfg.engine.buffer_size /
                                 max(timing["wall_s"] - timing["compile_s"],
                                     1e-9)),
        "wall_s": timing["wall_s"],
        "compile_s": timing["compile_s"],
        "peak_device_memory_bytes": float(np.nanmax(tier_mem[used])),
        "tier_memory_bytes": [float(m) for m in tier_mem],
        "full_model_memory_bytes": self.info["full_model_memory_bytes"],
        "upload_bytes_per_update": counters["upload_bytes_per_update"],
        "download_bytes_per_update": counters["download_bytes_per_update"],
        "bytes_up": counters["bytes_up"],
        "bytes_down": counters["bytes_down"],
        "mean_staleness": counters["mean_staleness"],
        "staleness_hist": counters["staleness_hist"],
        "updates_dropped": counters["updates_dropped"],
        "updates_stale": counters["updates_stale"],
        "updates_nonfinite": counters["updates_nonfinite"],
        "eligible_clients": int(np.asarray(self.env.eligible).sum()),
        "probe": self.probe,
        "params_sha256": params_sha256(state.params),
    }


def _load_data(config: ExperimentConfig):
  d = config.data
  opts: dict[str, Any] = {}
  if d.dataset in ("mnist", "fashion_mnist", "cifar10"):
    opts["num_test"] = d.num_test
  partition = None if d.dataset == "synthetic" else d.partition
  if d.dataset == "synthetic":
    opts.update(alpha=d.synthetic_alpha, beta=d.synthetic_beta)
  if partition == "dirichlet":
    opts["alpha"] = d.dirichlet_alpha
  elif partition == "shards":
    opts["shards_per_client"] = d.shards_per_client
  elif partition == "quantity":
    opts["sigma"] = d.quantity_sigma
  return datasets.load_federated(d.dataset, d.num_clients, partition,
                                 seed=config.seed, data_dir=d.data_dir, **opts)


def _client_optimizer(e: algorithms.EngineConfig) -> str:
  return "momentum" if e.client_momentum > 0 else "sgd"


def build(config: ExperimentConfig) -> Experiment:
  """Loads everything and builds the engine for ``config``.

  Raises:
    ValueError: a bad option (named), before any training is compiled.
  """
  validate(config)
  e = config.engine
  data, (x_test, y_test), data_info = _load_data(config)
  n = data.num_clients
  model = models_lib.get_model(config.model, data_info["num_classes"],
                               **config.model_options)
  root = jax.random.PRNGKey(config.seed)
  example = jnp.zeros((1,) + tuple(data_info["input_shape"]), jnp.float32)
  params = model.init(jax.random.fold_in(root, _KEY_PARAMS), example)["params"]
  apply_fn = lambda p, x: model.apply({"params": p}, x)

  # Analytic memory and FLOPs of full-model training, the yardstick for
  # tier fractions, the memory policy and FedAvg's peak memory.
  analysis = groups_lib.analyze(model, params, (e.batch_size,) +
                                tuple(data_info["input_shape"]))
  spec = groups_lib.make_groups(analysis, config.search.channel_fractions)
  opt = _client_optimizer(e)
  ones = jax.tree.map(lambda p: np.ones(p.shape, bool), params)
  full_mem = memory_lib.training_memory(analysis, spec, params, ones,
                                        e.batch_size, opt)["total"]
  fleet_cfg = dataclasses.replace(config.fleet, num_clients=n)
  if config.memory_tier_fractions is not None:
    fleet_cfg = dataclasses.replace(fleet_cfg, memory_tiers=tuple(
        f * full_mem for f in config.memory_tier_fractions))
  fleet = fleet_lib.make_fleet(fleet_cfg, config.seed)

  def costs(mask):
    return (memory_lib.training_flops(analysis, spec, params, mask),
            memory_lib.training_memory(analysis, spec, params, mask,
                                       e.batch_size, opt)["total"])

  probe = {"time_s": 0.0, "bytes_up": 0.0, "bytes_down": 0.0, "clients": 0}
  report: dict[str, Any] = {}
  if e.mask == "full":
    f, m = costs(ones)
    plan = masks_lib.full_plan(params, n, flops_per_example=[f],
                               memory_bytes=[m])
  elif e.mask == "last_n":
    mask = jax.tree.map(lambda x: np.asarray(x, bool),
                        masks_lib.last_n_mask(params, e.last_n_tensors))
    f, m = costs(mask)
    plan = masks_lib.make_plan(params, [mask], np.zeros(n, np.int32),
                               flops_per_example=[f], memory_bytes=[m])
  else:
    plan, report, probe = _search_plan(
        config, model, apply_fn, params, data, fleet, full_mem,
        jax.random.fold_in(root, _KEY_PROBE), data_info["input_shape"])
  env = engine.make_environment(e, data, fleet, plan)
  sim = engine.make_simulator(e, apply_fn, int(np.asarray(env.num_steps).max()))
  info = {"data": data_info, "plan": report,
          "full_model_memory_bytes": float(full_mem),
          "fleet_memory_tiers": [float(m) for m in fleet_cfg.memory_tiers],
          "num_params": masks_lib.param_count(params)}
  return Experiment(config=config, model=model, apply_fn=apply_fn,
                    init_params=params, env=env, sim=sim,
                    test=(jnp.asarray(x_test, jnp.float32),
                          jnp.asarray(y_test, jnp.int32)),
                    info=info, probe=probe)


def _search_plan(config, model, apply_fn, params, data, fleet, full_mem, key,
                 input_shape):
  """Importance at ``params``, then the memory-budgeted search: a MaskPlan."""
  e, s = config.engine, config.search
  fisher, probe = _importance(config, model, apply_fn, params, data, fleet,
                              full_mem, key)
  plan, report = search_lib.build_plan(
      model, params, (e.batch_size,) + tuple(input_shape), fisher,
      np.asarray(fleet.memory),
      tier_of_client=np.asarray(fleet.tier) if s.policy == "per_tier"
      else None, policy=s.policy, batch_size=e.batch_size,
      optimizer=_client_optimizer(e), method=s.method,
      channel_fractions=s.channel_fractions, num_cells=s.num_cells)
  return plan, report, probe


def _importance(config, model, apply_fn, params, data, fleet, full_mem, key):
  """Diagonal Fisher at ``params``, from a probe round or proxy data.

  The probe round is synchronous: the chosen devices download the model,
  compute per-example squared gradients on ``probe_examples`` of their own
  examples, and upload one score per parameter group; the round lasts as
  long as its slowest device. Only devices that can hold full-model
  training take part (a Fisher probe needs every gradient).
  """
  s = config.search
  loss = lambda p, batch: cross_entropy(apply_fn, p, batch[0], batch[1])
  probe = {"time_s": 0.0, "bytes_up": 0.0, "bytes_down": 0.0, "clients": 0}
  if s.importance == "proxy":
    m = data.x.shape[0]
    idx = jax.random.choice(key, m, (min(s.probe_examples, m),),
                            replace=False)
    fisher = jax.jit(lambda b: importance_lib.fisher_diagonal(loss, params,
                                                              b))(
        (data.x[idx], data.y[idx]))
    return fisher, probe
  capable = np.flatnonzero(np.asarray(fleet.memory) >= full_mem)
  if capable.size == 0:
    raise ValueError(
        "importance='clients' needs devices that can train the full model "
        f"for the probe round ({full_mem:.0f} bytes), and none can; use "
        "importance='proxy' or larger memory tiers")
  k = min(s.probe_clients, capable.size)
  chosen = np.asarray(jax.random.choice(key, capable, (k,), replace=False))
  counts = np.asarray(data.counts)[chosen]
  rows = np.asarray(data.indices)[chosen]
  take = np.stack([rows[i, np.arange(s.probe_examples) % counts[i]]
                   for i in range(k)])
  x, y = data.x[take], data.y[take]

  def per_client(xb, yb):
    return importance_lib.fisher_diagonal(loss, params, (xb, yb))

  fishers = jax.jit(lambda xs, ys: jax.lax.map(
      lambda a: per_client(*a), (xs, ys)))(x, y)
  weights = jnp.asarray(counts, jnp.float32) / float(counts.sum())
  fisher = jax.tree.map(lambda f: jnp.tensordot(weights, f, axes=1), fishers)
  analysis = groups_lib.analyze(model, params, (1,) + tuple(data.x.shape[1:]))
  spec = groups_lib.make_groups(analysis, s.channel_fractions)
  model_bytes = 4.0 * masks_lib.param_count(params)
  score_bytes = 4.0 * spec.num_groups
  full_flops = memory_lib.training_flops(
      analysis, spec, params,
      jax.tree.map(lambda p: np.ones(p.shape, bool), params))
  f = jax.device_get(fleet)
  t = (model_bytes / f.bw_down[chosen] +
       s.probe_examples * full_flops / f.speed[chosen] +
       score_bytes / f.bw_up[chosen])
  probe = {"time_s": float(t.max()), "bytes_up": score_bytes * k,
           "bytes_down": model_bytes * k, "clients": int(k)}
  return fisher, probe
