"""Simulated devices: memory, compute speed, bandwidth, availability, tier.

Profiles are drawn once per run (numpy, seeded) from named distributions or
read from a CSV trace, then live on the device as a ``Fleet`` pytree that the
jitted server step reads to sample task durations (DESIGN §3 "Fleet").

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
import os
from typing import Sequence

import jax.numpy as jnp
import numpy as np
from flax import struct

TRACE_COLUMNS = ("speed_flops", "bw_up", "bw_down", "memory_bytes", "dropout")


@dataclasses.dataclass(frozen=True)
class FleetConfig:
  """How to draw device profiles (ignored fields when ``trace_path`` is set).

  Attributes:
    num_clients: number of devices N.
    speed_flops: compute speed of a normal device, FLOP/s.
    straggler_fraction: fraction of devices that are stragglers, in [0, 1].
    straggler_slowdown: stragglers' speed is divided by this (>= 1).
    speed_sigma: lognormal sigma of per-device speed jitter (>= 0).
    task_sigma: lognormal sigma of per-task duration jitter (>= 0).
    bw_up: uplink bytes/s.
    bw_down: downlink bytes/s.
    dropout: probability that a task is abandoned (never arrives), [0, 1].
    memory_tiers: memory (bytes) of each tier, ascending.
    tier_probs: probability of each tier (sums to 1); uniform when empty.
    trace_path: CSV trace with one row per device (see module docstring).
  """

  num_clients: int = 100
  speed_flops: float = 2e9
  straggler_fraction: float = 0.0
  straggler_slowdown: float = 10.0
  speed_sigma: float = 0.0
  task_sigma: float = 0.0
  bw_up: float = 1e6
  bw_down: float = 4e6
  dropout: float = 0.0
  memory_tiers: Sequence[float] = (1e12,)
  tier_probs: Sequence[float] = ()
  trace_path: str | None = None


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

  @property
  def num_clients(self) -> int:
    return int(self.speed.shape[0])


def _check_positive(name: str, value: float) -> None:
  if not (value > 0 and math.isfinite(value)):
    raise ValueError(f"{name} must be a positive finite number, got {value}")


def _check_fraction(name: str, value: float) -> None:
  if not 0.0 <= value <= 1.0:
    raise ValueError(f"{name} must be in [0, 1], got {value}")


def validate(config: FleetConfig) -> None:
  """Raises ValueError naming the first invalid option."""
  if config.num_clients < 1:
    raise ValueError(f"num_clients must be >= 1, got {config.num_clients}")
  if config.trace_path is not None:
    if not os.path.isfile(config.trace_path):
      raise ValueError(f"trace_path: no such file {config.trace_path!r}")
    return
  _check_positive("speed_flops", config.speed_flops)
  _check_positive("bw_up", config.bw_up)
  _check_positive("bw_down", config.bw_down)
  _check_fraction("straggler_fraction", config.straggler_fraction)
  _check_fraction("dropout", config.dropout)
  if not config.straggler_slowdown >= 1.0:
    raise ValueError("straggler_slowdown must be >= 1, got "
                     f"{config.straggler_slowdown}")
  for name in ("speed_sigma", "task_sigma"):
    if not getattr(config, name) >= 0:
      raise ValueError(f"{name} must be >= 0, got {getattr(config, name)}")
  if len(config.memory_tiers) < 1:
    raise ValueError("memory_tiers must name at least one tier")
  for m in config.memory_tiers:
    _check_positive("memory_tiers", m)
  if list(config.memory_tiers) != sorted(config.memory_tiers):
    raise ValueError(f"memory_tiers must be ascending, got "
                     f"{list(config.memory_tiers)}")
  if config.tier_probs:
    p = np.asarray(config.tier_probs, np.float64)
    if p.shape != (len(config.memory_tiers),) or (p < 0).any() or not (
        abs(p.sum() - 1) < 1e-6):
      raise ValueError("tier_probs must have one non-negative entry per "
                       f"memory tier ({len(config.memory_tiers)}) summing to "
                       f"1, got {list(config.tier_probs)}")


def make_fleet(config: FleetConfig, seed: int) -> Fleet:
  """Draws (or reads) the device profiles; deterministic in ``seed``."""
  validate(config)
  if config.trace_path is not None:
    return read_trace(config.trace_path, config.task_sigma, config.num_clients)
  rng = np.random.default_rng(seed)
  n = config.num_clients
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
  return Fleet(speed=jnp.asarray(speed, jnp.float32),
               bw_up=jnp.full(n, config.bw_up, jnp.float32),
               bw_down=jnp.full(n, config.bw_down, jnp.float32),
               memory=jnp.asarray(memory, jnp.float32),
               dropout=jnp.full(n, config.dropout, jnp.float32),
               tier=jnp.asarray(tier),
               task_sigma=jnp.asarray(config.task_sigma, jnp.float32))


def read_trace(path: str, task_sigma: float = 0.0,
               num_clients: int | None = None) -> Fleet:
  """Reads a device trace CSV (columns in the module docstring)."""
  with open(path, newline="") as f:
    reader = csv.DictReader(f)
    missing = [c for c in TRACE_COLUMNS if c not in (reader.fieldnames or [])]
    if missing:
      raise ValueError(f"{path}: missing column(s) {missing}; required "
                       f"{list(TRACE_COLUMNS)}, optional ['tier']")
    rows = list(reader)
  if not rows:
    raise ValueError(f"{path}: no device rows")
  if num_clients is not None and len(rows) != num_clients:
    raise ValueError(f"{path}: has {len(rows)} devices but num_clients is "
                     f"{num_clients}")
  cols = {}
  for c in TRACE_COLUMNS:
    try:
      cols[c] = np.array([float(r[c]) for r in rows])
    except ValueError as e:
      raise ValueError(f"{path}: column {c!r} has a non-numeric value: {e}")
    if not np.isfinite(cols[c]).all():
      raise ValueError(f"{path}: column {c!r} has a non-finite value")
  for c in ("speed_flops", "bw_up", "bw_down", "memory_bytes"):
    if (cols[c] <= 0).any():
      row = int(np.argmax(cols[c] <= 0)) + 2
      raise ValueError(f"{path}: line {row}: {c} must be > 0")
  if ((cols["dropout"] < 0) | (cols["dropout"] > 1)).any():
    row = int(np.argmax((cols["dropout"] < 0) | (cols["dropout"] > 1))) + 2
    raise ValueError(f"{path}: line {row}: dropout must be in [0, 1]")
  if "tier" in rows[0]:
    tier = np.array([int(r["tier"]) for r in rows], np.int32)
    if (tier < 0).any():
      raise ValueError(f"{path}: tier must be >= 0")
  else:
    # Tiers by distinct memory size, smallest first.
    tier = np.unique(cols["memory_bytes"], return_inverse=True)[1].astype(
        np.int32)
  _check_positive("task_sigma + 1", task_sigma + 1)
  return Fleet(speed=jnp.asarray(cols["speed_flops"], jnp.float32),
               bw_up=jnp.asarray(cols["bw_up"], jnp.float32),
               bw_down=jnp.asarray(cols["bw_down"], jnp.float32),
               memory=jnp.asarray(cols["memory_bytes"], jnp.float32),
               dropout=jnp.asarray(cols["dropout"], jnp.float32),
               tier=jnp.asarray(tier),
               task_sigma=jnp.asarray(task_sigma, jnp.float32))
