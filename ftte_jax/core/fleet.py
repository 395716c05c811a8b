"""Simulated devices: memory, compute speed, bandwidth, availability, tier.

Profiles are drawn once per run (numpy, seeded) from named distributions,
from a mix of device classes with published figures (``fleet_profile``,
``ftte_jax.core.profiles``), or read from a CSV trace, then live on the
device as a ``Fleet`` pytree that the jitted server step reads to sample
task durations (docs/design.md, "Fleet").

Trace CSV format: a header row, then one row per device, with columns

  ``speed_flops``     sustained training compute, FLOP/s (> 0)
  ``bw_up``           uplink bandwidth, bytes/s (> 0)
  ``bw_down``         downlink bandwidth, bytes/s (> 0)
  ``memory_bytes``    memory available for training, bytes (> 0)
  ``dropout``         probability a task is abandoned, in [0, 1]
  ``tier``            (optional) integer memory tier label >= 0
  ``j_per_flop``      (optional) compute energy, J/FLOP (>= 0)
  ``j_per_byte_up``   (optional) radio energy per byte sent, J (>= 0)
  ``j_per_byte_down`` (optional) radio energy per byte received, J (>= 0)
  ``idle_w``          (optional) power while a task waits, W (>= 0)
  ``battery_j``       (optional) battery capacity, J (> 0); turns batteries on

Extra columns (e.g. a device id) are ignored. An energy column that is
absent takes the ``FleetConfig`` value of the device's tier.

Energy defaults are order-of-magnitude figures from published measurements
(docs/design.md, "Energy and batteries", cites each):

  compute, phone-class CPU  ~1e-10 J/FLOP (a few W at tens of GFLOP/s)
  compute, microcontroller  ~1e-9 J/FLOP (Cortex-M class, ~0.1-0.3 nJ per
                            cycle, under one FLOP per cycle)
  Wi-Fi                     ~7e-6 J/byte (0.007 J/KB, Balasubramanian et al.,
                            IMC 2009)
  3G cellular               ~2.5e-5 J/byte (0.025 J/KB, same study; LTE is of
                            the same order, Huang et al., MobiSys 2012)
  BLE                       ~1.2e-6 J/byte (about 0.15 uJ/bit, Siekkinen et
                            al., 2012)
  idle, awake small device  ~0.1 W (tens to hundreds of mW with the radio
                            associated, Carroll and Heiser, USENIX ATC 2010)
"""

from __future__ import annotations

import csv
import dataclasses
import math
import numbers
import os
from typing import Sequence, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from ftte_jax.core import adversary
from ftte_jax.core import options
from ftte_jax.core import profiles
from ftte_jax.core.options import option

TRACE_COLUMNS = ("speed_flops", "bw_up", "bw_down", "memory_bytes", "dropout")
# Optional per-device energy columns, each with its FleetConfig field.
ENERGY_COLUMNS = {"j_per_flop": "energy_j_per_flop",
                  "j_per_byte_up": "energy_j_per_byte_up",
                  "j_per_byte_down": "energy_j_per_byte_down",
                  "idle_w": "energy_idle_w"}

# Stream of the battery draw: default_rng([seed, _BATTERY_STREAM]).
_BATTERY_STREAM = 0xBA77
# Streams of a device-class profile: the classes, their resources, and the
# stragglers among them (default_rng([seed, stream])).
_CLASS_STREAM, _PROFILE_STREAM, _STRAGGLER_STREAM = 0xC1A5, 0x9F0F, 0x51F0

# Order-of-magnitude energy constants (module docstring and docs/design.md
# give their sources). The defaults are a phone-class device on Wi-Fi.
J_PER_FLOP_PHONE = 1e-10
J_PER_FLOP_MCU = 1e-9
J_PER_BYTE_WIFI = 7e-6
J_PER_BYTE_3G = 2.5e-5
J_PER_BYTE_BLE = 1.2e-6
IDLE_W_SMALL = 0.1


@dataclasses.dataclass(frozen=True)
class FleetConfig:
  """How to draw device profiles (``trace_path`` replaces the draws; a class
  ``fleet_profile`` replaces the fields its help names).

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
  energy_j_per_flop: Sequence[float] = option(
      (J_PER_FLOP_PHONE,), low=0, nonempty=True,
      help="compute energy, J per FLOP: one value per memory tier, or one "
      "for every tier (default: phone-class CPU; ~1e-9 is a microcontroller)")
  energy_j_per_byte_up: Sequence[float] = option(
      (J_PER_BYTE_WIFI,), low=0, nonempty=True,
      help="radio energy per byte sent, J: per memory tier or one for all "
      "(default: Wi-Fi; ~2.5e-5 cellular, ~1.2e-6 BLE)")
  energy_j_per_byte_down: Sequence[float] = option(
      (J_PER_BYTE_WIFI,), low=0, nonempty=True,
      help="radio energy per byte received, J: per memory tier or one for "
      "all (default: Wi-Fi)")
  energy_idle_w: Sequence[float] = option(
      (IDLE_W_SMALL,), low=0, nonempty=True,
      help="power (W) while a task waits without computing or "
      "communicating: per memory tier or one for all")
  battery_mean_j: float | None = option(
      None, low=0, low_inclusive=False,
      help="mean battery capacity (J), drawn lognormal per device; a device "
      "whose energy spent passes its capacity plus its recharge leaves the "
      "fleet; None: no batteries")
  battery_sigma: float = option(
      0.0, low=0, help="lognormal sigma of battery capacities")
  battery_recharge_j_per_h: float = option(
      0.0, low=0,
      help="energy each battery gains per virtual hour (needs batteries)")
  trace_path: str | None = option(
      None, help="CSV trace with one row per device (see ftte_jax.core.fleet); "
      "replaces the drawn profiles")
  fleet_profile: str = option(
      profiles.INDEPENDENT,
      help="'independent' (speed_flops, straggler_fraction, bw_up, "
      "bw_down, memory_tiers/tier_probs and the per-tier energy options, "
      "each drawn on its own), or device classes as they come "
      f"({', '.join(profiles.CLASS_NAMES)}; ftte_jax.core.profiles): one "
      "class name, or a mix name:p,name:p,... with probabilities summing to "
      "1 (exact counts). A class profile draws each device's speed, memory "
      "(absolute bytes; memory_tier_fractions does not apply), bandwidths "
      "and energy constants together from its class's published ranges, "
      "and replaces those options; straggler_fraction/straggler_slowdown, "
      "speed_sigma, task_sigma and dropout still apply. The tier of a "
      "device is its class's rank in the mix, weakest first")
  phone_link: str = option(
      "wifi", choices=profiles.PHONE_LINKS,
      help="class profiles: the link of the wearable and phone classes "
      "(microcontrollers always use BLE)")
  class_correlation: float = option(
      0.8, low=0, high=1,
      help="class profiles: Gaussian-copula correlation of a device's "
      "speed, memory, uplink and downlink within its class (1: the same "
      "quantile of every range; 0: independent within the class)")


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
  j_per_flop: jnp.ndarray  # [N] float32 J per FLOP of training.
  j_per_byte_up: jnp.ndarray  # [N] float32 J per byte sent.
  j_per_byte_down: jnp.ndarray  # [N] float32 J per byte received.
  idle_w: jnp.ndarray  # [N] float32 W while a task waits.
  # [N] float32 battery capacity, J; None: no batteries.
  battery_j: jnp.ndarray | None = None
  recharge_w: jnp.ndarray | None = None  # [] float32 J/s; with batteries.
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
  mix = profiles.parse_mix(config.fleet_profile)
  if mix is not None and config.trace_path is not None:
    raise ValueError("fleet_profile and trace_path both describe the "
                     f"devices; give one (fleet_profile="
                     f"{config.fleet_profile!r})")
  if config.trace_path is not None:
    if not os.path.isfile(config.trace_path):
      raise ValueError(f"trace_path: no such file {config.trace_path!r}")
    return
  for name in ENERGY_COLUMNS.values():
    values = getattr(config, name)
    if len(values) not in (1, len(config.memory_tiers)):
      raise ValueError(f"{name} must have one entry, or one per memory tier "
                       f"({len(config.memory_tiers)}), got {list(values)}")
  if config.battery_recharge_j_per_h > 0 and config.battery_mean_j is None:
    raise ValueError("battery_recharge_j_per_h needs batteries: set "
                     "battery_mean_j (or a battery_j trace column)")
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
  return jax.device_put(out)


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
    fleet = read_trace(config.trace_path, config.task_sigma, num_clients,
                       config)
  elif profiles.parse_mix(config.fleet_profile) is not None:
    fleet = _draw_classes(config, int(num_clients), seed)
  else:
    fleet = _draw(config, int(num_clients), seed)
  return with_attackers(with_batteries(fleet, config, seed), config, seed)


def device_classes(config: FleetConfig, num_clients: int, seed: int
                   ) -> np.ndarray:
  """[N] int32 class of each device, as ``make_fleet`` will draw it, before
  the fleet (and without the model): a class profile's class (its rank in
  the mix, weakest first), else the memory tier (drawn, or the trace's).

  Partitions whose data depend on the device class call this first, so the
  data and the fleet agree for a seed.
  """
  validate(config)
  mix = profiles.parse_mix(config.fleet_profile)
  if mix is not None:
    return profiles.draw_classes(mix, int(num_clients), [seed, _CLASS_STREAM])
  if config.trace_path is not None:
    return np.asarray(read_trace(config.trace_path, config.task_sigma,
                                 num_clients, config).tier, np.int32)
  return _draw_arrays(config, int(num_clients), seed)["tier"]


def _draw_classes(config: FleetConfig, n: int, seed: int) -> Fleet:
  """Profiles of a device-class mix (``profiles``), stragglers on top."""
  mix = profiles.parse_mix(config.fleet_profile)
  cls = profiles.draw_classes(mix, n, [seed, _CLASS_STREAM])
  r = profiles.draw_resources(mix, cls, config.phone_link,
                              config.class_correlation,
                              [seed, _PROFILE_STREAM])
  speed = r["speed"]
  rng = np.random.default_rng([seed, _STRAGGLER_STREAM])
  slow = rng.permutation(n)[:int(round(config.straggler_fraction * n))]
  speed[slow] /= config.straggler_slowdown
  if config.speed_sigma > 0:
    speed *= rng.lognormal(0.0, config.speed_sigma, n)
  f32 = lambda k: jax.device_put(np.asarray(r[k], np.float32))
  return Fleet(
      speed=_positive_f32(speed, lambda i: "fleet_profile, "
                          "straggler_slowdown and speed_sigma give a speed"),
      bw_up=f32("bw_up"), bw_down=f32("bw_down"), memory=f32("memory"),
      dropout=jax.device_put(np.full(n, config.dropout, np.float32)),
      tier=jax.device_put(cls),
      task_sigma=jax.device_put(np.float32(config.task_sigma)),
      j_per_flop=f32("j_per_flop"), j_per_byte_up=f32("j_per_byte_up"),
      j_per_byte_down=f32("j_per_byte_down"), idle_w=f32("idle_w"))


def _per_tier(config: FleetConfig, name: str, tier: np.ndarray,
              where: str) -> np.ndarray:
  """[N] float64: option ``name`` (one value, or one per tier) by tier."""
  values = np.asarray(getattr(config, name), np.float64)
  if values.size == 1:
    return np.full(tier.shape, values[0])
  if tier.size and tier.max() >= values.size:
    raise ValueError(f"{name} has {values.size} entries but {where} has "
                     f"tier {int(tier.max())}; give one entry per tier or one "
                     "for all")
  return values[tier]


def energy_fields(config: FleetConfig, tier: np.ndarray,
                  where: str = "the fleet",
                  given: dict | None = None) -> dict:
  """The Fleet's [N] float32 energy arrays: ``given`` per-device columns
  (trace), else the config's per-tier values."""
  given = given or {}
  out = {}
  for column, name in ENERGY_COLUMNS.items():
    v = given.get(column)
    v = _per_tier(config, name, tier, where) if v is None else v
    out[column] = jax.device_put(np.asarray(v, np.float64).astype(np.float32))
  return out


def with_batteries(fleet: Fleet, config: FleetConfig, seed: int) -> Fleet:
  """``fleet`` with capacities drawn from ``battery_mean_j`` (lognormal with
  that mean) unless a trace gave them, and the recharge rate.

  The draw uses its own stream, so other draws do not move.
  """
  battery = fleet.battery_j
  if config.battery_mean_j is not None and battery is None:
    s = config.battery_sigma
    rng = np.random.default_rng([seed, _BATTERY_STREAM])
    # Lognormal with mean battery_mean_j: mu = log(mean) - s^2 / 2.
    cap = rng.lognormal(math.log(config.battery_mean_j) - s * s / 2, s,
                        fleet.num_clients)
    battery = _positive_f32(cap, lambda i: "battery_mean_j and battery_sigma "
                            "give a battery capacity")
  if battery is None:
    if config.battery_recharge_j_per_h > 0:
      raise ValueError("battery_recharge_j_per_h needs batteries: set "
                       "battery_mean_j (or a battery_j trace column)")
    return fleet
  return fleet.replace(battery_j=battery, recharge_w=jnp.asarray(
      config.battery_recharge_j_per_h / 3600.0, jnp.float32))


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


def _draw_arrays(config: FleetConfig, n: int, seed: int) -> dict:
  """Speed, tier and memory ([N] numpy) of the independent profile."""
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
  return {"speed": speed, "tier": tier, "memory": memory}


def _draw(config: FleetConfig, n: int, seed: int) -> Fleet:
  """Profiles drawn from the config's distributions."""
  arrays = _draw_arrays(config, n, seed)
  speed, tier, memory = arrays["speed"], arrays["tier"], arrays["memory"]
  speeds = "speed_flops, straggler_slowdown and speed_sigma give a device speed"
  return Fleet(speed=_positive_f32(speed, lambda i: speeds),
               bw_up=jax.device_put(np.full(n, config.bw_up, np.float32)),
               bw_down=jax.device_put(np.full(n, config.bw_down, np.float32)),
               memory=_positive_f32(
                   memory, lambda i: "memory_tiers (or memory_tier_fractions "
                   "times full training memory) give a device memory"),
               dropout=jax.device_put(np.full(n, config.dropout, np.float32)),
               tier=jax.device_put(tier),
               task_sigma=jax.device_put(np.float32(config.task_sigma)),
               **energy_fields(config, tier))


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
                         f"{list(TRACE_COLUMNS)}, optional "
                         f"{['tier', *ENERGY_COLUMNS, 'battery_j']}")
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


def _trace_energy(path, lines, rows) -> tuple[dict, jnp.ndarray | None]:
  """The optional energy columns present, and ``battery_j`` (None if absent);
  a negative or non-finite value (a capacity <= 0) names file and line."""
  given, battery = {}, None
  for column in (*ENERGY_COLUMNS, "battery_j"):
    if column not in rows[0]:
      continue
    v = _trace_column(path, lines, rows, column)
    bad = ~np.isfinite(v) | (v <= 0 if column == "battery_j" else v < 0)
    if bad.any():
      want = "> 0 and finite" if column == "battery_j" else ">= 0 and finite"
      raise ValueError(f"{path}: line {lines[int(np.argmax(bad))]}: {column} "
                       f"must be {want}")
    if column == "battery_j":
      battery = _positive_f32(
          v, lambda i: f"{path}: line {lines[i]}: battery_j")
    else:
      given[column] = v
  return given, battery


def read_trace(path: str, task_sigma: float = 0.0,
               num_clients: int | None = None,
               config: FleetConfig | None = None) -> Fleet:
  """Reads a device trace CSV (columns in the module docstring); energy
  columns it lacks come from ``config``'s per-tier values."""
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
  given, battery = _trace_energy(path, lines, rows)
  return Fleet(speed=_positive_f32(cols["speed_flops"], at("speed_flops")),
               bw_up=_positive_f32(cols["bw_up"], at("bw_up")),
               bw_down=_positive_f32(cols["bw_down"], at("bw_down")),
               memory=_positive_f32(cols["memory_bytes"], at("memory_bytes")),
               dropout=jnp.asarray(cols["dropout"], jnp.float32),
               tier=jnp.asarray(tier),
               task_sigma=jnp.asarray(task_sigma, jnp.float32),
               battery_j=battery,
               **energy_fields(config or FleetConfig(), tier, path, given))
