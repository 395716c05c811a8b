"""The step's device memory, and ``client_chunk`` chosen to fit it.

A compiled program's memory is what XLA's buffer assignment reserves for
it (``Compiled.memory_analysis``): its arguments (the environment with the
clients' data, the state), the outputs not aliased to donated inputs, and
its temporaries. That is per device for a program on a clients mesh.

``client_chunk=0`` (auto) lets ``plan_engine`` choose how a step trains its
K clients: ``vmap`` (all at once) where the engine would take it and it
fits, else ``lax.map``/``stream`` over groups of ``client_chunk`` clients,
each group vmapped. A group's temporaries (parameters, gradients and
activations of each of its clients) grow with its size, so the planner
compiles the step at two small chunks, fits ``peak(c) = a + b c``, takes
the largest chunk predicted to fit the budget and compiles that one to
check it. The line can miss: the buffered path's [K, ...] update buffer is
a fixed cost that the group's temporaries share space with, until they do
not. A chunk measured over the budget is refitted through the points
either side of it (at most ``MAX_CHECKS`` times); the chunk returned was
always measured to fit. Compiles are seconds each, so a plan is 1 (vmap
fits) to 7 of them, the two probes side by side, never a search over
chunks.

On the CPU, one client at a time is the measured fastest (docs/design.md,
"Client training and batching"): auto takes chunk 1 there, compiling only
to check a budget given by ``device_memory_budget``.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp

from ftte_jax.core import algorithms
from ftte_jax.core import engine
from ftte_jax.core import extensions as extensions_lib
from ftte_jax.core.algorithms import EngineConfig

# The share of the budget a step may take. The rest is for what the buffer
# assignment does not count: XLA:GPU's convolution and GEMM workspaces,
# allocator fragmentation, the evaluation's program and the test set.
USABLE_FRACTION = 0.9
# Chunks compiled to fit the line (clamped to the clients per device).
PROBE_CHUNKS = (8, 32)
# Compiles spent checking chunks predicted to fit, at most.
MAX_CHECKS = 3


@dataclasses.dataclass(frozen=True)
class ProgramMemory:
  """Bytes one compiled program reserves on each device it runs on."""

  argument_bytes: int
  output_bytes: int
  alias_bytes: int  # outputs written into donated arguments.
  temp_bytes: int
  code_bytes: int
  # XLA's cost analysis: a loop's body counted once, not once per trip.
  flops: float | None = None

  @property
  def peak_bytes(self) -> int:
    """Arguments, fresh outputs, temporaries and code, live together."""
    return (self.argument_bytes + self.output_bytes - self.alias_bytes +
            self.temp_bytes + self.code_bytes)

  def as_dict(self) -> dict:
    return {**dataclasses.asdict(self), "peak_bytes": self.peak_bytes}


def program_memory(compiled: jax.stages.Compiled) -> ProgramMemory:
  """``compiled``'s memory and cost analyses as a ProgramMemory."""
  m = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):  # older JAX: one dict per program.
    cost = cost[0] if cost else None
  flops = None if not cost or "flops" not in cost else float(cost["flops"])
  return ProgramMemory(
      argument_bytes=int(m.argument_size_in_bytes),
      output_bytes=int(m.output_size_in_bytes),
      alias_bytes=int(m.alias_size_in_bytes),
      temp_bytes=int(m.temp_size_in_bytes),
      code_bytes=int(m.generated_code_size_in_bytes), flops=flops)


def memory_report(compiled) -> dict | None:
  """``program_memory(compiled).as_dict()``, or None where the executable
  has no analysis (one loaded from a serialized copy may not)."""
  try:
    return program_memory(compiled).as_dict()
  except Exception:  # pylint: disable=broad-except
    return None


def device_memory(devices: Sequence[jax.Device] | None = None) -> int | None:
  """The smallest allocator limit among ``devices`` (default: the local
  ones), from ``Device.memory_stats()``; None where a device reports none
  (the CPU). On a GPU this is the memory JAX's allocator may use
  (``XLA_PYTHON_CLIENT_MEM_FRACTION`` of the card with preallocation)."""
  limits = []
  for d in devices or jax.local_devices():
    stats = d.memory_stats()
    if not stats or "bytes_limit" not in stats:
      return None
    limits.append(int(stats["bytes_limit"]))
  return min(limits) if limits else None


@dataclasses.dataclass(frozen=True)
class Plan:
  """How a step trains its clients, and why."""

  batching: str  # vmap, map or stream.
  chunk: int  # client_chunk (1 under vmap, where it has no effect).
  clients_per_device: int  # K / mesh devices.
  usable_bytes: float | None  # the budget times USABLE_FRACTION.
  # Every program measured: {"batching", "chunk", **ProgramMemory}.
  measured: tuple[dict, ...] = ()
  fixed_bytes: float | None = None  # the fitted line: a ...
  bytes_per_client: float | None = None  # ... and b.
  reason: str = ""
  seconds: float = 0.0  # spent planning (the compiles).

  def as_dict(self) -> dict:
    out = dataclasses.asdict(self)
    out["measured"] = list(self.measured)
    return out


Measure = Callable[[str, int], ProgramMemory]


def balanced(m: int, widest: int) -> int:
  """The smallest chunk that trains ``m`` clients in as few groups as
  chunks of ``widest`` would: the same loop trips, less memory, and the
  groups as even as they can be."""
  groups = -(-m // max(1, min(widest, m)))
  return -(-m // groups)


def _line(p: tuple[int, float], q: tuple[int, float]
          ) -> tuple[float, float]:
  """``(a, b)`` of the line through two (chunk, bytes) points."""
  (c0, y0), (c1, y1) = sorted([p, q])
  b = (y1 - y0) / (c1 - c0) if c1 != c0 else 0.0
  return y0 - b * c0, b


def _widest_under(a: float, b: float, usable: float, m: int) -> int:
  """The largest chunk <= m the line ``a + b c`` keeps within ``usable``."""
  if b <= 0:
    return m
  return int(min(m, max(0.0, (usable - a) / b)))


def choose_chunk(measure: Measure, batching: str, m: int, usable: float,
                 widest: bool = True
                 ) -> tuple[int, tuple[float, float], list[dict]]:
  """The chunk of ``batching`` (map or stream) to train ``m`` clients per
  device within ``usable`` bytes.

  Args:
    measure: ``measure(batching, chunk) -> ProgramMemory`` (a compile).
    batching: map or stream.
    m: clients per device (K / mesh devices).
    usable: bytes the step may take.
    widest: the largest chunk that fits (accelerators: wider matmuls,
      fewer loop trips); False: 1, if it fits (the CPU's fastest).

  Returns:
    ``(chunk, (a, b) of the last line fitted, every measurement)``.

  Raises:
    ValueError: not even one client at a time fits.
  """
  points: dict[int, int] = {}
  log: list[dict] = []

  def take(cs):
    cs = [c for c in dict.fromkeys(cs) if c not in points]
    with concurrent.futures.ThreadPoolExecutor(max(1, len(cs))) as pool:
      for c, mem in zip(cs, pool.map(lambda c: measure(batching, c), cs)):
        points[c] = mem.peak_bytes
        log.append({"batching": batching, "chunk": c, **mem.as_dict()})

  if not widest:
    take([1])
    if points[1] > usable:
      _too_big(batching, points[1], usable)
    return 1, (float(points[1]), 0.0), log
  take(sorted({min(m, c) for c in PROBE_CHUNKS}))
  fits = [c for c in points if points[c] <= usable]
  if not fits:
    take([1])
    if points[1] > usable:
      _too_big(batching, points[1], usable)
  cs = sorted(points)
  a, b = _line((cs[0], points[cs[0]]), (cs[-1], points[cs[-1]]))
  for _ in range(MAX_CHECKS):
    lo = max(c for c in points if points[c] <= usable)
    over = [c for c in points if points[c] > usable]
    hi = min(over) if over else None
    if lo == m:
      break
    if hi is not None:  # interpolate between the two measured sides.
      a, b = _line((lo, points[lo]), (hi, points[hi]))
    c = balanced(m, _widest_under(a, b, usable, m if hi is None else hi - 1))
    if c <= lo:
      break
    take([c])
  lo = max(c for c in points if points[c] <= usable)
  return lo, (a, b), log


def _too_big(batching: str, peak: float, usable: float):
  raise ValueError(
      f"device_memory_budget: the step needs {peak / 2**30:.2f} GiB per "
      f"device with client_batching={batching} one client at a time, more "
      f"than the {usable / 2**30:.2f} GiB it may use ({USABLE_FRACTION:.0%} "
      "of the budget). What does not shrink with the chunk is the data, the "
      "state and (map) the step's [K, ...] update buffer: use stream "
      "batching (no variance weight), fewer clients per step (K) or more "
      "devices (mesh_devices)")


def plan_clients(config: EngineConfig, measure: Measure, num_devices: int,
                 budget: float | None, widest: bool,
                 streamable: bool | None = None) -> Plan:
  """How ``config`` (``client_chunk=0``) should train a step's clients.

  The engine's own batching (``extensions.resolve_batching``) stays, with
  its chunk chosen within ``budget`` bytes per device; ``vmap`` is kept only
  if all K/D clients at once fit. Otherwise, with ``client_batching='auto'``,
  the clients are chunked: ``stream`` when the aggregator is ``streamable``
  (its weights are known before training; None: the config's own
  aggregation's), else ``map``.

  Raises:
    ValueError: an explicit ``client_batching='vmap'`` does not fit, or
      nothing fits (``choose_chunk``).
  """
  m = -(-config.buffer_size // num_devices)  # a device's share, padded.
  if streamable is None:
    streamable = algorithms.aggregator_from_config(config).streamable
  batching = extensions_lib.resolve_batching(config, streamable)
  if budget is None:
    if batching == "vmap":
      raise ValueError(
          "client_chunk=0 (auto) needs a memory budget: the devices report "
          "no memory; set device_memory_budget (bytes per device)")
    return Plan(batching, 1, m, None,
                reason="no budget (CPU): one client at a time")
  usable = USABLE_FRACTION * budget
  measured = []
  if batching == "vmap":
    mem = measure("vmap", 1)
    measured.append({"batching": "vmap", "chunk": 1, **mem.as_dict()})
    if mem.peak_bytes <= usable:
      return Plan("vmap", 1, m, usable, tuple(measured),
                  reason="all clients at once fit")
    if config.client_batching == "vmap":
      raise ValueError(
          f"client_batching=vmap: the step needs {mem.peak_bytes / 2**30:.2f}"
          f" GiB per device, more than the {usable / 2**30:.2f} GiB it may "
          "use; use client_batching=auto (or map/stream) with client_chunk=0"
          " to train the clients in chunks")
    batching = "stream" if streamable else "map"
  chunk, (a, b), log = choose_chunk(measure, batching, m, usable, widest)
  return Plan(batching, chunk, m, usable, tuple(measured + log), a, b,
              reason=("widest chunk that fits" if widest else
                      "one client at a time (the CPU's fastest); it fits"))


def step_memory(config: EngineConfig, apply_fn, env: engine.Environment,
                params, plan, max_local_steps: int, client_tx=None,
                kinds=None, donate: bool = True,
                compiler_options: dict | None = None, extensions=None,
                task=None) -> tuple[ProgramMemory, jax.stages.Compiled]:
  """Compiles ``config``'s jitted step (nothing runs) and reads its memory.

  The state is abstract (``jax.eval_shape`` of the engine's init), so no
  round-0 state is computed. Returns ``(memory, compiled)``.
  """
  sim = engine.make_simulator(config, apply_fn, max_local_steps,
                              client_tx=client_tx, kinds=kinds,
                              extensions=extensions, task=task)
  key = jax.ShapeDtypeStruct((2,), jnp.uint32)
  state = jax.eval_shape(sim.init, key, env, params, plan)
  step = jax.jit(sim.step, donate_argnums=(1,) if donate else (),
                 compiler_options=compiler_options)
  compiled = step.lower(env, state).compile()
  return program_memory(compiled), compiled


def plan_engine(config: EngineConfig, apply_fn, env: engine.Environment,
                params, plan, max_local_steps: int, client_tx=None,
                kinds=None, budget: float | None = None,
                widest: bool | None = None, donate: bool = True,
                compiler_options: dict | None = None, extensions=None,
                task=None) -> tuple[EngineConfig, Plan]:
  """``config`` with ``client_chunk=0`` resolved (``plan_clients``).

  Args:
    config: the engine config; with ``client_chunk != 0`` it is returned
      as it is, with no plan.
    apply_fn, env, params, plan, max_local_steps, client_tx, kinds: what
      ``engine.make_simulator`` and its init take.
    budget: bytes per device; None: the devices' own (``device_memory``).
    widest: take the widest chunk that fits (default: off the CPU).
    donate: whether the step donates its state (as ``Experiment`` does).
    compiler_options: the step's XLA options.
    extensions: the run's ``extensions.Extensions`` (its aggregator decides
      whether the clients can be streamed).
    task: the dataset's ``losses.Task`` (None: classification).

  Returns:
    ``(resolved config, Plan)``; ``Plan`` is None when nothing was planned.
  """
  if config.client_chunk != 0:
    return config, None
  if budget is None:
    budget = device_memory()
  if widest is None:
    widest = jax.default_backend() != "cpu"
  mesh = engine.client_mesh(config.mesh_devices, config.buffer_size)
  devices = 1 if mesh is None else mesh.devices.size

  def measure(batching: str, chunk: int) -> ProgramMemory:
    cfg = dataclasses.replace(config, client_batching=batching,
                              client_chunk=chunk)
    return step_memory(cfg, apply_fn, env, params, plan, max_local_steps,
                       client_tx, kinds, donate, compiler_options,
                       extensions, task)[0]

  ext = extensions or extensions_lib.Extensions()
  streamable = (ext.aggregator or algorithms.aggregator_from_config(
      config, ext.staleness_fn)).streamable
  t0 = time.perf_counter()
  p = plan_clients(config, measure, devices, budget, widest, streamable)
  p = dataclasses.replace(p, seconds=time.perf_counter() - t0)
  return dataclasses.replace(config, client_batching=p.batching,
                             client_chunk=p.chunk), p

