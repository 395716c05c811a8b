"""Config options: declarations, validation messages, and coverage."""

import dataclasses
import math
from typing import Sequence

import pytest

from ftte_jax import experiment
from ftte_jax.core import algorithms
from ftte_jax.core import fleet
from ftte_jax.core import options
from ftte_jax.core.options import option

CONFIGS = (algorithms.EngineConfig, fleet.FleetConfig, experiment.DataConfig,
           experiment.SearchConfig, experiment.PretrainConfig,
           experiment.ExperimentConfig)
# String options that take any value (paths); every other one has choices.
# fleet_profile is a class mix (name:p,...), checked by profiles.parse_mix.
FREE_STRINGS = {"data_dir", "trace_path", "init_checkpoint", "npz_path",
                "fleet_profile"}


@dataclasses.dataclass(frozen=True)
class Toy:
  """One option of each kind."""

  name: str = option("a", choices=("a", "b"), help="a choice")
  count: int = option(1, low=1, help="a positive integer")
  rate: float = option(0.5, low=0, low_inclusive=False, help="positive")
  fraction: float = option(0.0, low=0, high=1, high_inclusive=False,
                           help="in [0, 1)")
  limit: float | None = option(None, low=0, help="optional, >= 0")
  tiers: Sequence[float] = option((1.0,), low=0, low_inclusive=False,
                                  nonempty=True, ascending=True,
                                  help="ascending positive list")
  flag: bool = option(True, help="a bool")
  extra: dict = option(default_factory=dict, help="a dict")
  renamed: str = option("x", choices=("x",), name="public_name",
                        help="named differently outside")


@pytest.mark.parametrize("kwargs, message", [
    (dict(name="c"), r"name must be one of \('a', 'b'\), got 'c'"),
    (dict(count=0), "count must be an integer >= 1, got 0"),
    (dict(count=2.0), "count must be an integer >= 1, got 2.0"),
    (dict(count=True), "count must be an integer >= 1, got True"),
    (dict(rate=-1), "rate must be a positive finite number, got -1"),
    (dict(rate=0.0), "rate must be a positive finite number, got 0.0"),
    (dict(rate=math.inf), "rate must be a positive finite number, got inf"),
    (dict(rate=math.nan), "rate must be a positive finite number, got nan"),
    (dict(rate="1"), "rate must be a positive finite number, got '1'"),
    (dict(rate=None), "rate must be a positive finite number, got None"),
    (dict(fraction=1.0), r"fraction must be a number in \[0, 1\), got 1.0"),
    (dict(fraction=math.nan), r"fraction must be a number in \[0, 1\)"),
    (dict(limit=-0.5), "limit must be a finite number >= 0 or None, got -0.5"),
    (dict(limit=math.inf), "limit must be a finite number >= 0 or None"),
    (dict(tiers=()), "tiers must be a non-empty ascending list of numbers, "
     "each a positive finite number, got \\[\\]"),
    (dict(tiers=(2.0, 1.0)), r"tiers must be .*, got \[2.0, 1.0\]"),
    (dict(tiers=(1.0, math.nan)), "tiers must be"),
    (dict(tiers="1,2"), "tiers must be"),
    (dict(flag=1), "flag must be true or false, got 1"),
    (dict(extra=[]), "extra must be a dict"),
    (dict(renamed="y"), "public_name must be one of \\('x',\\), got 'y'"),
])
def test_bad_value_of_each_kind_names_the_option(kwargs, message):
  with pytest.raises(ValueError, match="^" + message):
    options.check_fields(Toy(**kwargs))


def test_valid_values_pass():
  options.check_fields(Toy())
  options.check_fields(Toy(name="b", count=7, rate=1e-9, fraction=0.999,
                           limit=0, tiers=(1, 1, 3), flag=False,
                           extra={"k": 1}))


def test_options_fill_in_name_kind_and_default():
  by_field = {o.field: o for o in options.options(Toy)}
  assert by_field["renamed"].name == "public_name"
  assert by_field["limit"].optional and by_field["limit"].kind == "float"
  assert by_field["tiers"].kind == "floats"
  assert by_field["extra"].kind == "json" and by_field["extra"].default == {}
  assert options.describe(by_field["fraction"]) == "a number in [0, 1)"


@dataclasses.dataclass(frozen=True)
class Auto:
  """An option that also takes 'auto'."""

  size: int | str = option("auto", low=0, auto=True, help="a size or auto")


def test_auto_option_takes_auto_or_its_kind():
  opt = options.options(Auto)[0]
  assert opt.kind == "int" and opt.auto and opt.default == "auto"
  assert options.describe(opt) == "an integer >= 0 or 'auto'"
  for ok in ("auto", 0, 7):
    options.check_fields(Auto(size=ok))
  for bad in (-1, "Auto", "7", 2.5, None):
    with pytest.raises(ValueError, match="^size must be an integer >= 0 or "
                       "'auto', got"):
      options.check_fields(Auto(size=bad))
  assert options.is_auto(opt, "auto") and not options.is_auto(opt, 0)


def test_undeclared_field_is_refused():

  @dataclasses.dataclass(frozen=True)
  class Bare:
    x: int = 1

  with pytest.raises(TypeError, match="Bare.x is not declared"):
    options.options(Bare)


@pytest.mark.parametrize("cls", CONFIGS, ids=lambda c: c.__name__)
def test_every_config_field_has_help_and_its_default_is_valid(cls):
  opts = options.options(cls)  # raises for a field without ``option``.
  assert [o.field for o in opts] == [f.name for f in dataclasses.fields(cls)]
  for opt in opts:
    assert len(opt.help) > 5, opt.name
    if opt.kind != "config":
      options.check(opt, opt.default)


@pytest.mark.parametrize("cls", CONFIGS, ids=lambda c: c.__name__)
def test_every_fixed_set_string_option_has_choices(cls):
  for opt in options.options(cls):
    if opt.kind == "str":
      assert (opt.choices is not None) != (opt.name in FREE_STRINGS), opt.name


def test_option_names_are_unique_across_configs():
  names = [o.name for cls in CONFIGS for o in options.options(cls)
           if o.kind != "config"]
  assert len(names) == len(set(names))


def test_choices_come_from_the_library():
  from ftte_jax import models
  from ftte_jax.core import aggregation, staleness
  from ftte_jax.data import datasets, partition
  from ftte_jax.search import knapsack
  from ftte_jax.search import plan as plan_lib
  choices = {o.name: o.choices for cls in CONFIGS
             for o in options.options(cls)}
  assert choices["staleness"] == staleness.STALENESS_FUNCTIONS
  assert choices["normalization"] == aggregation.NORMALIZATIONS
  assert choices["dataset"] == datasets.DATASETS
  assert choices["model"] == models.MODELS
  assert choices["search_method"] == knapsack.METHODS
  assert choices["search_policy"] == plan_lib.POLICIES
  assert choices["partition"] == partition.PARTITIONS + ("natural",)
  assert choices["algorithm"] == algorithms.PRESETS


@pytest.mark.parametrize("config, message", [
    (algorithms.EngineConfig(client_lr=-1),
     "client_lr must be a positive finite number, got -1"),
    (algorithms.EngineConfig(server_lr=math.nan), "server_lr must be"),
    (algorithms.EngineConfig(staleness="x"),
     "staleness must be one of .*, got 'x'"),
    (algorithms.EngineConfig(client_momentum=1.0),
     r"client_momentum must be a number in \[0, 1\)"),
    (algorithms.EngineConfig(deadline_s=math.inf), "deadline_s must be"),
    (algorithms.EngineConfig(buffer_size=0),
     "buffer_size must be an integer >= 1"),
    (fleet.FleetConfig(bw_up=math.inf), "bw_up must be"),
    (experiment.DataConfig(num_clients=0),
     "num_clients must be an integer >= 1"),
    (experiment.DataConfig(dirichlet_alpha=0.0), "dirichlet_alpha must be"),
    (experiment.SearchConfig(channel_fractions=(0.5, 1.5)),
     "channel_fractions must be"),
    (experiment.SearchConfig(policy="max"), "search_policy must be one of"),
    (experiment.ExperimentConfig(max_virtual_time=math.nan),
     "max_virtual_time must be"),
    (experiment.ExperimentConfig(seed=-1), "seed must be an integer >= 0"),
])
def test_library_configs_name_the_bad_option(config, message):
  with pytest.raises(ValueError, match="^" + message):
    options.check_fields(config)
