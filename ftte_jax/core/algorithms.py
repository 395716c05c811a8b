"""Engine configuration and the four algorithm presets.

FedAvg, FedBuff, FedAsync and FTTE are not separate code paths: each is an
``EngineConfig`` for the one event-driven engine in ``ftte_jax.engine``
(DESIGN §2). ``preset(name, **overrides)`` builds one; ``validate`` checks a
config against a fleet before anything is compiled.
"""

from __future__ import annotations

import dataclasses
import math

from ftte_jax.core import aggregation
from ftte_jax.core import staleness

PRESETS = ("fedavg", "fedbuff", "fedasync", "ftte")
SERVER_OPTIMIZERS = ("sgd", "momentum", "adam")
MASK_POLICIES = ("full", "last_n", "search")
MEMORY_POLICIES = ("exclude", "ignore")
CLIENT_BATCHING = ("vmap", "map", "stream", "auto")
UPDATE_RULES = ("delta", "mixing")
REFILLS = ("arrival", "step")


@dataclasses.dataclass(frozen=True)
class EngineConfig:
  """Every engine option; hyperparameters are static, never traced.

  Attributes:
    algorithm: preset name this config came from (for the record).
    concurrency: C, client tasks in flight at once.
    buffer_size: K, updates per server step (K <= C).
    ring_size: S, global versions kept; older updates are dropped as stale.
      ``preset`` sets it to max(16, 4 * ceil(C / K)) unless given: the
      typical staleness is about C / K (FedAsync with C = 100, K = 1 lost
      98% of its updates to a fixed S = 16).
    local_steps: local SGD steps per task (the maximum when local_epochs set).
    local_epochs: if set, client i takes ceil(local_epochs * n_i / batch)
      steps (no more than local_steps would allow is *not* enforced: the
      loop length becomes the largest client's count).
    batch_size: local batch size.
    client_lr: client SGD learning rate.
    client_momentum: client SGD momentum (0 = plain SGD).
    server_optimizer: sgd | momentum | adam, applied to the aggregate.
    server_lr: server learning rate (FedAsync's mixing rate alpha).
    server_momentum: momentum of the ``momentum`` server optimizer.
    staleness: age weight: constant | polynomial | hinge | exponential.
    staleness_a: decay rate of the age weight.
    staleness_b: hinge threshold of the age weight.
    variance_beta: FTTE variance weight 1/(1+beta*d), scaled to mean 1 over
      the valid updates of a step; 0 switches it off.
    data_weight_exponent: gamma in the n_i^gamma data-size weight.
    normalization: coordinate (FedAvg; DESIGN's FTTE form) | damped (FTTE
      preset: coordinate-wise over data weights, so age shrinks the step) |
      buffer (FedBuff/FedAsync). See ``aggregation.aggregate``.
    mask: full | last_n (FTTE before the search) | search.
    last_n_tensors: tensors trained by the ``last_n`` mask rule.
    memory_policy: exclude devices that cannot hold their mask's training
      memory, or ignore memory.
    deadline_s: task deadline in virtual seconds; a task not back by then is
      dropped and its slot freed. None: deadline_factor times the slowest
      eligible device's nominal task time.
    deadline_factor: see deadline_s.
    client_batching: how the K clients of a step are trained: vmap (all at
      once), map (one after another inside the jit), stream (one after
      another, keeping only the running weighted sum; needs
      variance_beta=0), or auto (stream or map on CPU, vmap on
      accelerators; measured in experiments/benchmarks/throughput.py).
    unroll_local_steps: fully unroll the local-step loop (fast on CPU for
      convolutions, DESIGN §5) instead of a rolled loop.
    eval_batch_size: batch size of the held-out evaluation.
    update_rule: what a client contributes: ``delta`` (its change from the
      version it pulled, ``w_client - w_pulled``: FedBuff, FTTE) or
      ``mixing`` (``w_client - w_now``, so server SGD with rate alpha is Xie
      et al.'s FedAsync ``w <- (1 - alpha_t) w + alpha_t w_client``; both
      within the client's mask).
    refill: when new tasks start: ``arrival`` (FedBuff's algorithm: every
      arrival frees its slot and a new task starts at once from the current
      version, so C tasks are always in flight) or ``step`` (the K slots of
      a step refill together after the server update; synchronous FedAvg).
    count_timeouts: ``refill='arrival'`` only: a task that was abandoned or
      missed its deadline counts toward K (the server then applies fewer than
      K updates). False, the papers' behaviour: the server waits for K
      received updates.
  """

  algorithm: str = "ftte"
  concurrency: int = 100
  buffer_size: int = 10
  ring_size: int = 16
  local_steps: int = 5
  local_epochs: float | None = None
  batch_size: int = 32
  client_lr: float = 0.05
  client_momentum: float = 0.0
  server_optimizer: str = "sgd"
  server_lr: float = 1.0
  server_momentum: float = 0.9
  staleness: str = "polynomial"
  staleness_a: float = 0.5
  staleness_b: float = 4.0
  variance_beta: float = 1.0
  data_weight_exponent: float = 1.0
  normalization: str = "coordinate"
  mask: str = "last_n"
  last_n_tensors: int = 2
  memory_policy: str = "exclude"
  deadline_s: float | None = None
  deadline_factor: float = 3.0
  client_batching: str = "auto"
  unroll_local_steps: bool = True
  eval_batch_size: int = 1000
  update_rule: str = "delta"
  refill: str = "arrival"
  count_timeouts: bool = False


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
    "fedasync": dict(buffer_size=1, staleness="polynomial", staleness_a=0.5,
                     variance_beta=0.0, data_weight_exponent=0.0,
                     normalization="buffer", mask="full", server_lr=0.6,
                     update_rule="mixing"),
    # This project's FTTE reconstruction: age x variance, sparse subset.
    # 'damped', not DESIGN's 'coordinate': there the age weights cancel and
    # the default MNIST run collapsed from 0.70 to 0.27 accuracy (README).
    "ftte": dict(staleness="polynomial", staleness_a=0.5, variance_beta=1.0,
                 data_weight_exponent=1.0, normalization="damped",
                 mask="search"),
}


def preset(name: str, **overrides) -> EngineConfig:
  """Returns the EngineConfig of preset ``name`` with ``overrides`` applied.

  For ``fedavg`` the concurrency always equals the buffer size (a synchronous
  round); passing a different ``concurrency`` is an error.
  """
  if name not in PRESETS:
    raise ValueError(f"algorithm must be one of {PRESETS}, got {name!r}")
  fields = {f.name for f in dataclasses.fields(EngineConfig)}
  unknown = sorted(set(overrides) - fields)
  if unknown:
    raise ValueError(f"unknown engine option(s) {unknown}; valid: "
                     f"{sorted(fields)}")
  kw = dict(_PRESET_DEFAULTS[name])
  kw.update(overrides)
  kw["algorithm"] = name
  if name == "fedavg":
    k = kw.get("buffer_size", EngineConfig.buffer_size)
    if "concurrency" in overrides and overrides["concurrency"] != k:
      raise ValueError(
          f"fedavg is synchronous: concurrency must equal buffer_size ({k}), "
          f"got concurrency={overrides['concurrency']}")
    kw["concurrency"] = k
  if name == "fedasync" and kw["buffer_size"] != 1:
    raise ValueError(f"fedasync applies every update alone: buffer_size must "
                     f"be 1, got {kw['buffer_size']}")
  if "ring_size" not in overrides:
    c = kw.get("concurrency", EngineConfig.concurrency)
    k = kw.get("buffer_size", EngineConfig.buffer_size)
    if isinstance(c, int) and isinstance(k, int) and k >= 1:
      kw["ring_size"] = max(16, 4 * math.ceil(c / k))
  config = EngineConfig(**kw)
  validate(config)
  return config


def _positive_int(name: str, value) -> None:
  if not (isinstance(value, int) and value >= 1):
    raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


def _positive(name: str, value) -> None:
  if not (value > 0 and math.isfinite(value)):
    raise ValueError(f"{name} must be a positive finite number, got {value!r}")


def validate(config: EngineConfig, num_clients: int | None = None) -> None:
  """Raises ValueError naming the first invalid option and its valid range."""
  if config.algorithm not in PRESETS:
    raise ValueError(f"algorithm must be one of {PRESETS}, got "
                     f"{config.algorithm!r}")
  for name in ("concurrency", "buffer_size", "ring_size", "local_steps",
               "batch_size", "eval_batch_size", "last_n_tensors"):
    _positive_int(name, getattr(config, name))
  if config.buffer_size > config.concurrency:
    raise ValueError(f"buffer_size (K={config.buffer_size}) must be <= "
                     f"concurrency (C={config.concurrency})")
  if num_clients is not None and config.concurrency > num_clients:
    raise ValueError(f"concurrency (C={config.concurrency}) must be <= "
                     f"num_clients ({num_clients})")
  if config.local_epochs is not None:
    _positive("local_epochs", config.local_epochs)
  _positive("client_lr", config.client_lr)
  _positive("server_lr", config.server_lr)
  _positive("deadline_factor", config.deadline_factor)
  if config.deadline_s is not None:
    _positive("deadline_s", config.deadline_s)
  if not 0.0 <= config.client_momentum < 1.0:
    raise ValueError(f"client_momentum must be in [0, 1), got "
                     f"{config.client_momentum}")
  if not 0.0 <= config.server_momentum < 1.0:
    raise ValueError(f"server_momentum must be in [0, 1), got "
                     f"{config.server_momentum}")
  if config.server_optimizer not in SERVER_OPTIMIZERS:
    raise ValueError(f"server_optimizer must be one of {SERVER_OPTIMIZERS}, "
                     f"got {config.server_optimizer!r}")
  staleness.make_staleness_fn(config.staleness, config.staleness_a,
                              config.staleness_b)
  if config.variance_beta < 0:
    raise ValueError(f"variance_beta must be >= 0, got {config.variance_beta}")
  if config.data_weight_exponent < 0:
    raise ValueError("data_weight_exponent must be >= 0, got "
                     f"{config.data_weight_exponent}")
  if config.normalization not in aggregation.NORMALIZATIONS:
    raise ValueError(f"normalization must be one of "
                     f"{aggregation.NORMALIZATIONS}, got "
                     f"{config.normalization!r}")
  if config.mask not in MASK_POLICIES:
    raise ValueError(f"mask must be one of {MASK_POLICIES}, got "
                     f"{config.mask!r}")
  if config.memory_policy not in MEMORY_POLICIES:
    raise ValueError(f"memory_policy must be one of {MEMORY_POLICIES}, got "
                     f"{config.memory_policy!r}")
  if config.client_batching not in CLIENT_BATCHING:
    raise ValueError(f"client_batching must be one of {CLIENT_BATCHING}, got "
                     f"{config.client_batching!r}")
  if config.update_rule not in UPDATE_RULES:
    raise ValueError(f"update_rule must be one of {UPDATE_RULES}, got "
                     f"{config.update_rule!r}")
  if config.refill not in REFILLS:
    raise ValueError(f"refill must be one of {REFILLS}, got "
                     f"{config.refill!r}")
