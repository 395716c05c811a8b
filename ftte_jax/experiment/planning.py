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
from ftte_jax.core import fleet as fleet_lib
from ftte_jax.core import keys
from ftte_jax.core import masks as masks_lib
from ftte_jax.core import one_shot
from ftte_jax.core import options
from ftte_jax.core.client import cross_entropy, make_client_optimizer
from ftte_jax.core.typing import PyTree
from ftte_jax.data import client_data as client_data_lib
from ftte_jax.data import datasets
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


@dataclasses.dataclass(frozen=True)
class Setup:
  """Everything a run needs before the engine is built."""

  config: ExperimentConfig
  data: client_data_lib.ClientData
  test: dict  # the held-out set: "x", "y" (and any extras), by example.
  data_info: dict  # from datasets.load_federated (JSON-safe: no arrays).
  model: Model
  fleet: fleet_lib.Fleet
  fleet_memory_tiers: tuple[float, ...]  # bytes, as drawn.
  plan: masks_lib.MaskPlan
  plan_report: dict  # the search's report ({} without a search).
  probe: Probe
  # The server's proxy set (x, y), disjoint from clients and test; None
  # when DataConfig.proxy_examples is 0.
  proxy: tuple[np.ndarray, np.ndarray] | None = None
  # Each client's held-out slice (rows by client, as ``data``); None when
  # DataConfig.holdout_fraction is 0.
  holdout: client_data_lib.ClientData | None = None
  # Where the starting parameters came from (pretrain.initial_params).
  init_report: dict = dataclasses.field(default_factory=dict)
  # Wall seconds of each start-up phase: data (load and partition), model
  # (init and memory analysis), fleet, plan (importance and search).
  phases: dict = dataclasses.field(default_factory=dict)


def load_data(config: ExperimentConfig):
  """Loads and partitions the dataset named by ``config.data``."""
  d = config.data
  opts: dict[str, Any] = {}
  if d.dataset in ("mnist", "fashion_mnist", "cifar10"):
    opts["num_test"] = d.num_test
  if d.dataset == "npz":
    opts["path"] = d.npz_path
  partition = None if d.dataset == "synthetic" else d.partition
  if d.dataset == "synthetic":
    opts.update(alpha=d.synthetic_alpha, beta=d.synthetic_beta,
                samples_per_client=d.synthetic_samples_per_client)
  if partition == "dirichlet":
    opts["alpha"] = d.dirichlet_alpha
  elif partition == "sampled":
    opts.update(alpha=d.dirichlet_alpha,
                examples_per_client=d.examples_per_client)
  elif partition == "shards":
    opts["shards_per_client"] = d.shards_per_client
  elif partition == "quantity":
    opts["sigma"] = d.quantity_sigma
  return datasets.load_federated(d.dataset, d.num_clients, partition,
                                 seed=config.seed, data_dir=d.data_dir,
                                 num_proxy=d.proxy_examples,
                                 split_seed=d.split_seed,
                                 holdout_fraction=d.holdout_fraction, **opts)


def client_optimizer(config: ExperimentConfig) -> optax.GradientTransformation:
  """The engine's client optimizer; the memory model charges its state."""
  return make_client_optimizer(**client_optimizer_options(config))


def client_optimizer_options(config: ExperimentConfig) -> dict:
  """What ``client_optimizer`` is made of (the program cache keys it)."""
  return {"lr": config.engine.client_lr,
          "momentum": config.engine.client_momentum}


def make_model(config: ExperimentConfig, input_shape, num_classes: int,
               key: jax.Array) -> Model:
  """Initializes the model and analyses it once, at the engine's batch size."""
  e = config.engine
  example = np.zeros((1,) + tuple(input_shape), np.float32)
  module = check_model(config, input_shape, num_classes)
  # One jitted init: eager init compiles every initializer op on its own
  # (24 compilations, about 3 s for the MLP on the 2-core CPU).
  params = one_shot.jit(module.init)(key, example)["params"]
  analysis = groups_lib.analyze(module, params,
                                (e.batch_size,) + tuple(input_shape))
  spec = groups_lib.make_groups(analysis, config.search.channel_fractions)
  ones = jax.tree.map(lambda p: np.ones(p.shape, bool), params)
  tx = client_optimizer(config)
  # Full training keeps every weight in RAM under either frozen_weights.
  full = memory_lib.training_memory(analysis, spec, params, ones, e.batch_size,
                                    tx)["total"]
  return Model(module=module, input_shape=tuple(input_shape),
               apply_fn=lambda p, x: module.apply({"params": p}, x),
               params=params, tx=tx, analysis=analysis, spec=spec,
               full_memory_bytes=float(full))


def check_model(config: ExperimentConfig, input_shape, num_classes: int):
  """The model's module, built abstractly on one example of the data.

  Raises:
    ValueError: naming --model/--model_options and the data's shape, when
      the options do not build a model, it cannot take the examples, or
      its output is not one logit per class.
  """
  example = jax.ShapeDtypeStruct((1,) + tuple(input_shape), jnp.float32)
  try:
    module = models_lib.get_model(config.model, num_classes,
                                  **config.model_options)
    out = jax.eval_shape(lambda x: module.init_with_output(
        jax.random.PRNGKey(0), x)[0], example)
  except ValueError as e:
    if str(e).startswith(("model", "model_options")):
      raise
    out = e
  except Exception as e:  # pylint: disable=broad-except
    out = e
  if isinstance(out, Exception) or out.shape != (1, num_classes):
    why = (f"its output has shape {out.shape}" if not isinstance(
        out, Exception) else " ".join(str(out).split())[:200])
    raise ValueError(
        f"model: {config.model!r} with model_options "
        f"{dict(config.model_options)} does not fit the "
        f"{config.data.dataset!r} examples of shape {tuple(input_shape)} "
        f"and {num_classes} classes ({why})")
  return module


def make_fleet(config: ExperimentConfig, full_memory_bytes: float):
  """Draws the fleet; tier fractions are scaled by full training memory."""
  fleet_cfg = config.fleet
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
  """Loads everything a run needs; no engine is compiled yet."""
  clock = _PhaseClock()
  # A misfit checkpoint fails before any loading.
  meta = (pretrain_lib.check_checkpoint(config) if config.init_checkpoint
          else None)
  data, (x_test, y_test), data_info = load_data(config)
  proxy = data_info.pop("proxy", None)
  holdout = data_info.pop("holdout", None)
  test = {"x": jnp.asarray(x_test, jnp.float32),
          "y": jnp.asarray(y_test, jnp.int32)}
  clock.lap("data_s")
  root = keys.root(config.seed)
  model = make_model(config, data_info["input_shape"],
                     data_info["num_classes"],
                     keys.fold_in(root, KEY_PARAMS))
  params, init_report = pretrain_lib.initial_params(
      config, model.apply_fn, model.params, proxy,
      keys.fold_in(root, KEY_PRETRAIN), meta)
  model = dataclasses.replace(model, params=params)
  clock.lap("model_s")
  fleet, tiers = make_fleet(config, model.full_memory_bytes)
  clock.lap("fleet_s")
  if config.engine.mask == "search":
    plan, report, probe = search_plan(config, model, model.params, data,
                                      fleet,
                                      keys.fold_in(root, KEY_PROBE),
                                      proxy)
  else:
    plan, report, probe = rule_plan(config, model, data.num_clients), {}, \
        Probe()
  jax.block_until_ready(plan)
  clock.lap("plan_s")
  return Setup(config=config, data=data, test=test, data_info=data_info,
               model=model, fleet=fleet, fleet_memory_tiers=tiers, plan=plan,
               plan_report=report, probe=probe, proxy=proxy,
               holdout=holdout, init_report=init_report,
               phases=clock.phases)


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
          s.max_upload_fraction * model.analysis.num_params)))
  return plan, report, probe


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
  loss = lambda p, batch: cross_entropy(model.apply_fn, p, batch[0], batch[1])
  if s.importance == "proxy":
    xs, ys = (data.x, data.y) if proxy is None else (
        jnp.asarray(proxy[0], jnp.float32), jnp.asarray(proxy[1], jnp.int32))
    m = xs.shape[0]
    idx = jax.random.choice(key, m, (min(s.probe_examples, m),),
                            replace=False)
    fisher = jax.jit(lambda b: importance_lib.fisher_diagonal(loss, params,
                                                              b))(
        (xs[idx], ys[idx]))
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
  x, y = data.x[take], data.y[take]

  def per_client(xb, yb):
    return importance_lib.fisher_diagonal(loss, params, (xb, yb))

  fishers = jax.jit(lambda xs, ys: jax.lax.map(
      lambda a: per_client(*a), (xs, ys)))(x, y)
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
