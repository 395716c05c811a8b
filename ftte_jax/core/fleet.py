"""Simulated devices: memory, compute speed, bandwidth, availability, tier.

Profiles are drawn once per run (numpy, seeded) from named distributions or
read from a CSV trace, then live on the device as a ``Fleet`` pytree that the
jitted server step reads to sample task durations (docs/design.md, "Fleet").

Trace CSV format: a header row, then one row per device, with columns

  ``speed_flops``     sustained training compute, FLOP/s (> 0)
  ``bw_up``           uplink bandwidth, bytes/s (> 0)
  ``bw_down``         downlink bandwidth, bytes/s (> 0)
  ``memory_bytes``    memory available for training, bytes (> 0)
  ``dropout``         probability a task is abandoned, in [0, 1]
  ``tier``            (optional) integer memory tier label >= 0

Extra columns (e.g. a device id) are ignored.
"""

from __future__ import annotations

import csv
import dataclasses
import math
import numbers
import os
from typing import Sequence, Callable

import jax.numpy as jnp
import numpy as np
from flax import struct

from ftte_jax.core import adversary
from ftte_jax.core import options
from ftte_jax.core.options import option

TRACE_COLUMNS = ("speed_flops", "bw_up", "bw_down", "memory_bytes", "dropout")


@dataclasses.dataclass(frozen=True)
class FleetConfig:
  """How to draw device profiles (ignored fields when ``trace_path`` is set).

  The number of devices is not here: it is the data's ``num_clients``,
  passed to ``make_fleet``. Each field's meaning and valid values are
  declared with it (``options.option``).
  """

  speed_flops: float = option(
      2e9, low=0, low_inclusive=False,
      help="compute speed of a normal device, FLOP/s")
  straggler_fraction: float = option(
      0.0, low=0, high=1, help="fraction of devices that are stragglers")
  straggler_slowdown: float = option(
      10.0, low=1, help="stragglers' speed is divided by this")
  speed_sigma: float = option(
      0.0, low=0, help="lognormal sigma of per-device speed jitter")
  task_sigma: float = option(
      0.0, low=0, help="lognormal sigma of per-task duration jitter")
  bw_up: float = option(1e6, low=0, low_inclusive=False,
                        help="uplink bandwidth, bytes/s")
  bw_down: float = option(4e6, low=0, low_inclusive=False,
                          help="downlink bandwidth, bytes/s")
  dropout: float = option(
      0.0, low=0, high=1,
      help="probability that a task is abandoned (never arrives)")
  memory_tiers: Sequence[float] = option(
      (1e12,), low=0, low_inclusive=False, nonempty=True, ascending=True,
      help="memory (bytes) of each device tier")
  tier_probs: Sequence[float] = option(
      (), low=0, high=1,
      help="probability of each memory tier, one per tier, summing to 1; "
      "uniform when empty")
  malicious_fraction: float = option(
      0.0, low=0, high=1,
      help="fraction of devices that are malicious for the whole run "
      "(drawn by the seed; see ftte_jax.core.adversary)")
  malicious_behavior: str = option(
      "sign_flip", choices=adversary.BEHAVIORS,
      help="what a malicious device sends instead of its update")
  malicious_scale: float = option(
      100.0, low=0, low_inclusive=False,
      help="malicious_behavior='scale': the factor on the update")
  malicious_noise_std: float = option(
      1.0, low=0, low_inclusive=False,
      help="malicious_behavior='noise': std of the Gaussian sent instead")
  trace_path: str | None = option(
      None, help="CSV trace with one row per device (see ftte_jax.core.fleet); "
      "replaces the drawn profiles")


@struct.dataclass
class Fleet:
  """Per-device profiles, on the accelerator."""

  speed: jnp.ndarray  # [N] float32 FLOP/s.
  bw_up: jnp.ndarray  # [N] float32 bytes/s.
  bw_down: jnp.ndarray  # [N] float32 bytes/s.
  memory: jnp.ndarray  # [N] float32 bytes available for training.
  dropout: jnp.ndarray  # [N] float32 probability a task is abandoned.
  tier: jnp.ndarray  # [N] int32 memory tier label.
  task_sigma: jnp.ndarray  # [] float32 lognormal sigma of task jitter.
  # [N] bool malicious devices; None (and attack None) when there are none.
  malicious: jnp.ndarray | None = None
  attack: adversary.Attack | None = struct.field(pytree_node=False,
                                                 default=None)

  @property
  def num_clients(self) -> int:
    return int(self.speed.shape[0])


def validate(config: FleetConfig) -> None:
  """Raises ValueError naming the first invalid option."""
  options.check_fields(config)
  if config.trace_path is not None:
    if not os.path.isfile(config.trace_path):
      raise ValueError(f"trace_path: no such file {config.trace_path!r}")
    return
  if config.tier_probs:
    p = np.asarray(config.tier_probs, np.float64)
    if p.shape != (len(config.memory_tiers),) or not abs(p.sum() - 1) < 1e-6:
      raise ValueError("tier_probs must have one non-negative entry per "
                       f"memory tier ({len(config.memory_tiers)}) summing to "
                       f"1, got {list(config.tier_probs)}")


def _positive_f32(values: np.ndarray,
                  what: Callable[[int], str]) -> jnp.ndarray:
  """``values`` as float32, refused if one becomes 0 or inf on the way.

  ``what(i)`` names the option or file line of entry ``i``.
  """
  out = np.asarray(values, np.float64).astype(np.float32)
  bad = ~np.isfinite(out) | (out <= 0)
  if bad.any():
    i = int(np.argmax(bad))
    raise ValueError(f"{what(i)}: {float(values[i]):g} is outside float32's "
                     "positive range [1.2e-38, 3.4e38]")
  return jnp.asarray(out)


def make_fleet(config: FleetConfig, num_clients: int, seed: int) -> Fleet:
  """Draws (or reads) the profiles of ``num_clients`` devices.

  Deterministic in ``seed``. A trace must hold exactly ``num_clients`` rows.
  """
  validate(config)
  if isinstance(num_clients, bool) or not (
      isinstance(num_clients, numbers.Integral) and num_clients >= 1):
    raise ValueError(f"num_clients must be an integer >= 1, got "
                     f"{num_clients!r}")
  if config.trace_path is not None:
    return with_attackers(
        read_trace(config.trace_path, config.task_sigma, num_clients),
        config, seed)
  return with_attackers(_draw(config, int(num_clients), seed), config, seed)


def with_attackers(fleet: Fleet, config: FleetConfig, seed: int) -> Fleet:
  """``fleet`` with ``config``'s malicious devices marked (none: unchanged)."""
  n_bad = int(round(config.malicious_fraction * fleet.num_clients))
  if n_bad == 0:
    return fleet
  return fleet.replace(
      malicious=jnp.asarray(adversary.draw(config.malicious_fraction,
                                           fleet.num_clients, seed)),
      attack=adversary.Attack(config.malicious_behavior,
                              config.malicious_scale,
                              config.malicious_noise_std))


def _draw(config: FleetConfig, n: int, seed: int) -> Fleet:
  """Profiles drawn from the config's distributions."""
  rng = np.random.default_rng(seed)
  speed = np.full(n, config.speed_flops, np.float64)
  n_slow = int(round(config.straggler_fraction * n))
  slow = rng.permutation(n)[:n_slow]
  speed[slow] /= config.straggler_slowdown
  if config.speed_sigma > 0:
    speed *= rng.lognormal(0.0, config.speed_sigma, n)
  t = len(config.memory_tiers)
  probs = (np.asarray(config.tier_probs) if config.tier_probs else
           np.full(t, 1.0 / t))
  tier = rng.choice(t, size=n, p=probs).astype(np.int32)
  memory = np.asarray(config.memory_tiers, np.float64)[tier]
  speeds = "speed_flops, straggler_slowdown and speed_sigma give a device speed"
  return Fleet(speed=_positive_f32(speed, lambda i: speeds),
               bw_up=jnp.full(n, config.bw_up, jnp.float32),
               bw_down=jnp.full(n, config.bw_down, jnp.float32),
               memory=_positive_f32(
                   memory, lambda i: "memory_tiers (or memory_tier_fractions "
                   "times full training memory) give a device memory"),
               dropout=jnp.full(n, config.dropout, jnp.float32),
               tier=jnp.asarray(tier),
               task_sigma=jnp.asarray(config.task_sigma, jnp.float32))


def _trace_rows(path: str) -> tuple[list[int], list[dict]]:
  """(line numbers, rows) of a trace CSV; a short or long row, or bytes that
  are not UTF-8, raise naming the file (and line)."""
  try:
    with open(path, newline="", encoding="utf-8") as f:
      reader = csv.DictReader(f)
      fields = reader.fieldnames or []
      missing = [c for c in TRACE_COLUMNS if c not in fields]
      if missing:
        raise ValueError(f"{path}: missing column(s) {missing}; required "
                         f"{list(TRACE_COLUMNS)}, optional ['tier']")
      lines, rows = [], []
      for r in reader:
        # DictReader fills a short row with None and keys a long row's
        # extra cells by None.
        if None in r or None in r.values():
          raise ValueError(f"{path}: line {reader.line_num}: the header has "
                           f"{len(fields)} columns, this row does not")
        lines.append(reader.line_num)
        rows.append(r)
  except UnicodeDecodeError as e:
    raise ValueError(f"{path}: not UTF-8 text ({e.reason} at byte "
                     f"{e.start})") from None
  return lines, rows


def _trace_column(path, lines, rows, column, kind=float) -> np.ndarray:
  """One column as numbers; a bad cell names its file, line and column."""
  out = []
  for line, r in zip(lines, rows):
    try:
      out.append(kind(r[column]))
    except ValueError:
      raise ValueError(f"{path}: line {line}: {column} {r[column]!r} is not "
                       f"{'an integer' if kind is int else 'a number'}"
                       ) from None
  return np.array(out)


def read_trace(path: str, task_sigma: float = 0.0,
               num_clients: int | None = None) -> Fleet:
  """Reads a device trace CSV (columns in the module docstring)."""
  lines, rows = _trace_rows(path)
  if not rows:
    raise ValueError(f"{path}: no device rows")
  if num_clients is not None and len(rows) != num_clients:
    raise ValueError(f"{path}: has {len(rows)} devices but num_clients is "
                     f"{num_clients}")
  cols = {c: _trace_column(path, lines, rows, c) for c in TRACE_COLUMNS}
  at = lambda c: lambda i: f"{path}: line {lines[i]}: {c}"
  for c in TRACE_COLUMNS:
    bad = ~np.isfinite(cols[c])
    if c != "dropout":
      bad |= cols[c] <= 0
    else:
      bad |= (cols[c] < 0) | (cols[c] > 1)
    if bad.any():
      want = "in [0, 1]" if c == "dropout" else "> 0 and finite"
      raise ValueError(f"{at(c)(int(np.argmax(bad)))} must be {want}")
  if "tier" in rows[0]:
    tier = _trace_column(path, lines, rows, "tier", int).astype(np.int32)
    if (tier < 0).any():
      raise ValueError(f"{at('tier')(int(np.argmax(tier < 0)))} must be >= 0")
  else:
    # Tiers by distinct memory size, smallest first.
    tier = np.unique(cols["memory_bytes"], return_inverse=True)[1].astype(
        np.int32)
  if not (task_sigma >= 0 and math.isfinite(task_sigma)):
    raise ValueError(f"task_sigma must be a finite number >= 0, got "
                     f"{task_sigma!r}")
  return Fleet(speed=_positive_f32(cols["speed_flops"], at("speed_flops")),
               bw_up=_positive_f32(cols["bw_up"], at("bw_up")),
               bw_down=_positive_f32(cols["bw_down"], at("bw_down")),
               memory=_positive_f32(cols["memory_bytes"], at("memory_bytes")),
               dropout=jnp.asarray(cols["dropout"], jnp.float32),
               tier=jnp.asarray(tier),
               task_sigma=jnp.asarray(task_sigma, jnp.float32))
