"""Experiment configuration: every option of a run, in frozen dataclasses.

``ExperimentConfig`` names every option (the launcher maps absl flags onto
it one to one; the library never reads flags) and is written in full to
``config.json``.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

from ftte_jax import models as models_lib
from ftte_jax.core import algorithms
from ftte_jax.core import fleet as fleet_lib
from ftte_jax.data import datasets
from ftte_jax.search import groups as groups_lib
from ftte_jax.search import knapsack as knapsack_lib
from ftte_jax.search import plan as plan_lib

IMPORTANCE_SOURCES = ("clients", "proxy")


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
  if s.method not in knapsack_lib.METHODS:
    raise ValueError(f"search_method must be one of {knapsack_lib.METHODS}, "
                     f"got {s.method!r}")
  if s.policy not in plan_lib.POLICIES:
    raise ValueError(f"search_policy must be one of {plan_lib.POLICIES}, "
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


