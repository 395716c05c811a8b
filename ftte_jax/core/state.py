"""The engine's state types: frozen pytrees, built by their constructors.

State is kept apart from the logic that moves it (``ftte_jax.core.engine``).
Every field has a shape comment; ``N`` clients, ``C`` tasks in flight,
``S`` versions in the ring, ``T`` mask tiers.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from ftte_jax.core import exact
from ftte_jax.core.fleet import Fleet
from ftte_jax.core.masks import MaskPlan
from ftte_jax.core.typing import PyTree
from ftte_jax.data.client_data import ClientData


@struct.dataclass
class Environment:
  """Everything static across server steps; an argument of the jitted step
  (not a closure constant, so the dataset is not baked into the program)."""

  data: ClientData
  fleet: Fleet
  eligible: jnp.ndarray  # [N] bool: may be sampled (memory policy).
  num_steps: jnp.ndarray  # [N] int32: local steps of each client's task.
  deadline: jnp.ndarray  # [] float32: virtual seconds before a task is dropped.


@struct.dataclass
class Ring:
  """The last S global versions, so a stale client trains from its own."""

  params: PyTree  # leaves [S, ...]: the global model at each held version.
  version: jnp.ndarray  # [S] int32: version held by each slot (-1 none).

  @classmethod
  def create(cls, params: PyTree, size: int) -> Ring:
    """A ring holding ``params`` as version 0."""
    return cls(
        params=jax.tree.map(lambda p: jnp.broadcast_to(p, (size,) + p.shape),
                            params),
        version=jnp.full((size,), -1, jnp.int32).at[0].set(0))

  @property
  def size(self) -> int:
    return int(self.version.shape[0])

  def push(self, version: jnp.ndarray, params: PyTree) -> Ring:
    """Stores ``params`` as ``version`` in slot ``version % S``."""
    slot = version % self.size
    return Ring(params=jax.tree.map(lambda r, p: r.at[slot].set(p),
                                    self.params, params),
                version=self.version.at[slot].set(version))


@struct.dataclass
class Tasks:
  """The C client tasks in flight."""

  client: jnp.ndarray  # [C] int32: client running each task.
  version: jnp.ndarray  # [C] int32: global version the task started from.
  arrival: jnp.ndarray  # [C] float32: virtual arrival (or deadline) time.
  ok: jnp.ndarray  # [C] bool: False if abandoned or past the deadline.
  # [C] float32: J the task costs its device, charged when it arrives
  # (times out); inf arrival and 0 J: an empty slot (no device was free).
  energy: jnp.ndarray


@struct.dataclass
class Counters:
  """Cumulative accounting since the start of the run.

  Byte and staleness sums are exact (hi, lo) float32 pairs
  (``ftte_jax.core.exact``); read them with ``exact.value``.
  """

  updates_applied: jnp.ndarray  # [] int32: updates with non-zero weight.
  updates_dropped: jnp.ndarray  # [] int32: abandoned or past the deadline.
  updates_stale: jnp.ndarray  # [] int32: pulled a version older than S.
  updates_nonfinite: jnp.ndarray  # [] int32: NaN/Inf in the update.
  steps_refused: jnp.ndarray  # [] int32: steps whose result was non-finite.
  updates_clipped: jnp.ndarray  # [] int32: valid updates scaled down.
  values_trimmed: jnp.ndarray  # [2] exact: values a robust mean left out.
  values_robust: jnp.ndarray  # [2] exact: values a robust mean ranked.
  staleness_sum: jnp.ndarray  # [2] exact: sum of tau over applied updates.
  staleness_sum_arrivals: jnp.ndarray  # [2] exact: sum of tau, arrivals.
  staleness_hist: jnp.ndarray  # [S + 1] int32: tau of arrivals; bin S: >= S.
  bytes_up: jnp.ndarray  # [2] exact: bytes uploaded by arrived tasks.
  bytes_down: jnp.ndarray  # [2] exact: bytes downloaded by started tasks.
  probe_bytes_up: jnp.ndarray  # [2] exact: probe and re-search uploads.
  probe_bytes_down: jnp.ndarray  # [2] exact: probe and re-search downloads.
  uploads: jnp.ndarray  # [] int32: tasks that arrived and uploaded.
  downloads: jnp.ndarray  # [] int32: tasks started.
  energy_j: jnp.ndarray  # [2] exact: J charged to devices (tasks arrived).

  @classmethod
  def create(cls, ring_size: int, probe_bytes_up=None, probe_bytes_down=None
             ) -> Counters:
    """Counters at the start of a run (traffic before it: exact pairs)."""
    zero_i = jnp.zeros((), jnp.int32)
    return cls(
        updates_applied=zero_i, updates_dropped=zero_i, updates_stale=zero_i,
        updates_nonfinite=zero_i, steps_refused=zero_i,
        updates_clipped=zero_i, values_trimmed=exact.zero(),
        values_robust=exact.zero(),
        staleness_sum=exact.zero(),
        staleness_sum_arrivals=exact.zero(),
        staleness_hist=jnp.zeros((ring_size + 1,), jnp.int32),
        bytes_up=exact.zero(), bytes_down=exact.zero(),
        probe_bytes_up=(exact.zero() if probe_bytes_up is None else
                        probe_bytes_up),
        probe_bytes_down=(exact.zero() if probe_bytes_down is None else
                          probe_bytes_down),
        uploads=zero_i, downloads=zero_i, energy_j=exact.zero())


@struct.dataclass
class Start:
  """Where a run starts: the virtual time and traffic spent before it
  (a probe round), so ``init`` builds the state already shifted."""

  clock: jnp.ndarray  # [] float32 virtual seconds.
  bytes_up: jnp.ndarray  # [2] exact bytes.
  bytes_down: jnp.ndarray  # [2] exact bytes.

  @classmethod
  def of(cls, clock: float = 0.0, bytes_up: float = 0.0,
         bytes_down: float = 0.0) -> Start:
    """A start at ``clock`` after the given traffic (host numbers)."""
    # device_put: an eager conversion would compile a program.
    return cls(clock=jax.device_put(np.float32(clock)),
               bytes_up=exact.of(bytes_up), bytes_down=exact.of(bytes_down))


@struct.dataclass
class SimState:
  """The whole simulation state; saving it is enough to resume exactly."""

  params: PyTree  # global model.
  opt_state: PyTree  # server optimizer state.
  ring: Ring  # the last S global versions.
  version: jnp.ndarray  # [] int32: server steps taken so far.
  clock: jnp.ndarray  # [] float32: virtual time, seconds.
  tasks: Tasks  # the C tasks in flight.
  client_busy: jnp.ndarray  # [N] bool: has a task in flight.
  client_synced: jnp.ndarray  # [N] bool: holds an earlier copy of the model.
  counters: Counters
  plan: MaskPlan  # live masks and their costs (a re-search replaces it).
  key: jnp.ndarray  # [2] uint32: the run's root key.
  client_applied: jnp.ndarray  # [N] int32: updates applied from each client.
  client_staleness: jnp.ndarray  # [N] int32: sum of their staleness tau.
  client_energy: jnp.ndarray  # [N] float32: J each device has spent.
  # [N] float32: virtual time its battery ran out (it left the fleet); inf:
  # still in it.
  client_depleted_at: jnp.ndarray
  # The aggregator's transform state (``transforms.BufferTransform.init``;
  # () for stateless chains, as every preset's).
  agg_state: PyTree = ()
  # Per-device state (``client.DeviceState``): leaves [N, ...], one row a
  # device; () when the run keeps none.
  device_state: PyTree = ()

  @property
  def in_flight(self) -> jnp.ndarray:
    """[] bool: some slot holds a task (not all empty)."""
    return jnp.any(jnp.isfinite(self.tasks.arrival))
