"""absl flags for every ExperimentConfig option, derived from the dataclasses.

Each option of ``EngineConfig``, ``DataConfig``, ``FleetConfig``,
``SearchConfig``, ``PretrainConfig`` and the top level of
``ExperimentConfig`` becomes one flag named after the option (``search.method`` is ``--search_method``), whose
type, valid values (enum choices, integer bounds), help and default all come
from the field's declaration (``ftte_jax.core.options``): an option added to
a config class gets a flag without touching this file. Every config flag
defaults to None, meaning "not given": engine options then come from the
``--algorithm`` preset (presets differ, e.g. fedasync has buffer_size=1),
everything else from the dataclass default.

Launchers (``launch.main``, ``launch.sweep``, ``experiments.compare`` and the
experiment scripts) share this module: ``define_config_flags`` registers the
flags, ``define_run_flags`` the output and checkpoint flags, ``resolve``
turns parsed flags into an ``ExperimentConfig``, ``for_algorithm`` points
shared arguments at one preset, and ``parse_or_exit`` and ``fail`` make bad
input exit with status 2 and one line naming the flag.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import sys
import typing
from typing import Any, Collection, Mapping, Sequence

from absl import flags

from ftte_jax import experiment
from ftte_jax.core import algorithms
from ftte_jax.core import fleet as fleet_lib
from ftte_jax.core import options

EXIT_USAGE = 2  # exit status for bad command-line input.
EXIT_DIVERGED = 3  # a run stopped by on_divergence=stop.
EXIT_NO_UPDATES = 4  # no client update arrived (stopped_by "no_updates").
# What each status of launch.main means, for the tables of sweep and compare.
EXIT_MEANINGS = {0: "ok", 1: "crashed", 2: "refused", 3: "diverged",
                 4: "no_updates"}
PRESET_FLAG = "algorithm"  # names the preset; not an override.
# The first version's setting, before the Tiny-Training-Engine defaults
# (pretrained start on a proxy set, frozen weights in flash, micro-batches,
# an upload budget): random initialization, every pool example with a
# client, the whole model in RAM, no micro-batches, memory alone choosing
# the subset. Benchmarks against peers that train from scratch, and the
# from-scratch experiments, append these.
SCRATCH_ARGS = ("--proxy_examples=0", "--pretrain_steps=0",
                "--frozen_weights=ram", "--max_micro_batches=1",
                "--max_upload_fraction=1")
# Flags every launcher passes on to the launch.main runs it starts.
CHECKPOINT_FLAGS = ("checkpoint_every", "keep_checkpoints", "overwrite")

# (section of ExperimentConfig, its dataclass); nested configs are sections.
_SECTIONS = (
    ("engine", algorithms.EngineConfig),
    ("data", experiment.DataConfig),
    ("fleet", fleet_lib.FleetConfig),
    ("search", experiment.SearchConfig),
    ("pretrain", experiment.PretrainConfig),
    ("", experiment.ExperimentConfig),
)


@dataclasses.dataclass(frozen=True)
class FlagSpec:
  """One config flag: the option it sets and where its value goes."""

  section: str  # "engine" | "data" | "fleet" | "search" | "" (top level).
  option: options.Option

  @property
  def flag(self) -> str:
    return self.option.name

  @property
  def field(self) -> str:
    return self.option.field

  @property
  def kind(self) -> str:
    return self.option.kind


def _specs() -> list[FlagSpec]:
  specs, seen = [], set()
  for section, cls in _SECTIONS:
    for opt in options.options(cls):
      if opt.kind == "config":
        continue
      if opt.name in seen:
        raise AssertionError(f"two config fields map to flag --{opt.name}")
      seen.add(opt.name)
      specs.append(FlagSpec(section, opt))
  return specs


SPECS: list[FlagSpec] = _specs()
FLAG_NAMES = frozenset(s.flag for s in SPECS)


def _show(spec: FlagSpec, value) -> str:
  """A default value as it would be written on the command line."""
  if spec.kind == "floats" and value is not None:
    return ",".join(f"{v:g}" for v in value) or "(empty)"
  if spec.kind == "json":
    return json.dumps(value)
  if spec.kind == "float" and value is not None:
    return f"{value:g}"
  return str(value)


def _help(spec: FlagSpec, flag_default) -> str:
  """The option's help, its valid values and (if absl won't) its default."""
  text = f"{spec.option.help} (valid: {options.describe(spec.option)}"
  if flag_default is not None:  # absl prints a flag's own default itself.
    return text + ")"
  if spec.section == "engine":
    return text + "; default: the --algorithm preset's)"
  return text + f"; default: {_show(spec, spec.option.default)})"


def define_config_flags(fv: flags.FlagValues = flags.FLAGS,
                        defaults: Mapping[str, Any] | None = None,
                        exclude: Collection[str] = ()) -> None:
  """Registers --algorithm and one flag per config option on ``fv``.

  Args:
    fv: where to register.
    defaults: flag name -> default, in the form the flag parses (e.g.
      "0.5,2" for a list), for a script whose setting differs from the
      library's; such a flag's value counts as given.
    exclude: flags not to register (a script that sets those options
      itself); ``resolve`` then uses the library's default.
  """
  defaults = dict(defaults or {})
  defaults.setdefault(PRESET_FLAG, algorithms.EngineConfig.algorithm)
  unknown = (set(defaults) | set(exclude)) - FLAG_NAMES
  if unknown:
    raise ValueError(f"not config flags: {sorted(unknown)}")
  for spec in SPECS:
    if spec.flag in exclude:
      continue
    opt, name = spec.option, spec.flag
    default = defaults.get(name)
    kw = dict(help=_help(spec, default), flag_values=fv)
    if opt.choices is not None:
      flags.DEFINE_enum(name, default, list(opt.choices), **kw)
    elif opt.auto:  # a number or 'auto': parsed by _convert.
      flags.DEFINE_string(name, default, **kw)
    elif spec.kind == "bool":
      flags.DEFINE_bool(name, default, **kw)
    elif spec.kind == "int":
      flags.DEFINE_integer(name, default, **_int_bounds(opt), **kw)
    elif spec.kind == "float":
      flags.DEFINE_float(name, default, **kw)
    elif spec.kind in ("str", "json"):
      flags.DEFINE_string(name, default, **kw)
    else:
      flags.DEFINE_list(name, default, **kw)


def _int_bounds(opt: options.Option) -> dict[str, int | None]:
  """An int option's bounds, as absl's inclusive ones.

  absl checks them as the flag is parsed, so that e.g. --num_clients=-5 is
  reported as such, not as a concurrency error.
  """
  lo = hi = None
  if opt.low is not None:
    lo = (math.ceil(opt.low) if opt.low_inclusive else
          math.floor(opt.low) + 1)
  if opt.high is not None:
    hi = (math.floor(opt.high) if opt.high_inclusive else
          math.ceil(opt.high) - 1)
  return dict(lower_bound=lo, upper_bound=hi)


def define_run_flags(fv: flags.FlagValues = flags.FLAGS) -> None:
  """Registers launch.main's --workdir and the checkpoint flags."""
  flags.DEFINE_string("workdir", None, "output directory; default "
                      "runs/<algorithm>-<first 8 hex of the config hash>, so "
                      "re-running a command resumes it", flag_values=fv)
  flags.DEFINE_string(
      "compilation_cache", "auto", "JAX's persistent compilation cache: "
      "'auto' ($JAX_COMPILATION_CACHE_DIR if set, else <user cache>/"
      "ftte_jax/jax_cache, the user cache being $XDG_CACHE_HOME or "
      "~/.cache), 'off', or a directory; a second run of the same "
      "programs then skips their compilation (summary.json's "
      "compilation_cache says which hit)", flag_values=fv)
  define_checkpoint_flags(fv)
  define_distributed_flags(fv)
  define_cpu_devices_flag(fv)


def define_cpu_devices_flag(fv: flags.FlagValues = flags.FLAGS) -> None:
  """Registers --cpu_devices (``set_cpu_devices``)."""
  flags.DEFINE_string(
      "cpu_devices", "auto", "XLA devices the host CPU is split into, which "
      "the clients mesh spans (--mesh_devices): 'auto' (one per core this "
      f"process may use, at most {MAX_AUTO_CPU_DEVICES}; left to JAX when "
      "$XLA_FLAGS' --xla_force_host_platform_device_count or "
      "$JAX_NUM_CPU_DEVICES sets the count, or the run spans processes) or "
      "an integer >= 1. Each CPU device keeps its own copy of the clients' "
      "data; accelerators are unaffected", flag_values=fv)


# Each CPU device holds a replica of the environment (the clients' data),
# so auto stops here; an explicit --cpu_devices may go higher.
MAX_AUTO_CPU_DEVICES = 8


def cpu_devices_count(setting: str, distributed: bool = False,
                      environ: typing.Mapping[str, str] | None = None,
                      cores: int | None = None) -> int | None:
  """The CPU device count ``--cpu_devices=setting`` asks for; None leaves
  JAX's own (one device, or what the environment sets).

  Raises:
    ValueError: naming --cpu_devices, for a value neither 'auto' nor an
      integer >= 1.
  """
  environ = os.environ if environ is None else environ
  if setting != "auto":
    try:
      count = int(setting)
    except ValueError:
      count = 0
    if count < 1 or str(count) != setting:
      raise ValueError(f"--cpu_devices={setting!r}: valid: 'auto' or an "
                       "integer >= 1")
    return count
  if (distributed or "JAX_NUM_CPU_DEVICES" in environ or
      "xla_force_host_platform_device_count" in environ.get("XLA_FLAGS", "")):
    return None
  if cores is None:
    cores = (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
             else os.cpu_count() or 1)
  return min(cores, MAX_AUTO_CPU_DEVICES)


def set_cpu_devices(setting: str, distributed: bool = False) -> int | None:
  """Splits the host CPU into ``cpu_devices_count(setting, distributed)``
  XLA devices (nothing when None); returns the count set.

  One XLA:CPU device runs a step's small per-client matmuls on all cores
  at once and leaves most of them idle; a device per core, each training
  its share of the clients on the clients mesh, ran the FedJAX workload's
  MLP step 1.59x and LeNet-5's 1.24x faster on the 2-core CPU
  (``experiments/benchmarks/cpu_devices.py``). Must run before anything
  touches a JAX backend.
  """
  count = cpu_devices_count(setting, distributed)
  if count is None:
    return None
  import jax  # pylint: disable=g-import-not-at-top
  try:
    jax.config.update("jax_num_cpu_devices", count)
  except AttributeError:  # a JAX before the option: XLA's flag does it.
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") +
        f" --xla_force_host_platform_device_count={count}").strip()
  return count


def define_distributed_flags(fv: flags.FlagValues = flags.FLAGS) -> None:
  """Registers the flags of a multi-process run (``jax.distributed``)."""
  flags.DEFINE_string(
      "coordinator_address", None, "host:port of process 0 of a "
      "multi-process run (jax.distributed); give --num_processes and "
      "--process_id with it", flag_values=fv)
  flags.DEFINE_integer("num_processes", None, "processes of a multi-process "
                       "run", lower_bound=1, flag_values=fv)
  flags.DEFINE_integer("process_id", None, "this process's index in [0, "
                       "--num_processes)", lower_bound=0, flag_values=fv)
  flags.DEFINE_bool(
      "distributed", False, "start jax.distributed from the cluster's "
      "environment (SLURM, TPU pods, GKE and the other environments JAX "
      "detects) when no --coordinator_address is given", flag_values=fv)


def init_distributed(fv: flags.FlagValues = flags.FLAGS) -> bool:
  """Starts JAX's multi-controller runtime when the flags ask for it.

  Every process then runs the same program on the global device mesh;
  process 0 writes the outputs (``launch.main``). Must run before anything
  touches a JAX backend. Returns whether it started.
  """
  given = [fv[n].value is not None for n in
           ("coordinator_address", "num_processes", "process_id")]
  if not (any(given) or fv.distributed):
    return False
  if any(given) and not all(given):
    fail("--coordinator_address, --num_processes and --process_id go "
         "together (or pass --distributed alone to detect the cluster)")
  if all(given) and fv.process_id >= fv.num_processes:
    fail(f"--process_id={fv.process_id} must be below --num_processes="
         f"{fv.num_processes}")
  import jax  # pylint: disable=g-import-not-at-top
  # CPU processes reach each other through gloo; accelerators ignore it.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  try:
    jax.distributed.initialize(fv.coordinator_address, fv.num_processes,
                               fv.process_id)
  except (RuntimeError, ValueError) as e:
    fail(f"jax.distributed could not start ({one_line(e)}); check "
         "--coordinator_address, --num_processes and --process_id")
  return True


def enable_compilation_cache(setting: str) -> str | None:
  """Points JAX's persistent compilation cache at ``setting`` (see the
  --compilation_cache flag); returns the directory, or None when off."""
  if setting == "off":
    return None
  if setting.lower() in ("false", "no", "0", "none", "true", "yes", "1", "on",
                         ""):
    # A boolean-looking value would otherwise become a cache directory of
    # that name in the working directory.
    fail(f"--compilation_cache={setting!r}: not a setting; valid: 'auto', "
         "'off' or a directory")
  if setting == "auto":
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(
        os.path.expanduser("~"), ".cache")
    # JAX's own variable, when set, names the cache the user chose.
    setting = os.environ.get("JAX_COMPILATION_CACHE_DIR") or os.path.join(
        cache, "ftte_jax", "jax_cache")
  try:
    os.makedirs(setting, exist_ok=True)
  except OSError as e:
    fail(f"--compilation_cache={setting}: cannot create it ({e.strerror}); "
         "pass another directory or 'off'")
  import jax  # pylint: disable=g-import-not-at-top
  jax.config.update("jax_compilation_cache_dir", setting)
  if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
    # Every program, however small (JAX's default keeps only those over
    # 1 s): a warm start of vs_fedjax.py's MLP workload otherwise compiles
    # ~0.45 s of small build programs again on the 2-core CPU.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  return setting


def define_download_flag(fv: flags.FlagValues = flags.FLAGS) -> None:
  """Registers --download, beside the data flags (--dataset, --data_dir)."""
  flags.DEFINE_enum(
      "download", "auto", ["auto", "never"], "what to do when the files of "
      "--dataset (mnist, fashion_mnist, cifar10; femnist and shakespeare in "
      "TFF's format) are missing from the data directory (--data_dir, else "
      "$FTTE_DATA_DIR, else ~/.cache/ftte_jax): 'auto' downloads them "
      "there, SHA-256 checked, before anything else is written; 'never' "
      "exits 2 saying what to fetch and where", flag_values=fv)


def ensure_data(config, mode: str) -> None:
  """Downloads a missing downloadable dataset (``mode`` 'auto'), or exits 2
  in one line saying what to fetch, where to put it, and which datasets need
  no files."""
  from ftte_jax.data import datasets  # pylint: disable=g-import-not-at-top
  name, data_dir = config.data.dataset, config.data.data_dir
  missing = datasets.missing_files(name, data_dir, config.data.source)
  if not missing:
    return
  root = datasets.default_data_dir(data_dir)
  no_files = "; --dataset=synthetic and --dataset=tiny need no files"
  natural = name in datasets.NATURAL_FILES
  if natural:
    problem = datasets.natural_problem(name, root, config.data.source, mode)
    if problem:
      fail(f"--dataset={name}: {problem}{no_files}")
  if mode == "never":
    fail(f"--dataset={name}: {missing[0]} not found and --download=never; "
         f"{datasets.fetch_hint(name, root)}{no_files}")
  try:
    # MNIST's default pool split reads only the test files.
    datasets.download(name, root, split="test" if name == "mnist" else None)
  except datasets.DatasetNotFoundError as e:
    leaf = (f"; or {datasets.natural.how_to_get(root, name)}" if natural
            else "")
    fail(f"--dataset={e.short}{leaf}{no_files}")
  except datasets.DatasetFormatError as e:
    fail(f"--dataset={name}: download refused and deleted: {e}")
  except OSError as e:
    fail(f"--dataset={name}: cannot write the data directory {root} "
         f"({e.strerror}); set --data_dir or $FTTE_DATA_DIR")


def define_checkpoint_flags(fv: flags.FlagValues = flags.FLAGS) -> None:
  """Registers ``CHECKPOINT_FLAGS``; sweep and compare pass them to runs."""
  flags.DEFINE_integer("checkpoint_every", 25, "save a checkpoint every this "
                       "many server steps (and at the end); sweep and "
                       "compare pass it to every run", lower_bound=1,
                       flag_values=fv)
  flags.DEFINE_integer("keep_checkpoints", 3, "most recent checkpoints kept "
                       "(per run)", lower_bound=1, flag_values=fv)
  flags.DEFINE_bool("overwrite", False, "discard whatever a run's --workdir "
                    "holds and start fresh", flag_values=fv)


def checkpoint_args(fv: flags.FlagValues = flags.FLAGS) -> list[str]:
  """``CHECKPOINT_FLAGS`` as launch.main arguments, to pass on to a run."""
  return [fv[name].serialize() for name in CHECKPOINT_FLAGS]


def _convert(spec: FlagSpec, value) -> Any:
  if spec.option.auto and isinstance(value, str):
    if value == options.AUTO:
      return value
    try:
      return int(value) if spec.kind == "int" else float(value)
    except ValueError:
      raise ValueError(f"{spec.flag} must be {options.describe(spec.option)}"
                       f", got {value!r}") from None
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
    if spec.option.optional and [v.lower() for v in value] in (["none"], []):
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


def _given(fv: flags.FlagValues) -> tuple[str, dict[str, dict], dict]:
  """(preset name, section -> {field: value}, flag -> raw value given)."""
  name = (fv[PRESET_FLAG].value if PRESET_FLAG in fv else
          algorithms.EngineConfig.algorithm)
  parts: dict[str, dict] = {section: {} for section, _ in _SECTIONS}
  given = {}
  for spec in SPECS:
    if spec.flag == PRESET_FLAG or spec.flag not in fv:
      continue
    value = fv[spec.flag].value
    if value is None:
      continue
    given[spec.flag] = value
    parts[spec.section][spec.field] = _convert(spec, value)
  return name, parts, given


def resolve(fv: flags.FlagValues = flags.FLAGS) -> Resolved:
  """Builds and validates the ExperimentConfig that parsed flags describe.

  Raises:
    ValueError: an invalid option; the message starts with its name.
  """
  name, parts, given = _given(fv)
  engine = algorithms.preset(name, **parts["engine"])
  data = experiment.DataConfig(**parts["data"])
  if data.data_dir is not None and not os.path.isdir(data.data_dir):
    raise ValueError(f"data_dir: no such directory {data.data_dir!r}")
  if data.npz_path is not None and not os.path.isfile(data.npz_path):
    raise ValueError(f"npz_path: no such file {data.npz_path!r}")
  config = experiment.ExperimentConfig(
      engine=engine, data=data, fleet=fleet_lib.FleetConfig(**parts["fleet"]),
      search=experiment.SearchConfig(**parts["search"]),
      pretrain=experiment.PretrainConfig(**parts["pretrain"]), **parts[""])
  experiment.validate(config)
  # 'auto' options take their dataset's values here, so config.json (and
  # the workdir's hash) holds the values the run uses.
  config = experiment.resolve(config)
  check_updates_can_arrive(config)
  if config.init_checkpoint:  # reads one small JSON file.
    experiment.check_checkpoint(config)
  return Resolved(config, given)


def check_updates_can_arrive(config: experiment.ExperimentConfig) -> None:
  """Refuses what the flags alone show can never deliver an update: every
  task abandoned (``--dropout=1``, or a trace whose every device has
  dropout 1). The build refuses the rest it can know (devices eligible for
  their mask, the deadline: ``experiment.build``); a run that still gets
  no update stops with ``stopped_by: "no_updates"``.

  Raises:
    ValueError: naming the flag or the trace file.
  """
  fleet = config.fleet
  if fleet.trace_path is None:
    if fleet.dropout >= 1:
      raise ValueError(f"dropout={fleet.dropout:g}: every task is abandoned, "
                       "so no update can ever arrive; valid: below 1")
    return
  drop = _trace_dropouts(fleet.trace_path)
  if drop is not None and len(drop) and min(drop) >= 1:
    raise ValueError(f"trace_path={fleet.trace_path}: every device has "
                     "dropout 1 (abandons every task), so no update can "
                     "ever arrive")


def _trace_dropouts(path: str) -> list[float] | None:
  """The trace's dropout column; None where it cannot be read as numbers
  (the build then names the file and line)."""
  import csv  # pylint: disable=g-import-not-at-top
  try:
    with open(path, newline="", encoding="utf-8-sig") as f:
      return [float(r["dropout"]) for r in csv.DictReader(f)]
  except (OSError, ValueError, KeyError, TypeError):
    return None


def given_args(fv: flags.FlagValues = flags.FLAGS) -> list[str]:
  """The config flags set on ``fv`` (--algorithm first) as arguments."""
  return [fv[spec.flag].serialize() for spec in SPECS
          if spec.flag in fv and fv[spec.flag].value is not None]


def flag_values(fv: flags.FlagValues, extra: Sequence[str] = ()) -> dict:
  """The config flags set on ``fv`` and the ``extra`` ones, by name."""
  out = {s.flag: fv[s.flag].value for s in SPECS
         if s.flag in fv and fv[s.flag].value is not None}
  out.update((name, fv[name].value) for name in extra)
  return out


def section_flags(section: str) -> frozenset[str]:
  """The config flags of one section ("engine", "data", ..., "": top)."""
  return frozenset(s.flag for s in SPECS if s.section == section)


def _flag_of(arg: str) -> str:
  return arg.split("=", 1)[0].lstrip("-")


def for_algorithm(args: Sequence[str], algorithm: str,
                  extra: Sequence[str] = ()) -> list[str]:
  """Config arguments that run ``algorithm`` on a shared setup.

  ``args`` set what several presets share; ``extra`` are this algorithm's
  own and come last. Each option the preset pins (``algorithms.pinned``)
  that ``extra`` does not set takes its pinned value in place of the shared
  one: fedasync gets --buffer_size=1, fedavg --concurrency equal to its
  buffer size.

  Raises:
    ValueError: bad flag syntax or an unknown algorithm.
  """
  args = expand_args(args)
  _, parts, _ = _given(_parse_args([*args, *extra]))
  engine_flags = {s.field: s.flag for s in SPECS if s.section == "engine"}
  own = {_flag_of(a) for a in extra}
  pins = {engine_flags[k]: v
          for k, v in algorithms.pinned(algorithm, parts["engine"]).items()
          if engine_flags[k] not in own}
  kept = [a for a in args if _flag_of(a) not in {PRESET_FLAG, *pins}]
  return [*kept, f"--{PRESET_FLAG}={algorithm}",
          *(f"--{k}={v}" for k, v in pins.items()), *extra]


def _parse_args(args: Sequence[str]) -> flags.FlagValues:
  fv = flags.FlagValues()
  define_config_flags(fv)
  try:
    rest = fv(["resolve"] + list(args))
  except flags.Error as e:
    raise ValueError(one_line(e)) from None
  except UnicodeDecodeError as e:
    raise ValueError(_undecodable_flagfile(args, e)) from None
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
  if m and m.group(1) in FLAG_NAMES | {"workdir", *CHECKPOINT_FLAGS}:
    msg = "--" + msg
  return msg


def fail(message: BaseException | str) -> typing.NoReturn:
  """Prints one line to stderr and exits with status 2 (bad input)."""
  prog = os.path.basename(sys.argv[0]) if sys.argv else "launch"
  print(f"{prog}: error: {one_line(message)}", file=sys.stderr, flush=True)
  sys.exit(EXIT_USAGE)


def _undecodable_flagfile(args: Sequence[str], error: UnicodeDecodeError
                          ) -> str:
  """Names the flagfile among ``args`` that is not UTF-8 (absl reads them
  as text and lets the codec's error through, naming no file)."""
  for arg in args:
    if arg.startswith(("--flagfile=", "-flagfile=")):
      path = arg.split("=", 1)[1]
      try:
        with open(path, encoding="utf-8") as f:
          f.read()
      except UnicodeDecodeError as e:
        return (f"--flagfile={path}: not UTF-8 text ({e.reason} at byte "
                f"{e.start})")
      except OSError:
        continue
  return f"--flagfile: a flagfile is not UTF-8 text ({error.reason})"


# pylint: disable=protected-access
def _bom_tolerant(read):
  """absl's flagfile reader, accepting a UTF-8 byte-order mark.

  absl reads a flagfile as text, so the mark some editors write first
  sticks to the first line: that line becomes a positional argument, and a
  comment or a nested --flagfile there is missed. A flag line never starts
  with U+FEFF, so any that does is the start of a file, read again here.
  """

  def read_lines(self, filename, parsed_file_stack=None):
    out = []
    for line in read(self, filename, parsed_file_stack):
      if line.startswith("\ufeff"):
        line = line[1:].strip()
        if not line or line.startswith(("#", "//")):
          continue
        if self._is_flag_file_directive(line):
          nested = self._extract_filename(line)
          out.extend(read_lines(self, nested, parsed_file_stack))
          continue
      out.append(line)
    return out

  read_lines.bom_tolerant = True
  return read_lines


_READ_FLAGFILE = flags.FlagValues._get_flag_file_lines
if not getattr(_READ_FLAGFILE, "bom_tolerant", False):
  flags.FlagValues._get_flag_file_lines = _bom_tolerant(_READ_FLAGFILE)
# pylint: enable=protected-access


def parse_or_exit(argv: list[str]) -> list[str]:
  """``flags_parser`` for ``app.run``: a parse error exits 2 in one line."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    fail(e)
  except UnicodeDecodeError as e:
    fail(_undecodable_flagfile(argv, e))


def run_app(define: typing.Callable[[], None],
            main: typing.Callable[[list[str]], None]) -> None:
  """A script's entry point: registers its flags, then runs ``main`` under
  absl with the one-line error parser (``parse_or_exit``)."""
  from absl import app  # pylint: disable=g-import-not-at-top
  define()
  app.run(main, flags_parser=parse_or_exit)


def checked_main(check: typing.Callable[[flags.FlagValues], Any],
                 run: typing.Callable[[flags.FlagValues], Any]
                 ) -> typing.Callable[[list[str]], None]:
  """An absl ``main`` that refuses positional arguments and runs ``check``
  on the flags first (a ValueError exits 2 in one line), so every run's
  options are checked before any run starts."""

  def main(argv: list[str]) -> None:
    if len(argv) > 1:
      fail(f"unexpected positional arguments {argv[1:]}")
    try:
      check(flags.FLAGS)
    except ValueError as e:
      fail(e)
    run(flags.FLAGS)

  return main
