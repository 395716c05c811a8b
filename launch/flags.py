"""absl flags for every ExperimentConfig option, derived from the dataclasses.

Each field of ``EngineConfig``, ``DataConfig``, ``FleetConfig``,
``SearchConfig`` and the top level of ``ExperimentConfig`` becomes one flag
of the same name (``search.method`` and ``search.policy`` become
``--search_method`` and ``--search_policy``; ``fleet.num_clients`` is
``--num_clients``), so an option added to a config class gets a flag without
touching this file. Every config flag defaults to None, meaning "not given":
engine options then come from the ``--algorithm`` preset (presets differ,
e.g. fedasync has buffer_size=1), everything else from the dataclass default.

Launchers (``launch.main``, ``launch.sweep``, ``experiments.compare``) share
this module: ``define_config_flags`` registers the flags, ``resolve`` turns
parsed flags into an ``ExperimentConfig``, ``parse_or_exit`` and ``fail``
make bad input exit with status 2 and one line naming the flag.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import json
import os
import re
import sys
import types
import typing
from typing import Any, Sequence

from absl import flags

from ftte_jax.core import aggregation
from ftte_jax.core import algorithms
from ftte_jax.data import datasets
from ftte_jax import experiment
from ftte_jax.core import fleet as fleet_lib
from ftte_jax import models
from ftte_jax.data import partition
from ftte_jax.search import knapsack
from ftte_jax.search import plan as plan_lib
from ftte_jax.core import staleness

EXIT_USAGE = 2  # exit status for bad command-line input.

# (section of ExperimentConfig, dataclass, field -> flag renames, skipped).
_SECTIONS = (
    ("engine", algorithms.EngineConfig, {}, {"algorithm"}),
    ("data", experiment.DataConfig, {}, set()),
    ("fleet", fleet_lib.FleetConfig, {}, {"num_clients"}),
    ("search", experiment.SearchConfig,
     {"method": "search_method", "policy": "search_policy"}, set()),
    ("", experiment.ExperimentConfig, {}, {"engine", "data", "fleet",
                                           "search"}),
)

# Valid values of string options (enum flags), from the library's constants.
_CHOICES = {
    "server_optimizer": algorithms.SERVER_OPTIMIZERS,
    "staleness": staleness.STALENESS_FUNCTIONS,
    "normalization": aggregation.NORMALIZATIONS,
    "mask": algorithms.MASK_POLICIES,
    "memory_policy": algorithms.MEMORY_POLICIES,
    "client_batching": algorithms.CLIENT_BATCHING,
    "dataset": datasets.DATASETS,
    "partition": tuple(partition.PARTITIONS) + ("natural",),
    "model": models.MODELS,
    "search_method": knapsack.METHODS,
    "search_policy": plan_lib.POLICIES,
    "importance": experiment.IMPORTANCE_SOURCES,
}

# Integer options that must be >= 1 (checked at parse time so that, e.g.,
# --num_clients=-5 is reported as such, not as a concurrency error).
_POSITIVE_INTS = {
    "num_clients", "rounds", "eval_every", "concurrency", "buffer_size",
    "ring_size", "local_steps", "batch_size", "eval_batch_size",
    "last_n_tensors", "probe_clients", "probe_examples", "num_cells",
    "num_test", "shards_per_client"}

# Help for fields whose class docstring has no Attributes entry.
_EXTRA_HELP = {
    "dataset": "dataset name",
    "data_dir": "directory holding the dataset files; default: "
                "$FTTE_DATA_DIR, else ~/.cache/ftte_jax",
    "num_clients": "number of simulated clients (devices), N",
    "partition": "how the training pool is split across clients",
    "dirichlet_alpha": "Dirichlet label-skew concentration (smaller = more "
                       "skew), for --partition=dirichlet",
    "shards_per_client": "label shards per client, for --partition=shards",
    "quantity_sigma": "lognormal sigma of client sizes, for "
                      "--partition=quantity",
    "num_test": "held-out test examples (mnist/cifar10 pool split)",
    "model_options": "JSON object of model keyword arguments, e.g. "
                     "'{\"hidden\": 64}'",
    "memory_tier_fractions": "device memory tiers as fractions of full-model "
                             "training memory (comma list, ascending), or "
                             "'none' to use --memory_tiers in bytes",
}


@dataclasses.dataclass(frozen=True)
class FlagSpec:
  """One config flag: where its value goes and how to convert it."""

  flag: str  # flag name.
  section: str  # "engine" | "data" | "fleet" | "search" | "" (top level).
  field: str  # dataclass field name.
  kind: str  # bool | int | float | str | floats | json.
  optional: bool  # the field accepts None.


def _attribute_docs(cls) -> dict[str, str]:
  """Parses the ``Attributes:`` block of a Google-style class docstring."""
  doc = cls.__doc__ or ""
  m = re.search(r"Attributes:\n(.*?)(\n\s*\n|\Z)", doc, re.S)
  out: dict[str, str] = {}
  if not m:
    return out
  name = None
  for line in m.group(1).splitlines():
    head = re.match(r"\s{4}(\w+): (.*)", line)
    if head:
      name = head.group(1)
      out[name] = head.group(2).strip()
    elif name and line.strip():
      out[name] += " " + line.strip()
  return out


def _kind(tp) -> tuple[str, bool]:
  """Maps a field's type to (flag kind, optional)."""
  optional = False
  origin = typing.get_origin(tp)
  if origin in (typing.Union, types.UnionType):
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    optional = len(args) < len(typing.get_args(tp))
    tp = args[0]
    origin = typing.get_origin(tp)
  if tp is bool:
    return "bool", optional
  if tp in (int, float, str):
    return tp.__name__, optional
  if tp is dict or origin is dict:
    return "json", optional
  if origin in (collections.abc.Sequence, list, tuple) or tp in (list, tuple):
    return "floats", optional
  raise TypeError(f"no flag kind for type {tp!r}")


def _specs() -> list[FlagSpec]:
  specs, seen = [], set()
  for section, cls, renames, skip in _SECTIONS:
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
      if f.name in skip:
        continue
      kind, optional = _kind(hints[f.name])
      name = renames.get(f.name, f.name)
      if name in seen:
        raise AssertionError(f"two config fields map to flag --{name}")
      seen.add(name)
      specs.append(FlagSpec(name, section, f.name, kind, optional))
  return specs


SPECS: list[FlagSpec] = _specs()
FLAG_NAMES = frozenset(s.flag for s in SPECS) | {"algorithm"}


def _default_text(spec: FlagSpec) -> str:
  if spec.section == "engine":
    return "default: the --algorithm preset's"
  cls = next(c for s, c, _, _ in _SECTIONS if s == spec.section)
  f = next(f for f in dataclasses.fields(cls) if f.name == spec.field)
  value = (f.default_factory() if f.default is dataclasses.MISSING
           else f.default)
  if spec.kind == "floats" and value is not None:
    value = ",".join(f"{v:g}" for v in value) or "(empty)"
  return f"default: {value}"


def define_config_flags(fv: flags.FlagValues = flags.FLAGS) -> None:
  """Registers --algorithm and one flag per config field on ``fv``."""
  flags.DEFINE_enum("algorithm", "ftte", algorithms.PRESETS,
                    "algorithm preset; unset engine flags take its values",
                    flag_values=fv)
  for spec in SPECS:
    cls = next(c for s, c, _, _ in _SECTIONS if s == spec.section)
    doc = _attribute_docs(cls).get(spec.field) or _EXTRA_HELP.get(
        spec.flag, spec.field)
    help_text = f"{doc} ({_default_text(spec)})"
    name = spec.flag
    if spec.kind == "bool":
      flags.DEFINE_bool(name, None, help_text, flag_values=fv)
    elif spec.kind == "int":
      flags.DEFINE_integer(name, None, help_text, flag_values=fv,
                           lower_bound=1 if name in _POSITIVE_INTS else None)
    elif spec.kind == "float":
      flags.DEFINE_float(name, None, help_text, flag_values=fv)
    elif spec.kind == "str" and name in _CHOICES:
      flags.DEFINE_enum(name, None, list(_CHOICES[name]), help_text,
                        flag_values=fv)
    elif spec.kind in ("str", "json"):
      flags.DEFINE_string(name, None, help_text, flag_values=fv)
    else:
      flags.DEFINE_list(name, None, help_text, flag_values=fv)


def define_run_flags(fv: flags.FlagValues = flags.FLAGS) -> None:
  """Registers the launcher's own flags (output, checkpoints, overwrite)."""
  flags.DEFINE_string("workdir", None, "output directory; default "
                      "runs/<algorithm>-<first 8 hex of the config hash>, so "
                      "re-running a command resumes it", flag_values=fv)
  flags.DEFINE_integer("checkpoint_every", 25, "save a checkpoint every this "
                       "many server steps (and at the end)", lower_bound=1,
                       flag_values=fv)
  flags.DEFINE_integer("keep_checkpoints", 3, "most recent checkpoints kept",
                       lower_bound=1, flag_values=fv)
  flags.DEFINE_bool("overwrite", False, "discard whatever --workdir holds "
                    "and start fresh", flag_values=fv)


def _convert(spec: FlagSpec, value) -> Any:
  if spec.kind == "json":
    try:
      out = json.loads(value)
    except json.JSONDecodeError as e:
      raise ValueError(f"{spec.flag} must be a JSON object, got {value!r} "
                       f"({e.msg})") from None
    if not isinstance(out, dict):
      raise ValueError(f"{spec.flag} must be a JSON object, got {value!r}")
    return out
  if spec.kind == "floats":
    if spec.optional and [v.lower() for v in value] in (["none"], []):
      return None
    try:
      return tuple(float(v) for v in value)
    except ValueError:
      raise ValueError(f"{spec.flag} must be a comma-separated list of "
                       f"numbers, got {','.join(value)!r}") from None
  return value


@dataclasses.dataclass(frozen=True)
class Resolved:
  """A config resolved from flags, and the values that were given."""

  config: experiment.ExperimentConfig
  given: dict  # flag -> value for every config flag set on the command line.


def resolve(fv: flags.FlagValues = flags.FLAGS) -> Resolved:
  """Builds and validates the ExperimentConfig that parsed flags describe.

  Raises:
    ValueError: an invalid option; the message starts with its name.
  """
  parts: dict[str, dict] = {"engine": {}, "data": {}, "fleet": {},
                            "search": {}, "": {}}
  given = {}
  for spec in SPECS:
    value = fv[spec.flag].value
    if value is None:
      continue
    given[spec.flag] = value
    parts[spec.section][spec.field] = _convert(spec, value)
  engine = algorithms.preset(fv.algorithm, **parts["engine"])
  data = experiment.DataConfig(**parts["data"])
  if data.data_dir is not None and not os.path.isdir(data.data_dir):
    raise ValueError(f"data_dir: no such directory {data.data_dir!r}")
  fleet = fleet_lib.FleetConfig(num_clients=data.num_clients,
                                **parts["fleet"])
  config = experiment.ExperimentConfig(
      engine=engine, data=data, fleet=fleet,
      search=experiment.SearchConfig(**parts["search"]), **parts[""])
  experiment.validate(config)
  return Resolved(config, given)


def given_args(fv: flags.FlagValues = flags.FLAGS) -> list[str]:
  """The config flags set on ``fv`` as command-line arguments."""
  out = [f"--algorithm={fv.algorithm}"]
  for spec in SPECS:
    if fv[spec.flag].value is not None:
      out.append(fv[spec.flag].serialize())
  return out


def _parse_args(args: Sequence[str]) -> flags.FlagValues:
  fv = flags.FlagValues()
  define_config_flags(fv)
  try:
    rest = fv(["resolve"] + list(args))
  except flags.Error as e:
    raise ValueError(one_line(e)) from None
  if len(rest) > 1:
    raise ValueError(f"unexpected positional arguments {rest[1:]}")
  return fv


def resolve_args(args: Sequence[str]) -> Resolved:
  """Resolves a config from command-line arguments, without global flags.

  Raises:
    ValueError: bad flag syntax or an invalid option (message names it).
  """
  return resolve(_parse_args(args))


def expand_args(args: Sequence[str]) -> list[str]:
  """Config arguments with flagfiles expanded, one ``--flag=value`` each.

  Raises:
    ValueError: bad flag syntax (the message names the flag).
  """
  return given_args(_parse_args(args))


def one_line(error: BaseException | str) -> str:
  """An error as one line, with the flag it names written as ``--flag``."""
  msg = " ".join(str(error).split())
  if isinstance(error, flags.CantOpenFlagFileError):
    return "--flagfile: " + msg.replace("ERROR:: ", "")
  m = re.match(r"(\w+)\b", msg)
  if m and m.group(1) in FLAG_NAMES | {"workdir", "checkpoint_every"}:
    msg = "--" + msg
  return msg


def fail(message: BaseException | str) -> typing.NoReturn:
  """Prints one line to stderr and exits with status 2 (bad input)."""
  prog = os.path.basename(sys.argv[0]) if sys.argv else "launch"
  print(f"{prog}: error: {one_line(message)}", file=sys.stderr, flush=True)
  sys.exit(EXIT_USAGE)


def parse_or_exit(argv: list[str]) -> list[str]:
  """``flags_parser`` for ``app.run``: a parse error exits 2 in one line."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    fail(e)
