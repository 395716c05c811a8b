"""Building a run: data, model, fleet and the mask plan (with its probe round).

``make_setup(config)`` does every host-side step once, in order: load and
partition the data, initialize the model, analyse it (one analysis serves
the memory yardstick, the probe and the search), draw the fleet, and choose
the mask plan (full model, the ``last_n`` rule, or the memory-budgeted
subset search after a probe round). The result is a ``Setup``: named
fields, nothing to patch afterwards.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ftte_jax import models as models_lib
from ftte_jax.core import engine as engine_lib
from ftte_jax.core import fleet as fleet_lib
from ftte_jax.core import keys
from ftte_jax.core import losses
from ftte_jax.core import masks as masks_lib
from ftte_jax.core import one_shot
from ftte_jax.core import options
from ftte_jax.core import profiles
from ftte_jax.core.client import make_client_optimizer
from ftte_jax.core.typing import PyTree
from ftte_jax.data import client_data as client_data_lib
from ftte_jax.data import datasets
from ftte_jax.experiment import config as config_lib
from ftte_jax.experiment import pretrain as pretrain_lib
from ftte_jax.experiment.config import ExperimentConfig, micro_batch_choices
from ftte_jax.search import groups as groups_lib
from ftte_jax.search import importance as importance_lib
from ftte_jax.search import memory as memory_lib
from ftte_jax.search import plan as plan_lib

# Named streams of the run's root key (fold_in(root, name)).
KEY_PARAMS, KEY_ENGINE, KEY_PROBE, KEY_PRETRAIN, KEY_PERSONAL = 0, 1, 2, 3, 4


@dataclasses.dataclass(frozen=True)
class Probe:
  """What a probe round cost: virtual time and traffic (zeros: no round)."""

  time_s: float = 0.0
  bytes_up: float = 0.0
  bytes_down: float = 0.0
  clients: int = 0

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class Model:
  """A model with its parameters and its one static analysis."""

  module: Any  # flax linen module.
  input_shape: tuple[int, ...]  # one example's shape.
  apply_fn: Callable  # apply_fn(params, x) -> logits.
  params: PyTree  # initial parameters.
  tx: optax.GradientTransformation  # the client optimizer, built once.
  analysis: groups_lib.ModelInfo  # layers at the engine's batch size.
  spec: groups_lib.GroupSpec  # parameter groups at the search fractions.
  full_memory_bytes: float  # analytic memory of full-model training.
  # The loss and metrics of the dataset's task (core/losses.py).
  task: losses.Task | None = None


@dataclasses.dataclass(frozen=True)
class Setup:
  """Everything a run needs before the engine is built."""

  config: ExperimentConfig
  data: client_data_lib.ClientData
  # The global test set as a batch: {"x", "y", **extras} with a leading
  # example axis (x float32 images/features or int32 tokens; y int32).
  test: dict
  data_info: datasets.DatasetInfo  # from datasets.load_federated.
  model: Model
  fleet: fleet_lib.Fleet
  fleet_memory_tiers: tuple[float, ...]  # bytes, as drawn.
  plan: masks_lib.MaskPlan
  plan_report: dict  # the search's report ({} without a search).
  probe: Probe
  # The server's proxy set {"x", "y"} (numpy), disjoint from clients and
  # test; None when DataConfig.proxy_examples is 0.
  proxy: dict | None = None
  # Each client's held-out slice (rows by client, as ``data``); None when
  # DataConfig.holdout_fraction is 0.
  holdout: client_data_lib.ClientData | None = None
  # Where the starting parameters came from (pretrain.initial_params).
  init_report: dict = dataclasses.field(default_factory=dict)
  # Wall seconds of each start-up phase: data (load and partition), model
  # (init and memory analysis), fleet, plan (importance and search).
  phases: dict = dataclasses.field(default_factory=dict)


def load_data(config: ExperimentConfig) -> datasets.FederatedData:
  """Loads the dataset named by ``config.data`` and forms its clients."""
  device_class = (device_classes(config) if config.data.partition ==
                  "device_dirichlet" else None)
  return datasets.load_federated(config.data, seed=config.seed,
                                 device_class=device_class)


def device_classes(config: ExperimentConfig) -> np.ndarray:
  """[N] class of each device, as ``make_fleet`` will draw it (the data of
  a device-correlated partition depends on it, so it comes first)."""
  fleet_cfg = config.fleet
  if config.memory_tier_fractions is not None:
    # Only the tier count matters to the draw, not the bytes.
    fleet_cfg = dataclasses.replace(
        fleet_cfg, memory_tiers=tuple(config.memory_tier_fractions))
  return fleet_lib.device_classes(fleet_cfg, config.data.num_clients,
                                  config.seed)


def client_optimizer(config: ExperimentConfig) -> optax.GradientTransformation:
  """The engine's client optimizer; the memory model charges its state."""
  return make_client_optimizer(**client_optimizer_options(config))


def client_optimizer_options(config: ExperimentConfig) -> dict:
  """What ``client_optimizer`` is made of (the program cache keys it)."""
  return {"lr": config.engine.client_lr,
          "momentum": config.engine.client_momentum}


def example_input(info: datasets.DatasetInfo, batch: int = 1
                  ) -> jax.ShapeDtypeStruct:
  """The model's input for ``batch`` examples: shape and dtype (float32
  images and features, int32 tokens)."""
  return jax.ShapeDtypeStruct((batch,) + tuple(info.input_shape),
                              jnp.dtype(info.input_dtype))


def make_model(config: ExperimentConfig, info: datasets.DatasetInfo,
               key: jax.Array) -> Model:
  """Initializes the model and analyses it once, at the engine's batch size."""
  e = config.engine
  example = np.zeros((1,) + tuple(info.input_shape), info.input_dtype)
  module = check_model(config, info)
  # One jitted init: eager init compiles every initializer op on its own
  # (24 compilations, about 3 s for the MLP on the 2-core CPU).
  params = one_shot.jit(module.init)(key, example)["params"]
  analysis = groups_lib.analyze(module, params,
                                example_input(info, e.batch_size))
  spec = groups_lib.make_groups(analysis, config.search.channel_fractions)
  ones = jax.tree.map(lambda p: np.ones(p.shape, bool), params)
  tx = client_optimizer(config)
  # Full training keeps every weight in RAM under either frozen_weights.
  full = memory_lib.training_memory(analysis, spec, params, ones, e.batch_size,
                                    tx)["total"]
  return Model(module=module, input_shape=tuple(info.input_shape),
               apply_fn=lambda p, x: module.apply({"params": p}, x),
               params=params, tx=tx, analysis=analysis, spec=spec,
               full_memory_bytes=float(full),
               task=losses.for_task(info.task,
                                    lambda p, x: module.apply({"params": p},
                                                              x)))


def expected_output(info: datasets.DatasetInfo) -> tuple[int, ...]:
  """The logits' shape for one example: [1, V] (classification) or
  [1, T, V] (sequence, T the input's length)."""
  if info.task == "sequence":
    return (1, info.input_shape[0], info.num_classes)
  return (1, info.num_classes)


def check_model(config: ExperimentConfig, info: datasets.DatasetInfo):
  """The model's module, built abstractly on one example of the data.

  Raises:
    ValueError: naming --model/--model_options and the data's shape, when
      the options do not build a model, it cannot take the examples, or
      its output is not one logit per class (per token for sequences).
  """
  want = expected_output(info)
  try:
    module = models_lib.get_model(config.model, info.num_classes,
                                  **config.model_options)
    out = jax.eval_shape(lambda x: module.init_with_output(
        jax.random.PRNGKey(0), x)[0], example_input(info))
  except ValueError as e:
    if str(e).startswith(("model", "model_options")):
      raise
    out = e
  except Exception as e:  # pylint: disable=broad-except
    out = e
  if isinstance(out, Exception) or out.shape != want:
    why = (f"its output has shape {out.shape}, not {want}" if not isinstance(
        out, Exception) else " ".join(str(out).split())[:200])
    raise ValueError(
        f"model: {config.model!r} with model_options "
        f"{dict(config.model_options)} does not fit the "
        f"{config.data.dataset!r} examples of shape {tuple(info.input_shape)}"
        f" ({info.input_dtype}) and {info.num_classes} classes ({why})")
  return module


def make_fleet(config: ExperimentConfig, full_memory_bytes: float):
  """Draws the fleet; tier fractions are scaled by full training memory.

  A device-class profile gives absolute memory (``fleet_profile``); its
  tiers' memories are then reported as each tier's smallest device.
  """
  fleet_cfg = config.fleet
  if profiles.parse_mix(fleet_cfg.fleet_profile) is not None:
    fleet = fleet_lib.make_fleet(fleet_cfg, config.data.num_clients,
                                 config.seed)
    mem, tier = np.asarray(fleet.memory), np.asarray(fleet.tier)
    return fleet, tuple(float(mem[tier == t].min()) for t in np.unique(tier))
  if config.memory_tier_fractions is not None:
    tiers = tuple(f * full_memory_bytes for f in config.memory_tier_fractions)
    if max(tiers) > options.FLOAT32_MAX:
      raise ValueError(
          f"memory_tier_fractions times full training memory "
          f"({full_memory_bytes:.0f} bytes) gives {max(tiers):g} bytes, "
          "beyond float32's range")
    fleet_cfg = dataclasses.replace(fleet_cfg, memory_tiers=tiers)
  return (fleet_lib.make_fleet(fleet_cfg, config.data.num_clients,
                               config.seed),
          tuple(float(m) for m in fleet_cfg.memory_tiers))


def rule_plan(config: ExperimentConfig, model: Model,
              num_clients: int) -> masks_lib.MaskPlan:
  """The plan of a fixed mask rule (``full`` or ``last_n``), with its costs."""
  e = config.engine
  params = model.params
  if e.mask == "full":
    mask = jax.tree.map(lambda p: np.ones(p.shape, bool), params)
  else:
    mask = jax.tree.map(lambda x: np.asarray(x, bool),
                        masks_lib.last_n_mask(params, e.last_n_tensors))
  flops = memory_lib.training_flops(model.analysis, model.spec, params, mask)
  mem = memory_lib.training_memory(model.analysis, model.spec, params, mask,
                                   e.batch_size, model.tx,
                                   config.frozen_weights)["total"]
  return masks_lib.make_plan(params, [mask], np.zeros(num_clients, np.int32),
                             flops_per_example=[flops], memory_bytes=[mem])


def make_setup(config: ExperimentConfig) -> Setup:
  """Loads everything a run needs; no engine is compiled yet.

  ``config``'s 'auto' options are resolved first (``config.resolve``);
  ``Setup.config`` is the resolved config.
  """
  config = config_lib.resolve(config)
  clock = _PhaseClock()
  # A misfit checkpoint fails before any loading.
  meta = (pretrain_lib.check_checkpoint(config) if config.init_checkpoint
          else None)
  fed = load_data(config)
  test = {k: jnp.asarray(v) for k, v in fed.test.items()}
  clock.lap("data_s")
  root = keys.root(config.seed)
  model = make_model(config, fed.info, keys.fold_in(root, KEY_PARAMS))
  params, init_report = pretrain_lib.initial_params(
      config, model.apply_fn, model.params, fed.proxy,
      keys.fold_in(root, KEY_PRETRAIN), meta)
  model = dataclasses.replace(model, params=params)
  clock.lap("model_s")
  fleet, tiers = make_fleet(config, model.full_memory_bytes)
  clock.lap("fleet_s")
  if config.engine.mask == "search":
    plan, report, probe = search_plan(config, model, model.params, fed.train,
                                      fleet,
                                      keys.fold_in(root, KEY_PROBE),
                                      fed.proxy)
  else:
    plan, report, probe = rule_plan(config, model, fed.train.num_clients), \
        {}, Probe()
  jax.block_until_ready(plan)
  clock.lap("plan_s")
  return Setup(config=config, data=fed.train, test=test,
               data_info=fed.info, model=model, fleet=fleet,
               fleet_memory_tiers=tiers, plan=plan, plan_report=report,
               probe=probe, proxy=fed.proxy, holdout=fed.holdout,
               init_report=init_report, phases=clock.phases)


class _PhaseClock:
  """Wall seconds between laps, by name."""

  def __init__(self):
    self.phases, self.t = {}, time.perf_counter()

  def lap(self, name: str) -> None:
    now = time.perf_counter()
    self.phases[name], self.t = now - self.t, now


def search_plan(config: ExperimentConfig, model: Model, params: PyTree,
                data: client_data_lib.ClientData, fleet: fleet_lib.Fleet,
                key: jax.Array, proxy=None
                ) -> tuple[masks_lib.MaskPlan, dict, Probe]:
  """Importance at ``params``, then the memory-budgeted search."""
  e, s = config.engine, config.search
  fisher, probe = importance(config, model, params, data, fleet, key, proxy)
  plan, report = plan_lib.build_plan(
      model.analysis, model.spec, params, fisher, np.asarray(fleet.memory),
      model.tx,
      tier_of_client=np.asarray(fleet.tier) if s.policy == "per_tier"
      else None, policy=s.policy, batch_size=e.batch_size, method=s.method,
      num_cells=s.num_cells, frozen_weights=config.frozen_weights,
      micro_batches=micro_batch_choices(config),
      max_trained_params=(None if s.max_upload_fraction >= 1 else int(
          s.max_upload_fraction * model.analysis.num_params)),
      **task_time_inputs(config, data, fleet))
  return plan, report, probe


def task_time_inputs(config: ExperimentConfig,
                     data: client_data_lib.ClientData,
                     fleet: fleet_lib.Fleet) -> dict:
  """``build_plan``'s objective and what a task's time is made of.

  Every device's seconds per FLOP (``1/speed``) and per byte moved each
  way (``1/bw_up + 1/bw_down``), and the examples a task trains on (mean
  local steps times the batch), as the engine's nominal task time counts
  them (``engine.nominal_duration``).
  """
  f = jax.device_get(fleet)
  steps = engine_lib.num_local_steps(config.engine, np.asarray(data.counts))
  return {
      "objective": config.search.objective,
      "device_seconds": (
          1.0 / np.asarray(f.speed, np.float64),
          1.0 / np.asarray(f.bw_up, np.float64) +
          1.0 / np.asarray(f.bw_down, np.float64)),
      "examples_per_task": float(np.mean(steps)) * config.engine.batch_size}


def importance(config: ExperimentConfig, model: Model, params: PyTree,
               data: client_data_lib.ClientData, fleet: fleet_lib.Fleet,
               key: jax.Array, proxy=None) -> tuple[PyTree, Probe]:
  """Diagonal Fisher at ``params``, from a probe round or proxy data.

  Proxy data is the server's proxy set when the run has one (disjoint from
  the clients'), else ``probe_examples`` drawn from the clients' pool (a
  stand-in for public data of the same distribution).

  The probe round is synchronous: the chosen devices download the model,
  compute per-example squared gradients on ``probe_examples`` of their own
  examples, and upload one score per parameter group; the round lasts as
  long as its slowest device. Only devices that can hold full-model
  training take part (a Fisher probe needs every gradient).
  """
  s = config.search
  loss = lambda p, batch: model.task.loss(p, batch)[0]
  if s.importance == "proxy":
    pool = (client_data_lib.as_batch(data) if proxy is None else
            {k: jnp.asarray(v) for k, v in proxy.items()})
    m = pool["y"].shape[0]
    idx = jax.random.choice(key, m, (min(s.probe_examples, m),),
                            replace=False)
    fisher = jax.jit(lambda b: importance_lib.fisher_diagonal(loss, params,
                                                              b))(
        {k: v[idx] for k, v in pool.items()})
    return fisher, Probe()
  full_mem = model.full_memory_bytes
  capable = np.flatnonzero(np.asarray(fleet.memory) >= full_mem)
  if capable.size == 0:
    raise ValueError(
        "importance='clients' needs devices that can train the full model "
        f"for the probe round ({full_mem:.0f} bytes), and none can; use "
        "importance='proxy' or larger memory tiers")
  k = min(s.probe_clients, capable.size)
  chosen = np.asarray(jax.random.choice(key, capable, (k,), replace=False))
  counts = np.asarray(data.counts)[chosen]
  take = (np.asarray(data.offsets)[chosen][:, None] +
          np.arange(s.probe_examples)[None, :] % counts[:, None])
  rows = {name: v[take] for name, v in
          client_data_lib.as_batch(data).items()}

  def per_client(batch):
    return importance_lib.fisher_diagonal(loss, params, batch)

  fishers = jax.jit(lambda b: jax.lax.map(per_client, b))(rows)
  weights = jnp.asarray(counts, jnp.float32) / float(counts.sum())
  fisher = jax.tree.map(lambda f: jnp.tensordot(weights, f, axes=1), fishers)
  model_bytes = 4.0 * optax.tree_utils.tree_size(params)
  score_bytes = 4.0 * model.spec.num_groups
  full_flops = memory_lib.training_flops(
      model.analysis, model.spec, params,
      jax.tree.map(lambda p: np.ones(p.shape, bool), params))
  f = jax.device_get(fleet)
  t = (model_bytes / f.bw_down[chosen] +
       s.probe_examples * full_flops / f.speed[chosen] +
       score_bytes / f.bw_up[chosen])
  return fisher, Probe(time_s=float(t.max()), bytes_up=score_bytes * k,
                       bytes_down=model_bytes * k, clients=int(k))
