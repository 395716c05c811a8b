"""Engine configuration, and the four algorithms as compositions.

FedAvg, FedBuff, FedAsync and FTTE are not separate code paths. Each is

* an ``EngineConfig`` preset for the one event-driven engine
  (``preset(name, **overrides)``): how tasks are refilled, what a client
  trains (its mask), what it sends back (``update_rule``); and
* a server aggregation composed of small transforms
  (``ftte_jax.core.transforms``), written out below as ``fedavg``,
  ``fedbuff``, ``fedasync`` and ``ftte``, the way optax's ``alias.py``
  composes its optimizers. ``aggregator_from_config`` composes the same
  transforms from a config's options (the command line's path), and
  ``server_optimizer`` builds the optax transformation that applies the
  aggregate.

``pinned`` says which options a preset fixes (one rule for ``preset`` and
for launchers that run several presets); ``validate`` checks a config before
anything is compiled.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping

import optax

from ftte_jax.core import aggregation
from ftte_jax.core import options
from ftte_jax.core import robust
from ftte_jax.core import staleness as staleness_lib
from ftte_jax.core import transforms as tx
from ftte_jax.core.options import option

PRESETS = ("fedavg", "fedbuff", "fedasync", "ftte")
SERVER_OPTIMIZERS = ("sgd", "momentum", "adam")
MASK_POLICIES = ("full", "last_n", "search")
MEMORY_POLICIES = ("exclude", "ignore")
CLIENT_BATCHING = ("vmap", "map", "stream", "auto")
COMPUTE_DTYPES = ("float32", "bfloat16")
UPDATE_RULES = ("delta", "mixing")
REFILLS = ("arrival", "step")
FIRST_DOWNLOADS = ("whole", "deployed")


@dataclasses.dataclass(frozen=True)
class EngineConfig:
  """Every engine option; hyperparameters are static, never traced.

  Each field's meaning and valid values are declared with it
  (``options.option``); ``validate`` adds the checks that span fields.
  """

  algorithm: str = option(
      "ftte", choices=PRESETS,
      help="algorithm preset (algorithms.preset) whose values the engine "
      "options not given take")
  concurrency: int = option(100, low=1,
                            help="C, client tasks in flight at once")
  buffer_size: int = option(10, low=1,
                            help="K, updates per server step (K <= C)")
  ring_size: int = option(
      16, low=1,
      help="S, global versions kept; older updates are dropped as stale. "
      "The presets set it to max(16, 4 * ceil(C / K)) unless given: the "
      "typical staleness is about C / K (FedAsync with C = 100, K = 1 lost "
      "98% of its updates to a fixed S = 16)")
  local_steps: int = option(
      5, low=1,
      help="local SGD steps per task (the maximum when local_epochs is set)")
  local_epochs: float | None = option(
      None, low=0, low_inclusive=False,
      help="if set, client i takes ceil(local_epochs * n_i / batch_size) "
      "steps (the loop length becomes the largest client's count)")
  batch_size: int = option(32, low=1, help="local batch size")
  client_lr: float = option(0.05, low=0, low_inclusive=False,
                            help="client SGD learning rate")
  client_momentum: float = option(
      0.0, low=0, high=1, high_inclusive=False,
      help="client SGD momentum (0 = plain SGD)")
  server_optimizer: str = option(
      "sgd", choices=SERVER_OPTIMIZERS,
      help="optimizer applied to the aggregate at the server")
  server_lr: float = option(
      1.0, low=0, low_inclusive=False,
      help="server learning rate (FedAsync's mixing rate alpha)")
  server_momentum: float = option(
      0.9, low=0, high=1, high_inclusive=False,
      help="momentum of the 'momentum' server optimizer")
  staleness: str = option(
      "polynomial", choices=staleness_lib.STALENESS_FUNCTIONS,
      help="age weight of an update (staleness.make_staleness_fn)")
  staleness_a: float = option(0.5, low=0,
                              help="decay rate of the age weight")
  staleness_b: float = option(4.0, low=0,
                              help="hinge threshold of the age weight")
  variance_beta: float = option(
      1.0, low=0,
      help="FTTE variance weight 1/(1+beta*d), scaled to mean 1 over the "
      "valid updates of a step; 0 switches it off")
  data_weight_exponent: float = option(
      1.0, low=0, help="gamma in the n_i^gamma data-size weight")
  normalization: str = option(
      "coordinate", choices=aggregation.NORMALIZATIONS,
      help="coordinate (FedAvg; the first FTTE reconstruction), damped (FTTE "
      "preset: coordinate-wise over data weights, so age shrinks the step) or "
      "buffer (FedBuff/FedAsync); see aggregation.aggregate")
  mask: str = option(
      "last_n", choices=MASK_POLICIES,
      help="which parameters a client trains: full model, the last_n rule "
      "(FTTE before the search) or the memory-budgeted subset search")
  last_n_tensors: int = option(
      2, low=1, help="tensors trained by the last_n mask rule")
  memory_policy: str = option(
      "exclude", choices=MEMORY_POLICIES,
      help="exclude devices that cannot hold their mask's training memory, "
      "or ignore memory")
  deadline_s: float | None = option(
      None, low=0, low_inclusive=False,
      help="task deadline in virtual seconds; a task not back by then is "
      "dropped and its slot freed. None: deadline_factor times the slowest "
      "eligible device's nominal task time")
  deadline_factor: float = option(3.0, low=0, low_inclusive=False,
                                  help="see deadline_s")
  client_batching: str = option(
      "auto", choices=CLIENT_BATCHING,
      help="how the K clients of a step are trained: vmap (all at once), "
      "map (one after another inside the jit), stream (one after another, "
      "keeping only the running weighted sum; needs variance_beta=0), or "
      "auto (stream, or map with a variance weight, on CPU; vmap on "
      "accelerators; measured in experiments/benchmarks/throughput.py)")
  client_chunk: int = option(
      1, low=0,
      help="map and stream batching: clients trained together (vmapped) "
      "per loop iteration; 1 trains them one at a time. 0 (auto, resolved "
      "by experiment.build): the widest chunk whose step fits the device's "
      "memory (device_memory_budget), keeping vmap where all K fit; on the "
      "CPU, 1 (experiment/memory_plan.py)")
  mesh_devices: int = option(
      0, low=0,
      help="devices the K clients of a step are split across (a 1-D "
      "'clients' mesh; each device trains ceil(K/D) clients, the aggregate "
      "is a cross-device sum). When D does not divide K the step pads its "
      "clients with slots that train nothing and count nowhere "
      "(summary.json client_padding). 0 (auto): every device JAX sees "
      "(every process's, under jax.distributed), at most K")
  compute_dtype: str = option(
      "float32", choices=COMPUTE_DTYPES,
      help="the clients' forward and backward passes: float32, or bfloat16 "
      "(parameters, optimizer, aggregate and evaluation stay float32; "
      "bf16 has float32's exponent range, so no loss scaling is needed)")
  unroll_local_steps: bool = option(
      False, help="fully unroll the local-step loop (up to 64 steps) instead "
      "of a rolled loop; the rolled loop compiles faster and, on the 2-core "
      "CPU, runs as fast (docs/design.md, \"Client training and batching\")")
  eval_batch_size: int = option(1000, low=1,
                                help="batch size of the held-out evaluation")
  update_rule: str = option(
      "delta", choices=UPDATE_RULES,
      help="what a client contributes: delta (w_client - w_pulled: FedBuff, "
      "FTTE) or mixing (w_client - w_now, so server SGD with rate alpha is "
      "Xie et al.'s FedAsync w <- (1 - alpha_t) w + alpha_t w_client); both "
      "within the client's mask")
  refill: str = option(
      "arrival", choices=REFILLS,
      help="when new tasks start: arrival (FedBuff's algorithm: each "
      "arrival frees its slot and a task starts there at once from the "
      "current version, so C are always in flight) or step (a step's K "
      "slots refill together after the server update; synchronous FedAvg)")
  first_download: str = option(
      "whole", choices=FIRST_DOWNLOADS,
      help="what a device's first task downloads: whole (the global model; "
      "later tasks download only the coordinates a mask can change) or "
      "deployed (the starting model, e.g. the pretrained checkpoint, is "
      "already on every device, so every task downloads only those "
      "coordinates: with one static mask, the trained subset)")
  clip: str = option(
      "none", choices=robust.CLIPS,
      help="clip each update's L2 norm before weighting: to the median norm "
      "of the step's valid updates, or to clip_norm (fixed; needed by DP)")
  clip_norm: float = option(
      1.0, low=0, low_inclusive=False,
      help="the fixed clipping bound (clip='fixed'), DP's sensitivity S")
  robust_aggregation: str = option(
      "mean", choices=robust.ROBUST_AGGREGATIONS,
      help="per coordinate, over the updates that trained it: the weighted "
      "mean, a trimmed mean (trim_fraction at each end) or the median, each "
      "under the run's weights and normalization (robust.keep_mask)")
  trim_fraction: float = option(
      0.1, low=0, high=0.5, high_inclusive=False,
      help="share of a coordinate's values trimmed at each end "
      "(robust_aggregation='trimmed_mean')")
  dp_noise_multiplier: float = option(
      0.0, low=0,
      help="client-level DP: Gaussian noise of std z * clip_norm on the "
      "step's weighted sum (needs clip='fixed'); 0 = off")
  dp_delta: float = option(
      1e-5, low=0, high=1, low_inclusive=False, high_inclusive=False,
      help="delta at which the summary reports the privacy spent (epsilon)")
  count_timeouts: bool = option(
      False, help="refill=arrival only: a task abandoned or past its "
      "deadline counts toward K (the step then applies fewer than K "
      "updates); off, as in the papers: the server waits for K received "
      "updates")


_PRESET_DEFAULTS = {
    # Synchronous: the server waits for all K clients it sampled.
    "fedavg": dict(staleness="constant", variance_beta=0.0,
                   data_weight_exponent=1.0, normalization="coordinate",
                   mask="full", refill="step"),
    # Nguyen et al. 2022: buffer K of C in flight, (1+tau)^-0.5, mean over K.
    "fedbuff": dict(staleness="polynomial", staleness_a=0.5,
                    variance_beta=0.0, data_weight_exponent=0.0,
                    normalization="buffer", mask="full"),
    # Xie et al. 2019: every arrival mixes in with alpha * (1+tau)^-a.
    # Xie et al.'s mixing w <- (1 - a_t) w + a_t w_client, a_t = alpha s(tau).
    "fedasync": dict(staleness="polynomial", staleness_a=0.5,
                     variance_beta=0.0, data_weight_exponent=0.0,
                     normalization="buffer", mask="full", server_lr=0.6,
                     update_rule="mixing"),
    # This project's FTTE reconstruction: age x variance, sparse subset.
    # 'damped', not the first reconstruction's 'coordinate': there the age
    # weights cancel and the default MNIST run collapsed from 0.70 to 0.27
    # accuracy (README).
    "ftte": dict(staleness="polynomial", staleness_a=0.5, variance_beta=1.0,
                 data_weight_exponent=1.0, normalization="damped",
                 mask="search"),
}

# What a preset pins, as a function of its other options, and why.
_PINS = {
    "fedasync": (lambda kw: {"buffer_size": 1},
                 "applies every update alone: buffer_size must be 1"),
    "fedavg": (lambda kw: {"concurrency": kw["buffer_size"],
                           "refill": "step"},
               "is synchronous: concurrency must equal buffer_size "
               "({concurrency}) and refill must be 'step'"),
}


def pinned(name: str, overrides: Mapping[str, Any]) -> dict[str, Any]:
  """The engine options preset ``name`` fixes, given the other overrides.

  ``fedasync`` always has buffer_size 1; ``fedavg`` (a synchronous round)
  has concurrency equal to its buffer size and refills its slots together
  (refill 'step'). A launcher running several
  presets on shared overrides sets these values for each; ``preset``
  refuses an override that contradicts them.

  Args:
    name: a preset in ``PRESETS``.
    overrides: engine options given (pinned ones among them are ignored).

  Returns:
    Option name -> the value the preset requires ({} if none).
  """
  if name not in PRESETS:
    raise ValueError(f"algorithm must be one of {PRESETS}, got {name!r}")
  if name not in _PINS:
    return {}
  kw = {f.name: f.default for f in dataclasses.fields(EngineConfig)}
  kw.update(_PRESET_DEFAULTS[name])
  kw.update(overrides)
  return _PINS[name][0](kw)


def preset(name: str, **overrides) -> EngineConfig:
  """Returns the EngineConfig of preset ``name`` with ``overrides`` applied.

  Options the preset pins (``pinned``) take their pinned value; overriding
  one with another value is an error.
  """
  pins = pinned(name, overrides)
  fields = {f.name for f in dataclasses.fields(EngineConfig)}
  unknown = sorted(set(overrides) - fields)
  if unknown:
    raise ValueError(f"unknown engine option(s) {unknown}; valid: "
                     f"{sorted(fields)}")
  kw = dict(_PRESET_DEFAULTS[name])
  kw.update(overrides)
  kw["algorithm"] = name
  for key, value in pins.items():
    if key in overrides and overrides[key] != value:
      raise ValueError(f"{name} {_PINS[name][1].format(**pins)}, got "
                       f"{key}={overrides[key]!r}")
    kw[key] = value
  if "ring_size" not in overrides:
    c = kw.get("concurrency", EngineConfig.concurrency)
    k = kw.get("buffer_size", EngineConfig.buffer_size)
    if isinstance(c, int) and isinstance(k, int) and k >= 1:
      kw["ring_size"] = max(16, 4 * math.ceil(c / k))
  config = EngineConfig(**kw)
  validate(config)
  return config


def validate(config: EngineConfig, num_clients: int | None = None) -> None:
  """Raises ValueError naming the first invalid option and its valid values.

  Args:
    config: the engine config.
    num_clients: N, if known: concurrency may not exceed it.
  """
  options.check_fields(config)
  if config.buffer_size > config.concurrency:
    raise ValueError(f"buffer_size (K={config.buffer_size}) must be <= "
                     f"concurrency (C={config.concurrency})")
  if num_clients is not None and config.concurrency > num_clients:
    raise ValueError(f"concurrency (C={config.concurrency}) must be <= "
                     f"num_clients ({num_clients})")
  if config.client_batching == "stream" and config.variance_beta > 0:
    raise ValueError("client_batching='stream' needs variance_beta=0: the "
                     "variance weight needs every update of the buffer")
  if config.client_batching == "stream" and defended(config):
    raise ValueError("client_batching='stream' cannot clip or use a robust "
                     "aggregation (clip, robust_aggregation, "
                     "dp_noise_multiplier): they need every update of the "
                     "buffer; use map, vmap or auto")
  _validate_dp(config)


def defended(config: EngineConfig) -> bool:
  """Whether the step clips, trims or adds DP noise (needs the buffer)."""
  return (config.clip != "none" or config.robust_aggregation != "mean" or
          config.dp_noise_multiplier > 0)


def _validate_dp(config: EngineConfig) -> None:
  """DP needs each client's weight in [0, 1] and independent of the data."""
  if config.dp_noise_multiplier == 0:
    return
  need = {"clip": ("fixed", config.clip),
          "robust_aggregation": ("mean", config.robust_aggregation),
          "variance_beta": (0.0, config.variance_beta),
          "data_weight_exponent": (0.0, config.data_weight_exponent)}
  for name, (want, got) in need.items():
    if got != want:
      raise ValueError(
          f"dp_noise_multiplier > 0 needs {name}={want!r}, got {got!r}: "
          "client-level DP clips every update to clip_norm and weights it "
          "by at most 1 (staleness only), so one client moves the noised "
          "sum by at most clip_norm")


# -- The presets' server sides, as compositions (optax's alias.py) ------------


def fedavg() -> tx.Aggregator:
  """FedAvg: the data-weighted mean, coordinate-wise."""
  return tx.aggregator(tx.weight_by_data(1.0), normalization="coordinate")


def fedbuff(staleness_a: float = 0.5) -> tx.Aggregator:
  """FedBuff (Nguyen et al. 2022): ``(1+tau)^-a`` weights, mean over K."""
  return tx.aggregator(
      tx.weight_by_data(0.0),
      tx.weight_by_age(staleness_lib.make_staleness_fn("polynomial",
                                                       staleness_a)),
      normalization="buffer")


def fedasync(staleness_a: float = 0.5) -> tx.Aggregator:
  """FedAsync (Xie et al. 2019): one update at a time, ``alpha s(tau)``
  mixing (the mixing itself is the engine's ``update_rule='mixing'`` and
  the server learning rate alpha)."""
  return fedbuff(staleness_a)


def ftte(staleness_a: float = 0.5, variance_beta: float = 1.0
         ) -> tx.Aggregator:
  """This project's FTTE reconstruction: data size x age x variance,
  damped coordinate-wise normalization (docs/design.md)."""
  return tx.aggregator(
      tx.weight_by_data(1.0),
      tx.weight_by_age(staleness_lib.make_staleness_fn("polynomial",
                                                       staleness_a)),
      tx.weight_by_variance(variance_beta), normalization="damped")


def aggregator_from_config(config: EngineConfig,
                           staleness_fn: Callable | None = None
                           ) -> tx.Aggregator:
  """The aggregation a config's options describe, in the engine's order:
  clip, data weight, age weight, variance weight, robust mean, DP noise,
  then the normalization. ``staleness_fn`` replaces the named age weight.
  """
  c = config
  age = staleness_fn or staleness_lib.make_staleness_fn(
      c.staleness, c.staleness_a, c.staleness_b)
  steps = []
  if c.clip != "none":
    steps.append(tx.clip(c.clip, c.clip_norm))
  steps += [tx.weight_by_data(c.data_weight_exponent), tx.weight_by_age(age)]
  if c.variance_beta > 0:
    steps.append(tx.weight_by_variance(c.variance_beta))
  if c.robust_aggregation != "mean":
    steps.append(tx.robust_mean(c.robust_aggregation, c.trim_fraction))
  if c.dp_noise_multiplier > 0:
    steps.append(tx.dp_noise(c.dp_noise_multiplier, c.clip_norm))
  return tx.aggregator(*steps, normalization=c.normalization)


def server_optimizer(config: EngineConfig) -> optax.GradientTransformation:
  """The optimizer that applies the aggregate (as a pseudo-gradient -Delta)."""
  if config.server_optimizer == "sgd":
    return optax.sgd(config.server_lr)
  if config.server_optimizer == "momentum":
    return optax.sgd(config.server_lr, momentum=config.server_momentum)
  return optax.adam(config.server_lr)
