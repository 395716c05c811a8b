"""Config options declared once: default, help and valid values together.

A config dataclass declares each field with ``option(default, help=...,
choices=..., low=..., high=...)``. From that one declaration
``check_fields`` validates an instance, ``describe`` words the valid values
(for error messages and ``--help`` alike) and ``options`` lists what a
launcher needs to build flags (``launch/flags.py``), so validation, errors
and help cannot drift apart. Checks that involve several fields stay in the
owning module's ``validate``.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import functools
import math
import numbers
import types
import typing
from typing import Any

_KEY = "ftte_option"  # dataclasses.Field.metadata key of an Option.
# The value of an option declared with ``auto=True`` that a later step
# resolves from other options (e.g. from the dataset); see ``is_auto``.
AUTO = "auto"


@dataclasses.dataclass(frozen=True)
class Option:
  """One config field: what it means and which values are valid.

  ``option`` fills the declared part; ``options(cls)`` adds the rest from the
  field's type and default.
  """

  help: str  # what the option does (no valid values, no default).
  choices: tuple | None = None  # the valid values, if a fixed set.
  low: float | None = None  # lower bound (each entry, for a list).
  high: float | None = None  # upper bound (each entry, for a list).
  low_inclusive: bool = True
  high_inclusive: bool = True
  finite: bool = True  # reject nan and +-inf (numbers only).
  nonempty: bool = False  # lists only.
  ascending: bool = False  # lists only: non-decreasing.
  auto: bool = False  # the string 'auto' is valid too (resolved later).
  name: str = ""  # public name (flag, errors); the field's name if empty.
  # Filled by ``options(cls)``:
  field: str = ""  # dataclass field name.
  kind: str = ""  # bool | int | float | str | floats | json | config.
  optional: bool = False  # the type admits None.
  default: Any = None  # the default value (default_factory called).


# pylint: disable-next=redefined-builtin
def option(default: Any = dataclasses.MISSING, *, help: str,
           default_factory: Any = dataclasses.MISSING,
           choices: collections.abc.Iterable | None = None,
           low: float | None = None, high: float | None = None,
           low_inclusive: bool = True, high_inclusive: bool = True,
           finite: bool = True, nonempty: bool = False,
           ascending: bool = False, auto: bool = False,
           name: str = "") -> Any:
  """A dataclass field carrying its help text and valid values.

  Args:
    default: the default value (or give ``default_factory``).
    help: what the option does, without valid values or default (those are
      derived from the other arguments).
    default_factory: as in ``dataclasses.field``.
    choices: the valid values, e.g. a library's tuple of names.
    low: lower bound of a number (of each entry of a list).
    high: upper bound.
    low_inclusive: whether ``low`` itself is valid.
    high_inclusive: whether ``high`` itself is valid.
    finite: reject nan and infinities.
    nonempty: a list needs at least one entry.
    ascending: a list must be non-decreasing.
    auto: the string ``AUTO`` ('auto') is valid too: a value that a later
      step resolves from other options (the field's type is then e.g.
      ``int | str``, its kind that of the first type).
    name: public name when it differs from the field's (flag, errors).

  Returns:
    A ``dataclasses.field``.
  """
  meta = Option(help=help, choices=None if choices is None else tuple(choices),
                low=low, high=high, low_inclusive=low_inclusive,
                high_inclusive=high_inclusive, finite=finite,
                nonempty=nonempty, ascending=ascending, auto=auto,
                name=name)
  return dataclasses.field(default=default, default_factory=default_factory,
                           metadata={_KEY: meta})


def _kind(tp) -> tuple[str, bool]:
  """Maps a field's type to (kind, optional)."""
  optional = False
  if typing.get_origin(tp) in (typing.Union, types.UnionType):
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
  if dataclasses.is_dataclass(tp):
    return "config", optional
  raise TypeError(f"no option kind for type {tp!r}")


@functools.cache
def options(cls) -> tuple[Option, ...]:
  """The options of config class ``cls``, in field order.

  Raises:
    TypeError: a field not declared with ``option``.
  """
  hints = typing.get_type_hints(cls)
  out = []
  for f in dataclasses.fields(cls):
    meta = f.metadata.get(_KEY)
    if meta is None:
      raise TypeError(f"{cls.__name__}.{f.name} is not declared with "
                      "options.option")
    kind, optional = _kind(hints[f.name])
    default = (f.default_factory() if f.default is dataclasses.MISSING
               else f.default)
    out.append(dataclasses.replace(meta, name=meta.name or f.name,
                                   field=f.name, kind=kind,
                                   optional=optional, default=default))
  return tuple(out)


def _range(opt: Option) -> str:
  """Words a number's type and bounds, e.g. 'a number in [0, 1)'."""
  integer = opt.kind == "int"
  lo, hi = opt.low, opt.high
  if lo is not None and hi is not None:
    return (f"{'an integer' if integer else 'a number'} in "
            f"{'[' if opt.low_inclusive else '('}{lo:g}, {hi:g}"
            f"{']' if opt.high_inclusive else ')'}")
  noun = ("an integer" if integer else
          "a finite number" if opt.finite else "a number")
  if lo == 0 and not opt.low_inclusive and hi is None:
    return "a positive " + noun.split(" ", 1)[1]
  if lo is not None:
    return f"{noun} {'>=' if opt.low_inclusive else '>'} {lo:g}"
  if hi is not None:
    return f"{noun} {'<=' if opt.high_inclusive else '<'} {hi:g}"
  return noun


def is_auto(opt: Option, value) -> bool:
  """Whether ``value`` is the 'auto' of an option that admits it."""
  return opt.auto and isinstance(value, str) and value == AUTO


def describe(opt: Option) -> str:
  """The valid values of ``opt`` in words, e.g. 'an integer >= 1'."""
  if opt.auto:
    return _describe(dataclasses.replace(opt, auto=False)) + f" or {AUTO!r}"
  return _describe(opt)


def _describe(opt: Option) -> str:
  if opt.choices is not None:
    return f"one of {opt.choices}"
  if opt.kind in ("int", "float"):
    return _range(opt)
  if opt.kind == "floats":
    text = ("a " + ("non-empty " if opt.nonempty else "") +
            ("ascending " if opt.ascending else "") + "list of numbers")
    if opt.low is not None or opt.high is not None:
      text += ", each " + _range(dataclasses.replace(opt, kind="float"))
    return text
  return {"bool": "true or false", "json": "a dict (a JSON object)",
          "str": "a string", "config": "a config"}[opt.kind]


def _number_ok(opt: Option, value, integer: bool) -> bool:
  if isinstance(value, bool):
    return False
  if integer:
    if not isinstance(value, int):
      return False
  elif not isinstance(value, numbers.Real):
    return False
  # Written so that nan fails every comparison it meets.
  bounded = opt.low is not None and opt.high is not None
  if not integer and (opt.finite or bounded) and not math.isfinite(value):
    return False
  if opt.low is not None and not (value >= opt.low if opt.low_inclusive
                                  else value > opt.low):
    return False
  if opt.high is not None and not (value <= opt.high if opt.high_inclusive
                                   else value < opt.high):
    return False
  return True


def _valid(opt: Option, value) -> bool:
  if opt.choices is not None:
    return value in opt.choices
  if opt.kind in ("int", "float"):
    return _number_ok(opt, value, opt.kind == "int")
  if opt.kind == "floats":
    if isinstance(value, (str, bytes)) or not isinstance(
        value, collections.abc.Sequence):
      return False
    values = list(value)
    return (bool(values or not opt.nonempty) and
            all(_number_ok(opt, v, False) for v in values) and
            (not opt.ascending or values == sorted(values)))
  if opt.kind == "bool":
    return isinstance(value, bool)
  if opt.kind == "json":
    return isinstance(value, dict)
  if opt.kind == "str":
    return isinstance(value, str)
  return True  # A nested config is checked by its own module.


# Numbers end up in float32 and int32 arrays (JAX without x64): a value
# valid in Python but not representable there is refused, not rounded to
# inf or wrapped.
FLOAT32_MAX = 3.4028234663852886e38
INT32_MAX = 2**31 - 1


def _out_of_storage(opt: Option, value) -> str | None:
  """Why ``value`` cannot be stored as the engine stores it, or None."""
  values = (list(value) if opt.kind == "floats" and isinstance(
      value, collections.abc.Sequence) else [value])
  for v in values:
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
      continue
    if opt.kind == "int" and isinstance(v, int) and abs(v) > INT32_MAX:
      return f"fit int32 (|value| <= {INT32_MAX})"
    if (opt.kind in ("float", "floats") and math.isfinite(v) and
        abs(v) > FLOAT32_MAX):
      return f"fit float32 (|value| <= {FLOAT32_MAX:.4g})"
  return None


def check(opt: Option, value) -> None:
  """Raises ValueError, starting with the option's name, if value is invalid."""
  if (value is None and opt.optional) or is_auto(opt, value):
    return
  overflow = None if value is None else _out_of_storage(opt, value)
  if overflow:
    raise ValueError(f"{opt.name} must {overflow}, got {value!r}")
  if value is None or not _valid(opt, value):
    shown = list(value) if isinstance(value, tuple) else value
    raise ValueError(f"{opt.name} must be {describe(opt)}"
                     f"{' or None' if opt.optional else ''}, got {shown!r}")


def check_fields(config) -> None:
  """Checks every field of a config instance against its declaration.

  Raises:
    ValueError: the first invalid field; the message starts with its name
      and states the valid values.
  """
  for opt in options(type(config)):
    check(opt, getattr(config, opt.field))
