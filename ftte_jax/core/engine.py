"""The event-driven, semi-asynchronous federated engine.

One server step is six named, pure phases (``docs/design.md`` describes
them with the state they move):

  1. ``take_arrivals`` (``refill='step'``) or ``collect_arrivals``
     (``refill='arrival'``): the K updates of this step, in arrival order,
     and the virtual clock of the last; with arrival refill every arrival
     before the K-th restarts its slot at once (FedBuff's algorithm);
  2. ``train_buffer``: train those K clients with the client update, each
     from the global version it pulled (kept in a ring of the last S
     versions), with its own mask, data, step count and (if the run keeps
     it) per-device state; non-finite updates are zeroed and flagged;
  3. the aggregator (``transforms``): dropped, over-stale and non-finite
     updates get weight 0, its transforms weigh and defend the buffer
     (data size, age, the FTTE variance weight, clipping, robust means, DP
     noise), and its reduction aggregates coordinate-wise. When every
     transform is streamable the weights are known before training, and
     ``train_and_sum`` streams phases 2-3: it keeps only the running
     weighted sum, never the K deltas;
  4. ``server_update``: apply the aggregate with a server optimizer; push
     the new version into the ring;
  5. ``dispatch``: start new tasks on idle, eligible clients and sample
     when they arrive (download + compute + upload time, jitter, dropout,
     deadline): the K freed slots (step refill) or the K-th arrival's slot
     (arrival refill), from the new version;
  6. ``count``: cumulative accounting.

``make_simulator`` only binds a config and the user's extensions
(``extensions``) to these phases, once, in a ``Components``. Randomness: the
run's root key lives in the state; step r draws from
``fold_in(fold_in(root, ROUND), r)``, client c's training from a further
``fold_in(., c)``. Nothing else is random, so a resumed run replays exactly.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from ftte_jax.core import adversary
from ftte_jax.core import draws
from ftte_jax.core import exact
from ftte_jax.core import extensions as extensions_lib
from ftte_jax.core import losses
from ftte_jax.core import one_shot
from ftte_jax.core import transforms
from ftte_jax.core.algorithms import EngineConfig, validate
from ftte_jax.core.client import LocalData, PerDevice, make_client_optimizer
from ftte_jax.core.extensions import Components, Extensions
from ftte_jax.core.fleet import Fleet
from ftte_jax.core.masks import MaskPlan
from ftte_jax.core.state import (Counters, Environment, Ring, SimState, Start,
                                 Tasks)
from ftte_jax.core.typing import ApplyFn, PyTree
from ftte_jax.data.client_data import ClientData

__all__ = ["Arrivals", "Components", "Counters", "Dispatch", "Environment",
           "Extensions", "Ring", "SimState", "Simulator", "Start", "Tasks",
           "client_mesh", "count", "dispatch", "evaluate",
           "make_environment", "make_simulator", "nominal_duration",
           "pick_idle", "pick_words", "replan", "server_update",
           "take_arrivals", "train_and_sum", "train_buffer"]

# The mesh axis a step's K clients are split across.
CLIENT_AXIS = "clients"

# Named streams of the root key.
_KEY_INIT, _KEY_ROUND = 0, 1
# _KEY_DP: the aggregator's key (transforms.Context.key; DP noise).
_KEY_TRAIN, _KEY_DISPATCH, _KEY_EVENTS, _KEY_DP = 0, 1, 2, 3


class Simulator(NamedTuple):
  """Pure functions of one configured engine (jit them at the call site)."""

  init: Callable[..., SimState]
  step: Callable[[Environment, SimState], tuple[SimState, dict]]
  # evaluate(params, test) -> {"test_loss": ..., "test_accuracy": ...}.
  evaluate: Callable[[PyTree, dict], dict]
  # steps(env, state, n, budget) -> (state, taken, over_budget).
  steps: Callable[..., tuple[SimState, jnp.ndarray, jnp.ndarray]]
  mesh: Mesh | None = None  # the clients mesh; None: one device.
  components: Components | None = None  # what the functions are bound to.


@struct.dataclass
class Arrivals:
  """The K tasks a step takes, in buffer order."""

  slots: jnp.ndarray  # [K] int32: their task slots.
  clients: jnp.ndarray  # [K] int32: who trained.
  tau: jnp.ndarray  # [K] int32: staleness, server version minus pulled.
  ok: jnp.ndarray  # [K] bool: arrived (not abandoned, within the deadline).
  fresh: jnp.ndarray  # [K] bool: the pulled version is still in the ring.
  ring_slot: jnp.ndarray  # [K] int32: ring slot of the pulled version.
  clock: jnp.ndarray  # [] float32: virtual time of the last arrival.
  # [K] bool: a task filled the position (False: an empty slot, or a
  # buffer that the events could not fill); counted nowhere.
  filled: jnp.ndarray


@struct.dataclass
class Dispatch:
  """Bookkeeping of newly started tasks."""

  clients: jnp.ndarray  # [n] int32: the clients started.
  arrival: jnp.ndarray  # [n] float32: when each arrives (or times out).
  ok: jnp.ndarray  # [n] bool: will arrive (not abandoned, within deadline).
  bytes_down: jnp.ndarray  # [] float32: bytes the n tasks download.
  busy: jnp.ndarray  # [N] bool: updated client_busy.
  synced: jnp.ndarray  # [N] bool: updated client_synced.
  # [n] bool: a device was free for the task (False: the slot stays empty,
  # arrival inf).
  started: jnp.ndarray
  energy: jnp.ndarray  # [n] float32: J each task will cost (task_energy).


@struct.dataclass
class Refilled:
  """Tasks restarted while a step's arrivals were collected (arrival refill)."""

  tasks: Tasks  # the in-flight tasks after the restarts.
  busy: jnp.ndarray  # [N] bool.
  synced: jnp.ndarray  # [N] bool.
  bytes_down: jnp.ndarray  # [] float32: bytes the restarted tasks download.
  downloads: jnp.ndarray  # [] int32: tasks restarted.
  dropped: jnp.ndarray  # [] int32: timed-out tasks not counted toward K.
  slot: jnp.ndarray  # [] int32: slot of the K-th arrival, refilled later.
  pending: jnp.ndarray  # [] bool: that slot still needs a task.
  spent: jnp.ndarray  # [N] float32: client_energy after the events.
  depleted_at: jnp.ndarray  # [N] float32: client_depleted_at after them.
  energy: jnp.ndarray  # [] float32: J charged by the events.


def num_local_steps(config: EngineConfig, counts: np.ndarray) -> np.ndarray:
  """Local steps of each client: fixed, or ceil(epochs * n_i / batch)."""
  counts = np.asarray(counts)
  if config.local_epochs is None:
    return np.full(counts.shape, config.local_steps, np.int32)
  return np.maximum(1, np.ceil(config.local_epochs * counts /
                               config.batch_size)).astype(np.int32)


def _eligible(config: EngineConfig, fleet: Fleet, plan: MaskPlan,
              n: int) -> np.ndarray:
  """[N] devices that may train under the memory policy (checked >= C)."""
  need = np.asarray(plan.memory_bytes)[np.asarray(plan.client_tier)]
  if config.memory_policy == "exclude":
    eligible = ~(need > np.asarray(fleet.memory))  # NaN never excludes.
  else:
    eligible = np.ones(n, bool)
  if eligible.sum() < config.concurrency:
    raise ValueError(
        f"memory_policy='exclude' leaves {int(eligible.sum())} of {n} devices "
        f"able to train their mask ({np.nanmax(need) if need.size else 0:.3g} "
        f"bytes needed at most), fewer than concurrency C="
        f"{config.concurrency}; lower concurrency, use a smaller mask, or set "
        "memory_policy='ignore'")
  return eligible


def make_environment(config: EngineConfig, data: ClientData, fleet: Fleet,
                     plan: MaskPlan) -> Environment:
  """Checks the pieces fit together and derives eligibility and deadline.

  Raises:
    ValueError: sizes disagree, or too few devices are eligible to keep C
      tasks in flight (the error names memory_policy and the counts).
  """
  n = data.num_clients
  validate(config, n)
  if fleet.num_clients != n:
    raise ValueError(f"fleet has {fleet.num_clients} devices but the data has "
                     f"{n} clients; num_clients must match")
  if plan.client_tier.shape[0] != n:
    raise ValueError(f"mask plan covers {plan.client_tier.shape[0]} clients, "
                     f"data has {n}")
  steps = num_local_steps(config, np.asarray(data.counts))
  eligible = _eligible(config, fleet, plan, n)
  if config.deadline_s is not None:
    deadline = config.deadline_s
  else:
    # Worst case: a first task (whole model unless deployed). One jitted
    # call: eager, its dozen ops would each compile on their own.
    nominal, _ = one_shot.jit(
        lambda f, p, s: nominal_duration(config.batch_size, f, p,
                                         jnp.arange(n), s,
                                         _deployed(config, n)))(
            fleet, plan, steps)
    deadline = config.deadline_factor * float(
        np.asarray(nominal)[eligible].max())
  return Environment(data=data, fleet=fleet, eligible=jax.device_put(eligible),
                     num_steps=jax.device_put(steps),
                     deadline=jax.device_put(np.float32(deadline)))


def _deployed(config: EngineConfig, n: int) -> jnp.ndarray:
  """[N] bool: devices that hold the starting model before their first task."""
  return jnp.full((n,), config.first_download == "deployed")


def nominal_duration(batch_size: int, fleet: Fleet, plan: MaskPlan,
                     clients: jnp.ndarray, steps: jnp.ndarray,
                     synced: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
  """Task time without jitter, and the bytes each task downloads.

  ``download/bw_down + steps*batch*flops(mask)/speed + upload/bw_up``; a
  client that synced before downloads only the coordinates that can change.
  """
  tier = plan.client_tier[clients]
  down = jnp.where(synced, plan.union_bytes, plan.model_bytes)
  up = plan.upload_bytes[tier]
  compute = (steps * batch_size * plan.flops_per_example[tier] /
             fleet.speed[clients])
  return (down / fleet.bw_down[clients] + compute +
          up / fleet.bw_up[clients]), down



# Candidates drawn per client picked before the exact O(N) fallback.
PICK_OVERSAMPLE = 8


def pick_idle(key: jax.Array, avail: jnp.ndarray, n: int,
              words: jnp.ndarray | None = None) -> jnp.ndarray:
  """``n`` distinct clients, uniformly without replacement among ``avail``.

  Rejection sampling in O(n log n), whatever N: draw ``8n`` client ids
  uniformly, keep in draw order those that are available and not drawn
  before, and take the first ``n``. Accepted draws of a uniform stream are
  an ordered uniform sample without replacement of the available set. If
  fewer than ``n`` are accepted (the fleet is mostly busy or ineligible),
  the exact O(N) pick runs instead: the top ``n`` of one uniform score per
  available client, drawn from ``fold_in(key, 1)``.

  ``words`` are the ``pick_words(n)`` uint32 words the ids come from (two
  an id, ``draws.below``); None draws them here from ``key``.
  """
  size = avail.shape[0]
  m = PICK_OVERSAMPLE * n
  if words is None:
    words = jax.random.bits(key, (pick_words(n),), jnp.uint32)
  cand = draws.below(words[:m], words[m:], size).astype(jnp.int32)
  order = jnp.argsort(cand, stable=True)
  sorted_cand = cand[order]
  dup_sorted = jnp.concatenate([jnp.zeros((1,), bool),
                                sorted_cand[1:] == sorted_cand[:-1]])
  first = jnp.zeros((m,), bool).at[order].set(~dup_sorted)
  accept = avail[cand] & first
  rank = jnp.cumsum(accept) - 1
  fast = jnp.zeros((n,), jnp.int32).at[jnp.where(accept, rank, n)].set(
      cand, mode="drop")

  def exact(_):
    scores = jnp.where(avail, jax.random.uniform(jax.random.fold_in(key, 1),
                                                 (size,)), -1.0)
    return jax.lax.top_k(scores, n)[1].astype(jnp.int32)

  return jax.lax.cond(jnp.sum(accept) >= n, lambda _: fast, exact, None)


def pick_words(n: int) -> int:
  """How many uint32 words ``pick_idle`` draws its candidates from."""
  return 2 * PICK_OVERSAMPLE * n


def task_energy(fleet: Fleet, clients: jnp.ndarray, flops: jnp.ndarray,
                down: jnp.ndarray, up: jnp.ndarray, nominal: jnp.ndarray,
                duration: jnp.ndarray, ok: jnp.ndarray,
                deadline: jnp.ndarray) -> jnp.ndarray:
  """J a task costs its device (docs/design.md, "Energy and batteries").

  Work ``W = j_flop*flops + j_down*down + idle_w*max(duration - nominal,
  0)``: the jitter beyond the nominal time is spent waiting. A task that
  arrives pays ``W + j_up*up``. One that does not pays no upload and the
  share of ``W`` done before it was dropped, ``min(1, deadline/duration)``:
  a timed-out task worked until the deadline; an abandoned one within it is
  taken to quit after its work, before the upload (the model has no time
  of abandonment, so this is an upper bound).
  """
  f = fleet
  work = (f.j_per_flop[clients] * flops + f.j_per_byte_down[clients] * down +
          f.idle_w[clients] * jnp.maximum(duration - nominal, 0.0))
  share = jnp.minimum(1.0, deadline / duration)
  return jnp.where(ok, work + f.j_per_byte_up[clients] * up, share * work)


def dispatch(env: Environment, plan: MaskPlan, key: jax.Array,
             busy: jnp.ndarray, synced: jnp.ndarray, clock: jnp.ndarray,
             n: int, batch_size: int,
             alive: jnp.ndarray | None = None) -> Dispatch:
  """Phase 5: starts ``n`` tasks on idle eligible clients, uniformly.

  ``alive`` [N] (None: all) leaves out devices whose battery ran out. With
  fewer free devices than ``n``, the rest of the slots stay empty: no
  task, arrival inf, nothing charged or counted.
  """
  # One threefry call for the whole dispatch (draws' docstring says why).
  n_pick = pick_words(n)
  words = jax.random.bits(key, (n_pick + 2 * n,), jnp.uint32)
  avail = env.eligible & ~busy
  avail = avail if alive is None else avail & alive
  clients = pick_idle(key, avail, n, words[:n_pick])
  started = avail[clients]  # False only where fewer than n were free.
  f = env.fleet
  steps = env.num_steps[clients]
  nominal, down = nominal_duration(batch_size, f, plan, clients, steps,
                                   synced[clients])
  duration = nominal * jnp.exp(
      f.task_sigma * draws.normal(words[n_pick:n_pick + n]))
  abandoned = draws.uniform(words[n_pick + n:]) < f.dropout[clients]
  ok = ~abandoned & (duration <= env.deadline) & started
  tier = plan.client_tier[clients]
  energy = task_energy(f, clients, steps * batch_size *
                       plan.flops_per_example[tier], down,
                       plan.upload_bytes[tier], nominal, duration, ok,
                       env.deadline)
  at = jnp.where(started, clients, busy.shape[0])  # N: a dropped write.
  return Dispatch(
      clients=clients, arrival=jnp.where(started, clock + jnp.where(
          ok, duration, env.deadline), jnp.inf), ok=ok,
      bytes_down=jnp.sum(jnp.where(started, down, 0.0)),
      busy=busy.at[at].set(True, mode="drop"),
      synced=synced.at[at].set(True, mode="drop"), started=started,
      energy=jnp.where(started, energy, 0.0))


def take_arrivals(state: SimState, k: int) -> Arrivals:
  """Phase 1: the K earliest arrivals (ties go to the lower slot); empty
  slots (fewer tasks than K in flight) are taken unfilled."""
  neg_arrival, slots = jax.lax.top_k(-state.tasks.arrival, k)
  filled = jnp.isfinite(neg_arrival)
  versions = state.tasks.version[slots]
  ring_slot = versions % state.ring.size
  return Arrivals(
      slots=slots, clients=state.tasks.client[slots],
      tau=state.version - versions, ok=state.tasks.ok[slots],
      fresh=state.ring.version[ring_slot] == versions, ring_slot=ring_slot,
      clock=jnp.maximum(state.clock, jnp.max(
          jnp.where(filled, -neg_arrival, -jnp.inf))), filled=filled)


def charge(fleet: Fleet, spent: jnp.ndarray, depleted_at: jnp.ndarray,
           clients: jnp.ndarray, energy: jnp.ndarray, t: jnp.ndarray
           ) -> tuple[jnp.ndarray, jnp.ndarray]:
  """Adds ``energy`` [n] to distinct ``clients`` [n] at virtual time ``t``.

  With batteries, a device still in the fleet whose spent energy passes
  its capacity plus its recharge since time 0 (``recharge_w * t``) leaves
  it at ``t``. A client index of N (out of range) is ignored.

  Returns:
    ``(spent, depleted_at)``, both [N].
  """
  spent = spent.at[clients].add(energy, mode="drop")
  if fleet.battery_j is None:  # static: no batteries
    return spent, depleted_at
  n = spent.shape[0]
  c = jnp.minimum(clients, n - 1)
  recharged = 0.0 if fleet.recharge_w is None else fleet.recharge_w * t
  out = ((spent[c] > fleet.battery_j[c] + recharged) &
         jnp.isinf(depleted_at[c]))
  return spent, depleted_at.at[jnp.where(out, clients, n)].set(t, mode="drop")


def _restart(env: Environment, plan: MaskPlan, key: jax.Array, tasks: Tasks,
             busy, synced, slot, clock, version, batch_size: int, alive):
  """Starts one task in ``slot`` at ``clock`` from ``version`` (the slot
  stays empty if no live device is free); also returns whether it did."""
  d = dispatch(env, plan, key, busy, synced, clock, 1, batch_size, alive)
  tasks = Tasks(client=tasks.client.at[slot].set(d.clients[0]),
                version=tasks.version.at[slot].set(version),
                arrival=tasks.arrival.at[slot].set(d.arrival[0]),
                ok=tasks.ok.at[slot].set(d.ok[0]),
                energy=tasks.energy.at[slot].set(d.energy[0]))
  return tasks, d.busy, d.synced, d.bytes_down, d.started[0]


def collect_arrivals(env: Environment, state: SimState, key: jax.Array, k: int,
                     batch_size: int, count_timeouts: bool = False,
                     max_events: int | None = None
                     ) -> tuple[Arrivals, Refilled]:
  """Phase 1 with arrival refill: events in time order until K updates.

  Each event is the earliest arrival among the C tasks in flight. An update
  that arrived joins the buffer; a timed-out task joins it only with
  ``count_timeouts``. Every event but the one that fills the buffer frees
  its slot and a new task starts there at once, from the current version,
  so C tasks stay in flight; the K-th arrival's slot is refilled after the
  server update, from the new version. At most ``max_events`` (default 64
  K) events are taken per step, so a fleet that never delivers cannot hang
  the step; the step then applies what it has. The events also stop when
  no task is in flight (every slot empty: batteries ran out). Each event
  charges its task's energy to its device (``charge``) at its time.
  """
  cap = 64 * k if max_events is None else max_events
  init = dict(tasks=state.tasks, busy=state.client_busy,
              synced=state.client_synced, n=jnp.zeros((), jnp.int32),
              events=jnp.zeros((), jnp.int32), clock=state.clock,
              client=jnp.zeros((k,), jnp.int32),
              version=jnp.full((k,), state.version, jnp.int32),
              ok=jnp.zeros((k,), bool), slots=jnp.zeros((k,), jnp.int32),
              slot=jnp.zeros((), jnp.int32), down=jnp.zeros((), jnp.float32),
              restarts=jnp.zeros((), jnp.int32),
              dropped=jnp.zeros((), jnp.int32), spent=state.client_energy,
              depleted_at=state.client_depleted_at,
              energy=jnp.zeros((), jnp.float32))
  c = jax.lax.while_loop(
      lambda c: ((c["n"] < k) & (c["events"] < cap) &
                 jnp.isfinite(jnp.min(c["tasks"].arrival))),
      lambda c: _next_event(env, state, key, k, batch_size, count_timeouts, c),
      init)
  versions = c["version"]
  ring_slot = versions % state.ring.size
  arrivals = Arrivals(
      slots=c["slots"], clients=c["client"],
      tau=state.version - versions, ok=c["ok"],
      fresh=state.ring.version[ring_slot] == versions, ring_slot=ring_slot,
      clock=c["clock"], filled=jnp.arange(k) < c["n"])
  refilled = Refilled(tasks=c["tasks"], busy=c["busy"], synced=c["synced"],
                      bytes_down=c["down"], downloads=c["restarts"],
                      dropped=c["dropped"], slot=c["slot"],
                      pending=c["n"] == k, spent=c["spent"],
                      depleted_at=c["depleted_at"], energy=c["energy"])
  return arrivals, refilled


def _next_event(env: Environment, state: SimState, key: jax.Array, k: int,
                batch_size: int, count_timeouts: bool, c: dict) -> dict:
  """One event of ``collect_arrivals``: the earliest task arrives (or times
  out), joins the buffer if it counts, and its slot restarts unless the
  buffer is now full."""
  tasks = c["tasks"]
  j = jnp.argmin(tasks.arrival)
  t, ok, client = tasks.arrival[j], tasks.ok[j], tasks.client[j]
  version = tasks.version[j]
  counted = ok | count_timeouts
  pos = jnp.where(counted, c["n"], k)  # k: out of range, dropped write.
  n = c["n"] + counted.astype(jnp.int32)
  busy = c["busy"].at[client].set(False)
  full = n == k
  spent, depleted_at = charge(env.fleet, c["spent"], c["depleted_at"],
                              client[None], tasks.energy[j][None], t)

  def restart(args):
    tasks, busy, synced = args
    return _restart(env, state.plan, jax.random.fold_in(key, c["events"]),
                    tasks, busy, synced, j, t, state.version, batch_size,
                    jnp.isinf(depleted_at))

  tasks, busy, synced, down, started = jax.lax.cond(
      full, lambda a: (*a, jnp.zeros((), jnp.float32), jnp.zeros((), bool)),
      restart, (tasks, busy, c["synced"]))
  return dict(
      spent=spent, depleted_at=depleted_at,
      energy=c["energy"] + c["tasks"].energy[j],
      tasks=tasks, busy=busy, synced=synced, n=n, events=c["events"] + 1,
      clock=jnp.maximum(c["clock"], t),
      client=c["client"].at[pos].set(client, mode="drop"),
      version=c["version"].at[pos].set(version, mode="drop"),
      slots=c["slots"].at[pos].set(j, mode="drop"),
      ok=c["ok"].at[pos].set(ok, mode="drop"),
      slot=jnp.where(full, j, c["slot"]),
      down=c["down"] + down, restarts=c["restarts"] + started,
      dropped=c["dropped"] + (~ok & ~counted))


def _client_delta(comp: Components, env: Environment, plan: MaskPlan,
                  ring: Ring, mix_into: PyTree | None,
                  fleet_mean: PyTree | None):
  """``one(args) -> (delta, loss, state)`` for one client's ``args``
  (``_client_args``); the state is None unless the run keeps per-device
  state.

  Base parameters and masks are gathered inside the per-client function,
  so the ``map`` and ``stream`` paths never materialize [K, ...] copies.
  """
  single_tier = plan.num_tiers == 1  # static
  attack = env.fleet.attack  # static
  custom = comp.extensions.client_update is not None  # static

  def one(a):
    base = jax.tree.map(lambda r: r[a["slot"]], ring.params)
    mask = jax.tree.map(lambda m: m[0] if single_tier else m[a["tier"]],
                        plan.masks)
    data = LocalData(source=env.data, offset=a["offset"], count=a["count"],
                     num_steps=a["steps"])
    state = (PerDevice(own=a["own"], fleet_mean=fleet_mean) if "own" in a
             else None)
    result = comp.client_update(a["key"], base, mask, data, state)
    if mix_into is not None:
      delta = jax.tree.map(lambda w, g, m: m * (w - g), result.params,
                           mix_into, mask)
    elif custom:
      # A client update of the user's may move any coordinate; only the
      # masked ones are sent.
      delta = jax.tree.map(lambda w, g, m: m * (w - g), result.params, base,
                           mask)
    else:
      # Masked gradients leave unmasked coordinates exactly where they
      # were, so the delta is already zero outside the client's mask.
      delta = jax.tree.map(jnp.subtract, result.params, base)
    if attack is not None:
      delta = adversary.corrupt(attack, delta, mask, a["key"], a["bad"])
    return delta, result.loss, result.state if "own" in a else None

  return one


def _client_args(env: Environment, plan: MaskPlan, ring: Ring,
                 keys: jax.Array, arrivals: Arrivals,
                 own: PyTree | None = None) -> dict:
  """Per-client arguments of a step's K updates, leading axis K."""
  clients = arrivals.clients
  args = dict(key=keys, slot=arrivals.ring_slot,
              tier=plan.client_tier[clients],
              offset=env.data.offsets[clients],
              count=env.data.counts[clients], steps=env.num_steps[clients])
  if own is not None:
    args["own"] = own
  if env.fleet.attack is None:
    return args
  bad = env.fleet.malicious[clients]
  if env.fleet.attack.behavior == "stale_replay":
    args["slot"] = jnp.where(bad, adversary.oldest_slot(ring.version),
                             args["slot"])
  args["bad"] = bad
  return args


def _finite_rows(delta: PyTree) -> jnp.ndarray:
  """[K] bool: client i's update (row i of every leaf) is finite.

  A row sum is non-finite iff the row has NaN/Inf (or overflows, which is
  rejected too); one contiguous pass instead of isfinite + all.
  """
  k = jax.tree.leaves(delta)[0].shape[0]
  return jnp.isfinite(sum(jnp.sum(d.reshape(k, -1), axis=1)
                          for d in jax.tree.leaves(delta)))


def train_buffer(comp: Components, env: Environment, plan: MaskPlan,
                 ring: Ring, keys: jax.Array, arrivals: Arrivals,
                 mix_into: PyTree | None = None,
                 device: tuple[PyTree, PyTree] | None = None):
  """Phase 2: trains the K arrived clients from the versions they pulled.

  Args:
    comp: the bound pieces (``client_update``; ``batching`` ``map`` or
      ``vmap`` over the K clients, over each device's share of them on the
      clients ``mesh``; ``config.client_chunk`` clients vmapped together
      per ``map`` iteration).
    env: the environment (data, step counts).
    plan: the live mask plan.
    ring: the stored global versions.
    keys: [K] training keys, one per buffered update.
    arrivals: the buffered updates.
    mix_into: None for ``update_rule='delta'`` (``w_client - w_pulled``);
      the current global params for ``mixing`` (``m * (w_client - w_now)``).
    device: per-device state: ``(own rows [K, ...], fleet mean)``; None
      without.

  Returns:
    ``(delta, loss, finite, state)``: deltas (leaves [K, ...], zero outside
    each client's mask and zeroed where non-finite, sharded along K on a
    mesh), mean local losses [K], [K] bool whether the update was finite,
    and the clients' new states (leaves [K, ...]; None without).
  """
  chunk = comp.config.client_chunk

  def local(env, plan, ring, mix_into, fleet_mean, args):
    one = _client_delta(comp, env, plan, ring, mix_into, fleet_mean)
    if comp.batching == "vmap":
      return jax.vmap(one)(args)
    return jax.lax.map(one, args, batch_size=chunk if chunk > 1 else None)

  own, fleet_mean = device if device is not None else (None, None)
  args, _ = _pad_clients(comp.mesh, _client_args(env, plan, ring, keys,
                                                 arrivals, own))
  k = arrivals.clients.shape[0]
  delta, loss, state = jax.tree.map(lambda x: x[:k], _over_clients(
      comp.mesh, local, (env, plan, ring, mix_into, fleet_mean), args,
      (P(CLIENT_AXIS),) * 3))
  finite = _finite_rows(delta)
  delta = jax.lax.cond(
      jnp.all(finite), lambda d: d,
      lambda d: jax.tree.map(lambda x: jnp.where(
          finite.reshape((k,) + (1,) * (x.ndim - 1)), x, 0.0), d), delta)
  return delta, loss, finite, state


# One function so the streamed sum's loop, mesh split and psum read as the
# buffered phase they replace; most of its length is the docstring.
def train_and_sum(comp: Components, env: Environment, plan: MaskPlan,
                  ring: Ring, keys: jax.Array, arrivals: Arrivals,
                  weights: jnp.ndarray, mix_into: PyTree | None = None,
                  device: tuple[PyTree, PyTree] | None = None):
  """Phase 2 streamed: trains the K clients one after another and keeps
  only the running sum ``sum_i a_i d_i`` over finite updates.

  Materializing K deltas costs as much memory traffic as the training on a
  CPU (measured: 288 against 482 updates/s for 100 MLP clients), so when
  the aggregator weighs before training (``transforms``, streamable) the
  buffer is never built. Same arguments as ``train_buffer`` plus
  ``weights`` [K]; with a mesh, each device streams its share and the
  partial sums are added across devices (``psum``). ``client_chunk`` > 1
  streams groups of that many clients, vmapped together (the last group
  may be smaller).

  Returns:
    ``(total, loss, finite, state)``.
  """
  chunk = comp.config.client_chunk

  def local(env, plan, ring, mix_into, fleet_mean, xs):
    one = _client_delta(comp, env, plan, ring, mix_into, fleet_mean)

    def body(total, xs):
      w, a = xs
      delta, loss, state = one(a)
      finite = jnp.isfinite(sum(jnp.sum(d) for d in jax.tree.leaves(delta)))
      total = jax.tree.map(lambda t, d: t + jnp.where(finite, w * d, 0.0),
                           total, delta)
      return total, (loss, finite, state)

    def chunk_body(total, xs):
      # ``chunk`` clients vmapped together: one wider matmul per layer
      # instead of several narrow ones.
      w, a = xs
      delta, loss, state = jax.vmap(one)(a)
      finite = _finite_rows(delta)
      wf = jnp.where(finite, w, 0.0)
      total = jax.tree.map(
          lambda t, d: t + jnp.tensordot(
              wf, jnp.where(finite.reshape((-1,) + (1,) * (d.ndim - 1)), d,
                            0.0), axes=1), total, delta)
      return total, (loss, finite, state)

    zero = jax.tree.map(lambda r: jnp.zeros(r.shape[1:], r.dtype),
                        ring.params)
    if chunk == 1:
      total, rest = jax.lax.scan(body, zero, xs)
    else:
      total, rest = _chunked_scan(chunk_body, zero, xs, chunk)
    if mesh is not None:
      total = jax.lax.psum(total, CLIENT_AXIS)
    return total, rest

  mesh = comp.mesh
  own, fleet_mean = device if device is not None else (None, None)
  args, weights = _pad_clients(
      mesh, _client_args(env, plan, ring, keys, arrivals, own), weights)
  k = arrivals.clients.shape[0]
  total, rest = _over_clients(
      mesh, local, (env, plan, ring, mix_into, fleet_mean), (weights, args),
      (P(), (P(CLIENT_AXIS),) * 3))
  loss, finite, state = jax.tree.map(lambda x: x[:k], rest)
  return total, loss, finite, state


def _chunked_scan(body: Callable, carry, xs, chunk: int):
  """``lax.scan`` of ``body`` over groups of ``chunk`` rows of ``xs`` (and
  one smaller group for the remainder); outputs concatenated per row."""
  n = jax.tree.leaves(xs)[0].shape[0]
  q, r = divmod(n, chunk)
  outs = []
  if q:
    main = jax.tree.map(lambda a: a[:q * chunk].reshape(
        (q, chunk) + a.shape[1:]), xs)
    carry, out = jax.lax.scan(body, carry, main)
    outs.append(jax.tree.map(lambda o: o.reshape((q * chunk,) + o.shape[2:]),
                             out))
  if r:
    carry, out = body(carry, jax.tree.map(lambda a: a[q * chunk:], xs))
    outs.append(out)
  return carry, jax.tree.map(lambda *o: jnp.concatenate(o), *outs)


def client_mesh(devices: int, buffer_size: int) -> Mesh | None:
  """The 1-D ``clients`` mesh a step's K clients are split across.

  Args:
    devices: how many devices; 0 (auto) takes every device JAX sees, at
      most K (a device beyond K would only train padding).
    buffer_size: K.

  Returns:
    None for one device (no sharding), else a Mesh over the first devices.

  Raises:
    ValueError: more devices than there are (the error names mesh_devices).
  """
  available = jax.devices()
  if devices == 0:
    devices = min(len(available), buffer_size)
  if devices > len(available):
    raise ValueError(
        f"mesh_devices={devices}: at most the {len(available)} devices JAX "
        "sees; 0 takes all of them")
  if devices == 1:
    return None
  return Mesh(np.asarray(available[:devices]), (CLIENT_AXIS,))


def padding_report(mesh: Mesh | None, buffer_size: int) -> dict:
  """How a step's K clients are padded to a multiple of the mesh's devices:
  K, the padded size, the devices and the fraction of slots that pad."""
  d = 1 if mesh is None else int(mesh.devices.size)
  padded = -(-buffer_size // d) * d
  return {"buffer_size": buffer_size, "padded_size": padded, "devices": d,
          "padding_fraction": (padded - buffer_size) / padded}


def _pad_clients(mesh: Mesh | None, args: dict,
                 weights: jnp.ndarray | None = None):
  """``args`` (leading axis K) padded to a multiple of the mesh's devices
  with slots that train nothing: copies of the first client's arguments
  with no local step (and weight 0). The callers slice every output back
  to K, so a padding slot counts nowhere, whatever it computed."""
  k = args["key"].shape[0]
  pad = padding_report(mesh, k)["padded_size"] - k
  if not pad:
    return args, weights
  fill = lambda x: jnp.concatenate(
      [x, jnp.broadcast_to(x[:1], (pad,) + x.shape[1:])])
  args = jax.tree.map(fill, args)
  args["steps"] = args["steps"].at[k:].set(0)
  if "bad" in args:  # a padding slot is nobody's, an attacker's least.
    args["bad"] = args["bad"].at[k:].set(False)
  if weights is not None:
    weights = jnp.concatenate([weights, jnp.zeros((pad,), weights.dtype)])
  return args, weights


def _over_clients(mesh: Mesh | None, local: Callable, replicated: tuple,
                  per_client, out_specs):
  """``local(*replicated, per_client)`` on one device, or with the leading
  (client) axis of ``per_client`` split across ``mesh``."""
  if mesh is None:
    return local(*replicated, per_client)
  # check_vma off: the streamed sum starts from a replicated zero and
  # becomes per-device inside the scan; its psum makes it replicated again.
  return jax.shard_map(
      local, mesh=mesh, in_specs=(P(),) * len(replicated) + (P(CLIENT_AXIS),),
      out_specs=out_specs, check_vma=False)(*replicated, per_client)


def server_update(server_opt: optax.GradientTransformation, state: SimState,
                  agg: PyTree, any_valid: jnp.ndarray
                  ) -> tuple[PyTree, PyTree, Ring, jnp.ndarray]:
  """Phase 4: apply the aggregate and push.

  A step with nothing valid leaves the model as it is; so does a step whose
  result would be non-finite (finite updates can still overflow): that step
  is refused, and the model and optimizer state are kept.

  Returns:
    ``(params, opt_state, ring, refused)`` after the step.
  """
  updates, opt_state = server_opt.update(
      jax.tree.map(jnp.negative, agg), state.opt_state, state.params)
  new = optax.apply_updates(state.params, updates)
  finite = jnp.isfinite(sum(jnp.sum(p) for p in jax.tree.leaves(new)))
  take = any_valid & finite
  params = optax.tree_utils.tree_where(take, new, state.params)
  opt_state = optax.tree_utils.tree_where(take, opt_state, state.opt_state)
  return (params, opt_state, state.ring.push(state.version + 1, params),
          any_valid & ~finite)


def count(counters: Counters, arrivals: Arrivals, w: transforms.Buffer,
          upload_bytes: jnp.ndarray, bytes_down: jnp.ndarray,
          downloads: jnp.ndarray, extra_dropped: jnp.ndarray | int = 0
          ) -> tuple[Counters, jnp.ndarray, jnp.ndarray]:
  """Phase 6: adds one step to the cumulative counters.

  Args:
    counters: before the step.
    arrivals: the buffered updates.
    w: their buffer after the aggregator's transforms (``valid``,
      ``weights``).
    upload_bytes: [K] bytes each buffered update uploads if it arrived.
    bytes_down: [] bytes downloaded by the tasks this step started.
    downloads: [] how many tasks this step started.
    extra_dropped: timed-out tasks that did not enter the buffer.

  Returns:
    ``(counters, n_applied, tau_sum)`` with this step's applied updates.
  """
  ok, fresh, tau = arrivals.ok, arrivals.fresh, arrivals.tau
  s = counters.staleness_hist.shape[0] - 1
  up = jnp.sum(jnp.where(ok, upload_bytes, 0.0))
  applied = w.valid & (w.weights > 0)
  n_applied = jnp.sum(applied).astype(jnp.int32)
  tau_sum = jnp.sum(jnp.where(applied, tau, 0)).astype(jnp.float32)
  c = counters
  return Counters(
      updates_applied=c.updates_applied + n_applied,
      updates_dropped=(c.updates_dropped + jnp.sum(~ok & arrivals.filled) +
                       extra_dropped),
      updates_stale=c.updates_stale + jnp.sum(ok & ~fresh),
      updates_nonfinite=c.updates_nonfinite + jnp.sum(ok & fresh & ~w.valid),
      steps_refused=c.steps_refused, updates_clipped=c.updates_clipped,
      values_trimmed=c.values_trimmed, values_robust=c.values_robust,
      staleness_sum=exact.add(c.staleness_sum, tau_sum),
      staleness_sum_arrivals=exact.add(
          c.staleness_sum_arrivals, jnp.sum(jnp.where(ok, tau, 0))),
      staleness_hist=c.staleness_hist.at[jnp.minimum(tau, s)].add(
          ok.astype(jnp.int32)),
      bytes_up=exact.add(c.bytes_up, up),
      bytes_down=exact.add(c.bytes_down, bytes_down),
      probe_bytes_up=c.probe_bytes_up, probe_bytes_down=c.probe_bytes_down,
      uploads=c.uploads + jnp.sum(ok),
      downloads=c.downloads + downloads, energy_j=c.energy_j), n_applied, \
      tau_sum


def replan(state: SimState, plan: MaskPlan, bytes_up: float = 0.0,
           bytes_down: float = 0.0) -> SimState:
  """Swaps in a new mask plan (a re-search) and counts its probe traffic."""
  c = state.counters
  return state.replace(plan=plan, counters=c.replace(
      probe_bytes_up=exact.add_pair(c.probe_bytes_up, exact.of(bytes_up)),
      probe_bytes_down=exact.add_pair(c.probe_bytes_down,
                                      exact.of(bytes_down))))


def init_state(comp: Components, key: jax.Array, env: Environment,
               params: PyTree, plan: MaskPlan, start: Start | None = None
               ) -> SimState:
  """Version 0 in the ring and C tasks dispatched at ``start.clock``."""
  config = comp.config
  start = Start.of() if start is None else start
  n = env.data.num_clients
  c = config.concurrency
  started = dispatch(env, plan, jax.random.fold_in(key, _KEY_INIT),
                     jnp.zeros((n,), bool), _deployed(config, n),
                     start.clock, c, config.batch_size)
  counters = Counters.create(config.ring_size, probe_bytes_up=start.bytes_up,
                             probe_bytes_down=start.bytes_down)
  counters = counters.replace(
      bytes_down=exact.add(counters.bytes_down, started.bytes_down),
      downloads=jnp.asarray(c, jnp.int32))
  device_state = ()
  if comp.device_state is not None:
    device_state = _placed_table(comp, jax.tree.map(
        lambda v: jnp.broadcast_to(v, (n,) + jnp.shape(v)),
        comp.device_state.init(params)))
  return SimState(
      params=params, opt_state=comp.server_optimizer.init(params),
      ring=Ring.create(params, config.ring_size),
      version=jnp.zeros((), jnp.int32), clock=start.clock,
      tasks=Tasks(client=started.clients.astype(jnp.int32),
                  version=jnp.zeros((c,), jnp.int32),
                  arrival=started.arrival, ok=started.ok,
                  energy=started.energy),
      client_busy=started.busy, client_synced=started.synced,
      counters=counters, plan=plan, key=jnp.asarray(key),
      client_applied=jnp.zeros((n,), jnp.int32),
      client_staleness=jnp.zeros((n,), jnp.int32),
      client_energy=jnp.zeros((n,), jnp.float32),
      client_depleted_at=jnp.full((n,), jnp.inf, jnp.float32),
      agg_state=comp.aggregator.init(params), device_state=device_state)


def _arrivals_and_keys(config: EngineConfig, env: Environment,
                       state: SimState, rkey: jax.Array):
  """Phase 1 for either refill mode, with the buffer's training keys."""
  k = config.buffer_size
  k_train = jax.random.fold_in(rkey, _KEY_TRAIN)
  if config.refill == "step":
    arrivals = take_arrivals(state, k)
    keys = jax.vmap(jax.random.fold_in, (None, 0))(k_train, arrivals.clients)
    return arrivals, None, keys
  arrivals, refilled = collect_arrivals(
      env, state, jax.random.fold_in(rkey, _KEY_EVENTS), k, config.batch_size,
      config.count_timeouts)
  # A client may arrive twice in one buffer; its two tasks train apart.
  keys = jax.vmap(lambda i, c: jax.random.fold_in(
      jax.random.fold_in(k_train, i), c))(jnp.arange(k), arrivals.clients)
  return arrivals, refilled, keys


def _charge_arrivals(env: Environment, state: SimState, arrivals: Arrivals,
                     refilled: Refilled | None):
  """Energy of this step's arrivals: ``(client_energy, client_depleted_at,
  J charged)``. Arrival refill charged each event as it came; step refill
  charges the K arrivals at the step's clock, and an update that arrived
  also pays ``idle_w`` for its wait from its arrival to that clock (the
  synchronous round's straggler wait)."""
  if refilled is not None:
    return refilled.spent, refilled.depleted_at, refilled.energy
  slots, clients = arrivals.slots, arrivals.clients
  wait = arrivals.clock - state.tasks.arrival[slots]
  energy = state.tasks.energy[slots] + jnp.where(
      arrivals.ok, env.fleet.idle_w[clients] * wait, 0.0)
  energy = jnp.where(arrivals.filled, energy, 0.0)
  spent, depleted_at = charge(
      env.fleet, state.client_energy, state.client_depleted_at,
      jnp.where(arrivals.filled, clients, state.client_energy.shape[0]),
      energy, arrivals.clock)
  return spent, depleted_at, jnp.sum(energy)


def _start_next(config: EngineConfig, env: Environment, state: SimState,
                arrivals: Arrivals, refilled: Refilled | None,
                key: jax.Array, version: jnp.ndarray, alive: jnp.ndarray):
  """Phase 5: tasks from the new version on live devices; returns (tasks,
  busy, synced, bytes downloaded this step, tasks started this step, extra
  drops)."""
  plan, k = state.plan, config.buffer_size
  if refilled is None:  # Step refill: the K freed slots, together.
    freed = jnp.where(arrivals.filled, arrivals.clients, alive.shape[0])
    started = dispatch(env, plan, key,
                       state.client_busy.at[freed].set(False, mode="drop"),
                       state.client_synced, arrivals.clock, k,
                       config.batch_size, alive)
    slots = arrivals.slots
    tasks = Tasks(
        client=state.tasks.client.at[slots].set(started.clients),
        version=state.tasks.version.at[slots].set(
            jnp.full((k,), version, jnp.int32)),
        arrival=state.tasks.arrival.at[slots].set(started.arrival),
        ok=state.tasks.ok.at[slots].set(started.ok),
        energy=state.tasks.energy.at[slots].set(started.energy))
    return (tasks, started.busy, started.synced, started.bytes_down,
            jnp.sum(started.started).astype(jnp.int32), 0)

  def restart(args):
    return _restart(env, plan, key, *args, refilled.slot, arrivals.clock,
                    version, config.batch_size, alive)

  tasks, busy, synced, down, restarted = jax.lax.cond(
      refilled.pending, restart,
      lambda a: (*a, jnp.zeros((), jnp.float32), jnp.zeros((), bool)),
      (refilled.tasks, refilled.busy, refilled.synced))
  return (tasks, busy, synced, refilled.bytes_down + down,
          refilled.downloads + restarted, refilled.dropped)


def _device_rows(comp: Components, state: SimState, clients: jnp.ndarray
                 ) -> tuple[PyTree, PyTree] | None:
  """``(own rows [K, ...], fleet mean)`` of the per-device state; None
  when the run keeps none. The fleet mean is dropped by XLA when no client
  update reads it."""
  if comp.device_state is None:
    return None
  table = state.device_state
  return (jax.tree.map(lambda t: t[clients], table),
          jax.tree.map(lambda t: jnp.mean(t, axis=0), table))


def device_state_sharding(mesh: Mesh | None, n: int):
  """Where the per-device table lives: split by device along the clients
  mesh when it has one and N divides evenly, else like the rest of the
  state (replicated on the mesh; None without one)."""
  if mesh is None:
    return None
  spec = P(CLIENT_AXIS) if n % mesh.devices.size == 0 else P()
  return NamedSharding(mesh, spec)


def _placed_table(comp: Components, table: PyTree) -> PyTree:
  """``table`` constrained to ``device_state_sharding`` inside a jit, so
  the step's output table is laid out as its input was."""
  leaves = jax.tree.leaves(table)
  if comp.mesh is None or not leaves:
    return table
  sharding = device_state_sharding(comp.mesh, leaves[0].shape[0])
  return jax.lax.with_sharding_constraint(table, sharding)


def _last_writes(clients: jnp.ndarray, write: jnp.ndarray) -> jnp.ndarray:
  """[K] bool: ``write`` rows that no later written row of the same client
  follows (a device that arrives twice in one buffer keeps its later
  state; a scatter of duplicates would pick either)."""
  k = clients.shape[0]
  n = jnp.iinfo(jnp.int32).max
  eff = jnp.where(write, clients, n)
  order = jnp.argsort(eff, stable=True)
  s = eff[order]
  last = jnp.concatenate([s[:-1] != s[1:], jnp.ones((1,), bool)]) & (s < n)
  return jnp.zeros((k,), bool).at[order].set(last)


def _write_device_state(table: PyTree, clients: jnp.ndarray,
                        rows: PyTree, write: jnp.ndarray) -> PyTree:
  """``table`` with ``rows`` [K, ...] written at ``clients`` where
  ``write``: every task that completed (arrived, finite), whether or not
  the server applied its update, as the device itself kept it."""
  keep = _last_writes(clients, write)
  n = jax.tree.leaves(table)[0].shape[0]
  at = jnp.where(keep, clients, n)  # n: out of range, a dropped write.
  return jax.tree.map(lambda t, r: t.at[at].set(r, mode="drop"), table, rows)


def _train_and_aggregate(comp: Components, env: Environment,
                         state: SimState, arrivals: Arrivals,
                         keys: jax.Array, agg_key: jax.Array):
  """Phases 2-3 and the aggregate.

  A streamable aggregator weighs the buffer before training and the
  clients are streamed into its weighted sum (``train_and_sum``);
  otherwise the K deltas are materialized (``train_buffer``) and the
  aggregator's transforms read them.

  Returns:
    ``(aggregate, buffer, aggregator state, (new device rows, finite))``.
  """
  plan = state.plan
  clients = arrivals.clients
  buf = transforms.Buffer.start(arrivals.ok & arrivals.fresh, arrivals.tau,
                                env.data.counts[clients],
                                plan.client_tier[clients], clients)
  ctx = transforms.Context(masks=plan.masks, key=agg_key,
                           params=state.params)
  mix_into = state.params if comp.config.update_rule == "mixing" else None
  device = _device_rows(comp, state, clients)
  agg = comp.aggregator
  if comp.batching == "stream":
    buf, agg_state = agg.transform.update(buf, state.agg_state, ctx)
    total, loss, finite, rows = train_and_sum(comp, env, plan, state.ring,
                                              keys, arrivals, buf.weights,
                                              mix_into, device)
    buf = buf.invalidate(~finite).replace(loss=loss)
    return (agg.reduction.reduce(buf, ctx, total), buf, agg_state,
            (rows, finite))
  delta, loss, finite, rows = train_buffer(comp, env, plan, state.ring, keys,
                                           arrivals, mix_into, device)
  buf = buf.invalidate(~finite).replace(deltas=delta, loss=loss)
  buf, agg_state = agg.transform.update(buf, state.agg_state, ctx)
  return agg.reduction.reduce(buf, ctx, None), buf, agg_state, (rows, finite)


def _per_client(state: SimState, arrivals: Arrivals, applied: jnp.ndarray
                ) -> dict:
  """Per-device tallies: updates applied, and the sum of their ages."""
  c = arrivals.clients
  return dict(
      client_applied=state.client_applied.at[c].add(applied.astype(
          jnp.int32)),
      client_staleness=state.client_staleness.at[c].add(
          jnp.where(applied, arrivals.tau, 0).astype(jnp.int32)))


def step_state(comp: Components, env: Environment, state: SimState
               ) -> tuple[SimState, dict]:
  """One server step: the six phases in order, and a flat dict of scalars."""
  config = comp.config
  rkey = jax.random.fold_in(jax.random.fold_in(state.key, _KEY_ROUND),
                            state.version)
  arrivals, refilled, keys = _arrivals_and_keys(config, env, state, rkey)
  agg, buf, agg_state, (rows, finite) = _train_and_aggregate(
      comp, env, state, arrivals, keys, jax.random.fold_in(rkey, _KEY_DP))
  any_valid = jnp.any(buf.valid)
  params, opt_state, ring, refused = server_update(comp.server_optimizer,
                                                   state, agg, any_valid)
  version = state.version + 1
  spent, depleted_at, energy = _charge_arrivals(env, state, arrivals,
                                                refilled)
  tasks, busy, synced, down, n_started, dropped = _start_next(
      config, env, state, arrivals, refilled,
      jax.random.fold_in(rkey, _KEY_DISPATCH), version,
      jnp.isinf(depleted_at))
  tier = state.plan.client_tier[arrivals.clients]
  counters, n_applied, tau_sum = count(
      state.counters, arrivals, buf, state.plan.upload_bytes[tier], down,
      n_started, dropped)
  counters = counters.replace(
      steps_refused=counters.steps_refused + refused.astype(jnp.int32),
      updates_clipped=counters.updates_clipped + buf.updates_clipped,
      values_trimmed=exact.add(counters.values_trimmed, buf.values_trimmed),
      values_robust=exact.add(counters.values_robust, buf.values_robust),
      energy_j=exact.add(counters.energy_j, energy))
  device_state = state.device_state
  if comp.device_state is not None:
    device_state = _placed_table(comp, _write_device_state(
        device_state, arrivals.clients, rows,
        arrivals.ok & arrivals.filled & finite))
  taken = any_valid & ~refused
  new_state = state.replace(
      params=params, opt_state=opt_state, ring=ring, version=version,
      clock=arrivals.clock, tasks=tasks, client_busy=busy,
      client_synced=synced, counters=counters,
      client_energy=spent, client_depleted_at=depleted_at,
      agg_state=optax.tree_utils.tree_where(taken, agg_state,
                                            state.agg_state),
      device_state=device_state,
      **_per_client(state, arrivals, buf.valid & (buf.weights > 0) &
                    ~refused))
  applied = buf.valid & (buf.weights > 0)
  metrics = {
      "virtual_time_s": arrivals.clock,
      "updates_applied": n_applied,
      "mean_staleness": tau_sum / jnp.maximum(n_applied, 1),
      "train_loss": jnp.sum(jnp.where(applied, buf.loss, 0.0)) /
                    jnp.maximum(n_applied, 1),
  }
  return new_state, metrics


def run_steps(step: Callable, env: Environment, state: SimState,
              n: jnp.ndarray, budget: jnp.ndarray
              ) -> tuple[SimState, jnp.ndarray, jnp.ndarray]:
  """Up to ``n`` server steps in one call, stopping before the first step
  whose last arrival would pass ``budget`` (virtual seconds), or after one
  that leaves no task in flight (batteries ran out).

  One jitted call replaces ``n`` host round trips; the steps are the same
  pure function, so the result equals ``n`` single steps bit for bit.

  Returns:
    ``(state, steps taken, whether the budget stopped it)``.
  """
  def cond(c):
    state, taken, over = c
    return (taken < n) & ~over & state.in_flight

  def body(c):
    state, taken, _ = c
    new, _ = step(env, state)
    over = new.clock > budget
    state = jax.tree.map(lambda a, b: jnp.where(over, a, b), state, new)
    return state, taken + (~over).astype(jnp.int32), over

  return jax.lax.while_loop(cond, body, (state, jnp.zeros((), jnp.int32),
                                         jnp.zeros((), bool)))


def evaluate(metrics_fn: Callable, eval_batch_size: int, params: PyTree,
             test: dict) -> dict:
  """``test_<name>`` of every metric on a held-out set, in fixed-size
  batches; padding rows carry weight 0 (``losses``' contract)."""
  n = jax.tree.leaves(test)[0].shape[0]
  b = min(eval_batch_size, n)
  nb = -(-n // b)
  pad = nb * b - n
  batches = jax.tree.map(
      lambda a: jnp.pad(a, ((0, pad),) + ((0, 0),) * (a.ndim - 1)).reshape(
          (nb, b) + a.shape[1:]), dict(test))
  batches["weight"] = (jnp.arange(nb * b) < n).astype(jnp.float32).reshape(
      nb, b)
  out = jax.lax.map(lambda batch: metrics_fn(params, batch), batches)
  return {f"test_{k}": jnp.sum(s) / jnp.sum(c) for k, (s, c) in out.items()}


def make_simulator(config: EngineConfig, apply_fn: ApplyFn | None = None,
                   max_local_steps: int | None = None,
                   client_tx: optax.GradientTransformation | None = None,
                   kinds: PyTree | None = None,
                   extensions: Extensions | None = None,
                   task: losses.Task | None = None) -> Simulator:
  """Binds ``config`` and any extensions to the engine's pure functions.

  Args:
    config: a validated EngineConfig (see ``algorithms.preset``).
    apply_fn: ``apply_fn(params, x) -> logits``, from which the default
      loss and metrics are built (classification); None when
      ``extensions`` gives them.
    max_local_steps: length of the local-step loop; must be >= every
      client's step count (``make_environment`` computes them). Defaults to
      ``config.local_steps``.
    client_tx: the client optimizer (the object the memory model charged);
      built from ``client_lr``/``client_momentum`` when None.
    kinds: ``client.leaf_kinds`` of the plan when no re-search will replace
      it: the client update then differentiates only what a mask trains.
    extensions: the user's pieces (``extensions.Extensions``); every piece
      not given is built from ``config``.
    task: the dataset's loss and metrics (``losses.Task``); None: the
      classification task of ``apply_fn``.

  Returns:
    ``Simulator(init, step, evaluate, steps, mesh, components)`` with
    ``init(key, env, params, plan, start=None)`` (``start``: a ``Start``,
    e.g. after a probe round) and ``evaluate(params, test)`` (``test``: a
    dict with "x", "y" and any extras).
  """
  validate(config)
  if config.client_chunk == 0:
    # 0 asks the memory plan for a chunk; it needs the model and the data.
    raise ValueError(
        "client_chunk=0 (auto) is resolved by experiment.build; with the "
        "engine alone, pick a chunk with memory_plan.plan_engine or give "
        "client_chunk >= 1")
  if client_tx is None:
    client_tx = make_client_optimizer(config.client_lr, config.client_momentum)
  comp = extensions_lib.bind(
      config, apply_fn, max_local_steps or config.local_steps, client_tx,
      kinds, client_mesh(config.mesh_devices, config.buffer_size),
      extensions, task)

  def init(key, env, params, plan, start=None):
    extensions_lib.check(comp, params, plan.masks, env.data)
    return init_state(comp, key, env, params, plan, start)

  def step(env, state):
    return step_state(comp, env, state)

  def evaluate_fn(params, test):
    return evaluate(comp.metrics_fn, config.eval_batch_size, params, test)

  def steps(env, state, n, budget=jnp.inf):
    return run_steps(step, env, state, n, budget)

  return Simulator(init=init, step=step, evaluate=evaluate_fn, steps=steps,
                   mesh=comp.mesh, components=comp)
