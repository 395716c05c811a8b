r"""Writes docs/flags.md, the flag reference, from the option declarations.

  python -m launch.flags_doc            # rewrite docs/flags.md
  python -m launch.flags_doc --check    # exit 1 if it is stale

The config flags come from ``launch.flags.SPECS``: each option declared once
on a config field (``ftte_jax.core.options.option``) with its help, valid
values and default, grouped by the config class it belongs to. Engine
options take their defaults from the ``--algorithm`` preset; the page shows
ftte's and names the presets that differ. Then the other flags of
``launch.main`` (output, checkpoints, devices, progress), read from absl as
``launch.main.define_flags`` registers them. ``tests/test_docs.py`` fails
when the committed page differs from this output.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path
from typing import Any, Sequence

from absl import flags

from launch import flags as flags_lib

REPO = Path(__file__).resolve().parents[1]
OUT = Path("docs") / "flags.md"

# section -> (heading, config class, a sentence about the section).
SECTIONS = {
    "engine": ("Algorithm and engine", "EngineConfig",
               "How the server aggregates, how clients train, and the event "
               "loop. Defaults come from the --algorithm preset: the column "
               "gives ftte's, and the presets whose default differs."),
    "data": ("Data", "DataConfig", "The dataset and how it is split into "
             "clients."),
    "fleet": ("Fleet", "FleetConfig", "The simulated devices: speed, "
              "links, memory, availability, energy."),
    "search": ("Search", "SearchConfig", "Which part of the model each "
               "memory tier trains (FTTE's sparse parameter search)."),
    "pretrain": ("Pretraining", "PretrainConfig", "Central training on the "
                 "server's proxy set before the federated run."),
    "": ("Run", "ExperimentConfig", "The run as a whole: model, length, "
         "evaluation, seeds, memory tiers."),
}


def _value(kind: str, v: Any) -> str:
  """A value as it is written on the command line."""
  if v is None:
    return "None"
  if kind == "floats":
    return ",".join(f"{x:g}" for x in v) or "(empty)"
  if kind == "json":
    return json.dumps(v)
  if kind == "bool" or isinstance(v, bool):
    return "true" if v else "false"
  if kind == "float":
    return f"{v:g}"
  return str(v)


def _cell(text: str) -> str:
  return " ".join(str(text).split()).replace("|", "\\|")


def _code(text: str) -> str:
  return f"`{text}`" if text else "` `"


def _valid(spec: flags_lib.FlagSpec) -> str:
  from ftte_jax.core import options  # pylint: disable=g-import-not-at-top
  opt = spec.option
  if opt.choices is not None:
    text = ", ".join(_code(str(c)) for c in opt.choices)
  else:
    text = options.describe(opt)
  return text + (" or None" if opt.optional else "")


def _engine_defaults() -> dict[str, dict[str, Any]]:
  """preset -> engine field -> the launcher's default under that preset."""
  from ftte_jax.core import algorithms  # pylint: disable=g-import-not-at-top
  out = {}
  for name in algorithms.PRESETS:
    engine = flags_lib.resolve_args([f"--algorithm={name}"]).config.engine
    out[name] = {f: getattr(engine, f) for f in engine.__dataclass_fields__}
  return out


def _default(spec: flags_lib.FlagSpec, presets: dict) -> str:
  kind = spec.kind
  if spec.section != "engine" or spec.flag == flags_lib.PRESET_FLAG:
    return _code(_value(kind, spec.option.default))
  ftte = presets["ftte"][spec.field]
  text = _code(_value(kind, ftte))
  others = [f"{name}: {_code(_value(kind, values[spec.field]))}"
            for name, values in presets.items()
            if name != "ftte" and values[spec.field] != ftte]
  return text + (f" ({'; '.join(others)})" if others else "")


def _config_section(section: str, presets: dict) -> list[str]:
  heading, cls, about = SECTIONS[section]
  lines = [f"## {heading} (`{cls}`)", "", about, "",
           "| flag | default | valid values | what it sets |",
           "|---|---|---|---|"]
  for spec in flags_lib.SPECS:
    if spec.section != section:
      continue
    lines.append(f"| `--{spec.flag}` | {_default(spec, presets)} | "
                 f"{_cell(_valid(spec))} | {_cell(spec.option.help)} |")
  return lines


def _run_section() -> list[str]:
  from launch import main  # pylint: disable=g-import-not-at-top
  fv = flags.FlagValues()
  main.define_flags(fv)
  lines = ["## Other flags of `launch.main`", "",
           "Where a run writes, checkpoints, devices and processes, and "
           "how it reports progress.", "",
           "| flag | default | valid values | what it sets |",
           "|---|---|---|---|"]
  for name in fv:
    if name in flags_lib.FLAG_NAMES:
      continue
    flag = fv[name]
    values = getattr(flag.parser, "enum_values", None)
    kind = flag.flag_type()
    if values:
      valid = ", ".join(_code(v) for v in values)
    else:
      valid = {"bool": "true or false", "int": "an integer",
               "float": "a number",
               "comma separated list of strings": "a comma-separated list"
               }.get(kind, "a string")
      lo = getattr(flag.parser, "lower_bound", None)
      if lo is not None:
        valid += f" >= {lo}"
    default = flag.default
    if isinstance(default, list):
      default = ",".join(map(str, default)) or "(none)"
    shown = _code(_value("bool" if kind == "bool" else "str", default))
    # absl starts an enum's help with its values, shown in their column.
    text = re.sub(r"^<[^>]*>: ", "", flag.help)
    lines.append(f"| `--{name}` | {shown} | {_cell(valid)} | "
                 f"{_cell(text)} |")
  return lines


def render() -> str:
  """The text of docs/flags.md."""
  unknown = {s.section for s in flags_lib.SPECS} - set(SECTIONS)
  if unknown:
    raise ValueError(f"config sections without a heading in "
                     f"launch/flags_doc.py SECTIONS: {sorted(unknown)}")
  presets = _engine_defaults()
  lines = [
      "# Flag reference", "",
      "Generated by `python -m launch.flags_doc` from the option "
      "declarations; do not edit by hand (`tests/test_docs.py` fails when "
      "this page is stale).", "",
      "Every option of a run is a flag of `python -m launch.main`; "
      "`launch.sweep`, `experiments.compare` and the experiment scripts "
      "take the same flags and pass them on. Each option is declared once, "
      "on a field of a config class (`ftte_jax/core/options.py`), and that "
      "declaration gives its flag, its check, its error message and this "
      "page. A flag left out takes the default shown; a value outside the "
      "valid ones exits with status 2 and one line naming the flag. "
      "`--flagfile=FILE` reads flags from a file, one a line "
      "(`experiments/*.flags`).", "",
      "Presets of `--algorithm`: " + ", ".join(
          f"`{p}`" for p in presets) + ".",
  ]
  for section in SECTIONS:
    if any(s.section == section for s in flags_lib.SPECS):
      lines += [""] + _config_section(section, presets)
  lines += [""] + _run_section()
  return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--check", action="store_true",
                 help="exit 1 if docs/flags.md differs from what would be "
                 "written")
  a = p.parse_args(argv)
  return write_page(REPO / OUT, render(), a.check, "launch.flags_doc")


def write_page(path: Path, text: str, check: bool, module: str) -> int:
  """Writes a generated page, or with ``check`` returns 1 (saying which
  command rewrites it) when the page on disk differs from ``text``."""
  if check:
    if not path.exists() or path.read_text() != text:
      print(f"{path.name} is stale: run python -m {module}", file=sys.stderr)
      return 1
    return 0
  os.makedirs(path.parent, exist_ok=True)
  path.write_text(text)
  print(path)
  return 0


if __name__ == "__main__":
  sys.exit(main())
