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
from ftte_jax.core import options
from ftte_jax.core.options import option
from ftte_jax.data import config as data_config
from ftte_jax.data.config import DataConfig  # pylint: disable=unused-import
from ftte_jax.search import groups as groups_lib
from ftte_jax.search import knapsack as knapsack_lib
from ftte_jax.search import memory as memory_lib
from ftte_jax.search import plan as plan_lib

IMPORTANCE_SOURCES = ("clients", "proxy")
# Where a device keeps the weights it does not train (docs/design.md,
# "Memory model"): flash (read in place, as the Tiny Training Engine does)
# or RAM (the whole model resident).
FROZEN_WEIGHTS = memory_lib.FROZEN_PLACES
# The pooled-data default of central pretraining (steps=auto).
POOLED_PRETRAIN_STEPS = 100


@dataclasses.dataclass(frozen=True)
class SearchConfig:
  """Subset search options (used when the engine's mask is ``search``)."""

  method: str = option(
      "exact", choices=knapsack_lib.METHODS, name="search_method",
      help="subset search: exact (DP knapsack) or greedy")
  objective: str = option(
      "importance", choices=knapsack_lib.OBJECTIVES, name="search_objective",
      help="what the search maximizes under the budgets: importance (the "
      "paper), or importance_per_time: importance per second of a tier's "
      "expected task time (compute, upload and download on the tier's "
      "devices), so a slightly less important subset that makes tasks much "
      "shorter can win (exact, by Dinkelbach's method; needs "
      "search_method=exact)")
  policy: str = option(
      "min", choices=plan_lib.POLICIES, name="search_policy",
      help="min (one mask under the weakest device, the paper) or per_tier "
      "(one mask per memory tier)")
  channel_fractions: Sequence[float] = option(
      groups_lib.PAPER_FRACTIONS, low=0, high=1, low_inclusive=False,
      nonempty=True, ascending=True,
      help="output-channel fractions a tensor may be trained at (the last "
      "must be 1)")
  importance: str = option(
      "clients", choices=IMPORTANCE_SOURCES,
      help="clients (Fisher from a probe round on devices that can train the "
      "full model, its time and bytes counted) or proxy (Fisher on "
      "probe_examples pool examples at the server, standing in for public "
      "data; no device time)")
  probe_clients: int = option(10, low=1, help="devices in the probe round")
  probe_examples: int = option(
      32, low=1,
      help="examples per probe device (or proxy examples in total)")
  num_cells: int = option(1024, low=1, help="DP resolution cells")
  max_upload_fraction: float = option(
      0.3, low=0, high=1, low_inclusive=False,
      help="an upload budget: each tier trains (and uploads) at most this "
      "fraction of the model's parameters, a second constraint beside "
      "memory (our reading of FTTE's 'sends a smaller subset'; 0.3 is "
      "within the paper's 69% payload cut); 1: memory alone decides")
  max_micro_batches: int = option(
      32, low=1,
      help="a device may split its local batch into m micro-batches with "
      "gradient accumulation (activation memory of batch_size/m plus one "
      "gradient accumulator; same training, time and FLOPs); the search "
      "chooses m per tier jointly with the subset, among the divisors of "
      "batch_size up to this (batch 32: 1, 2, 4, 8, 16, 32). 1: never")
  research_every: int = option(
      0, low=0,
      help="every this many server steps, search again with importance "
      "measured at the current global model (0: never; needs mask=search). "
      "The new masks apply to tasks trained from then on; the re-search "
      "probe's bytes are counted, its time is not (capable devices probe "
      "alongside training). The plan lives in the checkpointed state, so a "
      "resumed run replays it")


@dataclasses.dataclass(frozen=True)
class PretrainConfig:
  """Central pretraining on the server's proxy set (``pretrain.pretrain``).

  Federated fine-tuning then starts from the pretrained parameters, as
  on-device training in the Tiny Training Engine fine-tunes a model trained
  elsewhere. ``launch.pretrain`` saves the result for ``init_checkpoint``;
  ``steps > 0`` in a run does the same pretraining in-process.
  """

  steps: int | str = option(
      data_config.AUTO, low=0, auto=True, name="pretrain_steps",
      help="SGD steps of central pretraining on the proxy set before the "
      "federated run (needs proxy_examples > 0); 0: none; auto: 100 when "
      "the run has a proxy set and no init_checkpoint, else 0")
  lr: float = option(0.05, low=0, low_inclusive=False, name="pretrain_lr",
                     help="pretraining learning rate")
  momentum: float = option(0.9, low=0, high=1, high_inclusive=False,
                           name="pretrain_momentum",
                           help="pretraining SGD momentum")
  batch_size: int = option(32, low=1, name="pretrain_batch_size",
                           help="pretraining batch size")


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
  """Everything one run needs; written to ``config.json`` by the launcher.

  Each field's meaning and valid values are declared with it
  (``options.option``); ``validate`` checks a whole config.
  """

  engine: algorithms.EngineConfig = option(
      algorithms.EngineConfig(),
      help="algorithm preset plus overrides (algorithms.preset)")
  data: DataConfig = option(DataConfig(), help="dataset and partition")
  fleet: fleet_lib.FleetConfig = option(
      fleet_lib.FleetConfig(),
      help="device profiles; memory_tiers in bytes unless "
      "memory_tier_fractions is set")
  search: SearchConfig = option(SearchConfig(), help="subset search")
  pretrain: PretrainConfig = option(
      PretrainConfig(), help="central pretraining on the proxy set")
  init_checkpoint: str | None = option(
      None,
      help="start from the parameters saved by launch.pretrain in this "
      "directory (every algorithm from the same ones); its proxy split must "
      "be this run's when the dataset is the same. None: the seeded random "
      "initialization (then pretrain_steps, if any)")
  frozen_weights: str = option(
      "flash", choices=FROZEN_WEIGHTS,
      help="where a device keeps the weights it does not train: ram (the "
      "whole model counts against device memory) or flash (read in place "
      "from flash, as the Tiny Training Engine does; RAM holds the trained "
      "subset's weights, gradients, optimizer state and activations, and "
      "the summary reports the flash bytes apart)")
  memory_tier_fractions: Sequence[float] | None = option(
      (0.2, 1.1, 2.0), low=0, low_inclusive=False, nonempty=True,
      ascending=True,
      help="device memory tiers as fractions of the model's full training "
      "memory (analytic, at the engine's batch size), so one fleet "
      "description fits any model; overrides memory_tiers. On the command "
      "line a comma list, or 'none' to use --memory_tiers in bytes")
  model: str = option(
      "lenet5", choices=models_lib.MODELS,
      help="model name (models.get_model); femnist_cnn is LEAF's FEMNIST "
      "CNN, char_lstm LEAF's Shakespeare model (embedding, 2-layer LSTM)")
  model_options: dict = option(
      default_factory=dict,
      help="keyword arguments of the model, e.g. {\"hidden\": [64]}; a JSON "
      "object on the command line")
  rounds: int = option(100, low=1, help="server steps to run")
  max_virtual_time: float | None = option(
      None, low=0, low_inclusive=False,
      help="virtual-time budget (seconds): a step whose last arrival would "
      "pass it is not taken; None: no limit")
  eval_every: int = option(10, low=1,
                           help="evaluate every this many server steps")
  steps_per_call: int = option(
      1, low=0,
      help="server steps per jitted call, up to the next evaluation, "
      "re-search or checkpoint (0: all of them); bit-identical to single "
      "steps. More saves host round trips (tiny steps, accelerators); on "
      "the 2-core CPU the loop around a LeNet-5 step measured ~15% slower, "
      "so the default is 1")
  device_memory_budget: float | None = option(
      None, low=0, low_inclusive=False,
      help="bytes of memory per device the jitted step may plan for with "
      "client_chunk=0 (auto; experiment/memory_plan.py takes 90% of it). "
      "None: the allocator limit the devices report (memory_stats), none on "
      "the CPU")
  target_accuracy: float | None = option(
      None, low=0, high=1, low_inclusive=False,
      help="accuracy whose first crossing defines time-to-target")
  seed: int = option(
      0, low=0,
      help="the one root seed (data split, partition, fleet, init, engine)")
  personal_eval_clients: int = option(
      0, low=0,
      help="devices evaluated on their held-out slices at every evaluation "
      "(a fixed random sample, drawn by the seed); 0: every device. Needs "
      "holdout_fraction > 0")
  personal_steps: int = option(
      5, low=0,
      help="local fine-tuning steps before the personalized evaluation, "
      "within each device's own mask (its memory budget)")
  personal_mix: float = option(
      0.5, low=0, high=1,
      help="the interpolated model's weight on the fine-tuned one: "
      "mix * fine-tuned + (1 - mix) * global, evaluated beside both")
  on_divergence: str = option(
      "stop", choices=("stop", "skip"),
      help="when a server step's result would be non-finite (the step is "
      "refused and counted either way) or the test loss is not finite: "
      "stop ends the run (the launcher exits 3 after saving the last good "
      "state and the summary); skip goes on")

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)


# Options whose values are this project's reconstruction of FTTE, not the
# paper's published forms (docs/design.md, "Reconstruction choices"); the
# launcher lists their values in config.json under "reconstruction".
RECONSTRUCTION = {
    "engine": ("staleness", "staleness_a", "staleness_b", "variance_beta",
               "data_weight_exponent", "normalization", "mask",
               "first_download"),
    "search": ("method", "objective", "policy", "channel_fractions",
               "importance", "max_upload_fraction", "max_micro_batches"),
    "data": ("proxy_examples",),
    "pretrain": ("steps", "lr", "momentum", "batch_size"),
    "": ("frozen_weights", "memory_tier_fractions", "init_checkpoint"),
}


def reconstruction_choices(config: ExperimentConfig) -> dict:
  """``{option name: value}`` of the ``RECONSTRUCTION`` options."""
  out = {}
  for section, fields in RECONSTRUCTION.items():
    obj = getattr(config, section) if section else config
    for f in fields:
      opt = next(o for o in options.options(type(obj)) if o.field == f)
      out[opt.name] = getattr(obj, f)
  return out


def micro_batch_choices(config: ExperimentConfig) -> tuple[int, ...]:
  """The micro-batch counts the search may choose: the divisors of the
  batch size up to ``max_micro_batches``."""
  b = config.engine.batch_size
  return tuple(m for m in range(1, min(b, config.search.max_micro_batches) + 1)
               if b % m == 0)


def resolve(config: ExperimentConfig) -> ExperimentConfig:
  """``config`` with every 'auto' replaced by its value for the dataset
  (``DataConfig.resolved``; ``pretrain_steps``: 100 with a proxy set and no
  init_checkpoint, else 0). Idempotent; ``validate`` first.
  """
  data = config.data.resolved()
  pre = config.pretrain
  if options.is_auto(_option(PretrainConfig, "steps"), pre.steps):
    steps = (POOLED_PRETRAIN_STEPS if data.proxy_examples and
             not config.init_checkpoint else 0)
    pre = dataclasses.replace(pre, steps=steps)
  return dataclasses.replace(config, data=data, pretrain=pre)


def _option(cls, field: str) -> options.Option:
  return next(o for o in options.options(cls) if o.field == field)


def validate(config: ExperimentConfig) -> None:
  """Checks every option that can be checked without loading anything."""
  options.check_fields(config)
  data_config.validate(config.data)
  options.check_fields(config.search)
  options.check_fields(config.pretrain)
  config = resolve(config)
  if config.personal_eval_clients and not config.data.holdout_fraction:
    raise ValueError("personal_eval_clients needs holdout_fraction > 0 (the "
                     "held-out slices it evaluates on)")
  if config.personal_eval_clients > config.data.num_clients:
    raise ValueError(f"personal_eval_clients ({config.personal_eval_clients})"
                     f" exceeds num_clients ({config.data.num_clients})")
  if config.pretrain.steps and not config.data.proxy_examples:
    raise ValueError("pretrain_steps needs a proxy set to train on: set "
                     "proxy_examples > 0")
  if config.pretrain.steps and config.init_checkpoint:
    raise ValueError("pretrain_steps and init_checkpoint both choose the "
                     "starting parameters; give one")
  if config.search.importance == "proxy" and config.data.proxy_examples and (
      config.search.probe_examples > config.data.proxy_examples):
    raise ValueError(f"probe_examples ({config.search.probe_examples}) "
                     "exceeds the proxy set (proxy_examples="
                     f"{config.data.proxy_examples})")
  algorithms.validate(config.engine, config.data.num_clients)
  if config.device_memory_budget is not None and config.engine.client_chunk:
    raise ValueError("device_memory_budget plans the step's client chunk: "
                     "it needs client_chunk=0 (auto), got client_chunk="
                     f"{config.engine.client_chunk}")
  fleet_cfg = config.fleet
  if config.memory_tier_fractions is not None:
    fleet_cfg = dataclasses.replace(
        fleet_cfg, memory_tiers=tuple(config.memory_tier_fractions))
  fleet_lib.validate(fleet_cfg)
  if (config.search.objective == "importance_per_time" and
      config.search.method != "exact"):
    raise ValueError("search_objective='importance_per_time' runs on the "
                     "exact search; use search_method='exact' (got "
                     f"{config.search.method!r})")
  if config.search.research_every and config.engine.mask != "search":
    raise ValueError("research_every needs mask='search', got mask="
                     f"{config.engine.mask!r}")
