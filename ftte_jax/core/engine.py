"""The event-driven, semi-asynchronous federated engine.

One server step is six named, pure phases (``docs/design.md`` describes
them with the state they move):

  1. ``take_arrivals`` (``refill='step'``) or ``collect_arrivals``
     (``refill='arrival'``): the K updates of this step, in arrival order,
     and the virtual clock of the last; with arrival refill every arrival
     before the K-th restarts its slot at once (FedBuff's algorithm);
  2. ``train_buffer``: train those K clients, each from the global version
     it pulled (kept in a ring of the last S versions), with its own mask,
     data and step count; non-finite updates are zeroed and flagged;
  3. ``weigh_updates``: weight each update by data size, age and (FTTE)
     deviation from the buffer's consensus; dropped, over-stale and
     non-finite updates get weight 0; then aggregate coordinate-wise
     (``aggregation``). Without a variance weight the weights are known
     before training, and ``train_and_sum`` streams phases 2-3: it keeps
     only the running weighted sum, never the K deltas;
  4. ``server_update``: apply the aggregate with a server optimizer; push
     the new version into the ring;
  5. ``dispatch``: start new tasks on idle, eligible clients and sample
     when they arrive (download + compute + upload time, jitter, dropout,
     deadline): the K freed slots (step refill) or the K-th arrival's slot
     (arrival refill), from the new version;
  6. ``count``: cumulative accounting.

``make_simulator`` only binds a config to these phases. Randomness: the
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
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from ftte_jax.core import adversary
from ftte_jax.core import aggregation
from ftte_jax.core import draws
from ftte_jax.core import exact
from ftte_jax.core import one_shot
from ftte_jax.core import privacy
from ftte_jax.core import robust
from ftte_jax.core import staleness
from ftte_jax.core.algorithms import EngineConfig, defended, validate
from ftte_jax.core.client import make_client_optimizer, make_client_update
from ftte_jax.core.fleet import Fleet
from ftte_jax.core.masks import MaskPlan
from ftte_jax.core.state import (Counters, Environment, Ring, SimState, Start,
                                 Tasks)
from ftte_jax.core.typing import ApplyFn, PyTree
from ftte_jax.data.client_data import ClientData

__all__ = ["Arrivals", "Counters", "Dispatch", "Environment", "Ring",
           "SimState", "Simulator", "Start", "Tasks", "Weights", "client_mesh",
           "count", "dispatch", "make_environment", "make_simulator",
           "nominal_duration", "pick_idle", "pick_words", "replan",
           "server_update", "take_arrivals", "train_buffer", "weigh_updates"]

# The mesh axis a step's K clients are split across.
CLIENT_AXIS = "clients"

# Named streams of the root key.
_KEY_INIT, _KEY_ROUND = 0, 1
_KEY_TRAIN, _KEY_DISPATCH, _KEY_EVENTS, _KEY_DP = 0, 1, 2, 3


class Simulator(NamedTuple):
  """Pure functions of one configured engine (jit them at the call site)."""

  init: Callable[..., SimState]
  step: Callable[[Environment, SimState], tuple[SimState, dict]]
  evaluate: Callable[[PyTree, jnp.ndarray, jnp.ndarray], dict]
  # steps(env, state, n, budget) -> (state, taken, over_budget).
  steps: Callable[..., tuple[SimState, jnp.ndarray, jnp.ndarray]]
  mesh: Mesh | None = None  # the clients mesh; None: one device.


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
class Weights:
  """Per-update weights of one step."""

  valid: jnp.ndarray  # [K] bool: arrived, fresh and finite.
  base: jnp.ndarray  # [K] float32: n_i^gamma * valid (no age factors).
  weights: jnp.ndarray  # [K] float32: base * s_age(tau) [* s_var].


@struct.dataclass
class Defence:
  """What a step's defences did (for the counters)."""

  clipped: jnp.ndarray  # [] int32: valid updates scaled down by clipping.
  trimmed: jnp.ndarray  # [] float32: values a robust mean left out.
  values: jnp.ndarray  # [] float32: values a robust mean ranked.

  @classmethod
  def none(cls) -> Defence:
    return cls(clipped=jnp.zeros((), jnp.int32),
               trimmed=jnp.zeros((), jnp.float32),
               values=jnp.zeros((), jnp.float32))


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


def make_server_optimizer(config: EngineConfig) -> optax.GradientTransformation:
  """The optimizer that applies the aggregate (as a pseudo-gradient -Delta)."""
  if config.server_optimizer == "sgd":
    return optax.sgd(config.server_lr)
  if config.server_optimizer == "momentum":
    return optax.sgd(config.server_lr, momentum=config.server_momentum)
  return optax.adam(config.server_lr)


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


def _client_delta(client_update: Callable, env: Environment, plan: MaskPlan,
                  ring: Ring, mix_into: PyTree | None):
  """``one(key, ring_slot, tier, offset, count, steps[, bad]) -> (delta,
  loss)``; ``bad`` (malicious) is an argument when the fleet has attackers.

  Base parameters and masks are gathered inside the per-client function,
  so the ``map`` and ``stream`` paths never materialize [K, ...] copies.
  """
  single_tier = plan.num_tiers == 1  # static
  attack = env.fleet.attack  # static

  def one(key, slot, t, offset, count, n_steps, bad=None):
    base = jax.tree.map(lambda r: r[slot], ring.params)
    mask = jax.tree.map(lambda m: m[0] if single_tier else m[t], plan.masks)
    local, loss = client_update(key, base, mask, env.data.x, env.data.y,
                                offset, count, n_steps)
    if mix_into is not None:
      delta = jax.tree.map(lambda w, g, m: m * (w - g), local, mix_into, mask)
    else:
      # Masked gradients leave unmasked coordinates exactly where they
      # were, so the delta is already zero outside the client's mask.
      delta = jax.tree.map(jnp.subtract, local, base)
    if attack is not None:
      delta = adversary.corrupt(attack, delta, mask, key, bad)
    return delta, loss

  return one


def _client_args(env: Environment, plan: MaskPlan, ring: Ring,
                 keys: jax.Array, arrivals: Arrivals):
  clients = arrivals.clients
  args = (keys, arrivals.ring_slot, plan.client_tier[clients],
          env.data.offsets[clients], env.data.counts[clients],
          env.num_steps[clients])
  if env.fleet.attack is None:
    return args
  bad = env.fleet.malicious[clients]
  if env.fleet.attack.behavior == "stale_replay":
    slot = jnp.where(bad, adversary.oldest_slot(ring.version), args[1])
    args = (keys, slot) + args[2:]
  return args + (bad,)


def _finite_rows(delta: PyTree) -> jnp.ndarray:
  """[K] bool: client i's update (row i of every leaf) is finite.

  A row sum is non-finite iff the row has NaN/Inf (or overflows, which is
  rejected too); one contiguous pass instead of isfinite + all.
  """
  k = jax.tree.leaves(delta)[0].shape[0]
  return jnp.isfinite(sum(jnp.sum(d.reshape(k, -1), axis=1)
                          for d in jax.tree.leaves(delta)))


def train_buffer(client_update: Callable, batching: str, env: Environment,
                 plan: MaskPlan, ring: Ring, keys: jax.Array,
                 arrivals: Arrivals, mix_into: PyTree | None = None,
                 mesh: Mesh | None = None, chunk: int = 1):
  """Phase 2: trains the K arrived clients from the versions they pulled.

  Args:
    client_update: from ``client.make_client_update``.
    batching: ``map`` or ``vmap`` over the K clients (over each device's
      share of them with a mesh).
    env: the environment (data, step counts).
    plan: the live mask plan.
    ring: the stored global versions.
    keys: [K] training keys, one per buffered update.
    arrivals: the buffered updates.
    mix_into: None for ``update_rule='delta'`` (``w_client - w_pulled``);
      the current global params for ``mixing`` (``m * (w_client - w_now)``).
    mesh: a 1-D ``clients`` mesh (``client_mesh``): the K clients are split
      across its devices, the deltas come back sharded along K. None: one
      device.
    chunk: with ``map``, clients trained together (vmapped) per iteration.

  Returns:
    ``(delta, loss, finite)``: deltas (leaves [K, ...], zero outside each
    client's mask and zeroed where non-finite), mean local losses [K], and
    [K] bool whether the update was finite.
  """

  def local(env, plan, ring, mix_into, args):
    one = _client_delta(client_update, env, plan, ring, mix_into)
    if batching == "vmap":
      return jax.vmap(one)(*args)
    return jax.lax.map(lambda a: one(*a), args,
                       batch_size=chunk if chunk > 1 else None)

  args = _client_args(env, plan, ring, keys, arrivals)
  k = arrivals.clients.shape[0]
  delta, loss = _over_clients(mesh, local, (env, plan, ring, mix_into), args,
                              (P(CLIENT_AXIS), P(CLIENT_AXIS)))
  finite = _finite_rows(delta)
  delta = jax.lax.cond(
      jnp.all(finite), lambda d: d,
      lambda d: jax.tree.map(lambda x: jnp.where(
          finite.reshape((k,) + (1,) * (x.ndim - 1)), x, 0.0), d), delta)
  return delta, loss, finite


def train_and_sum(client_update: Callable, env: Environment, plan: MaskPlan,
                  ring: Ring, keys: jax.Array, arrivals: Arrivals,
                  weights: jnp.ndarray, mix_into: PyTree | None = None,
                  mesh: Mesh | None = None, chunk: int = 1):
  """Phase 2 streamed: trains the K clients one after another and keeps
  only the running sum ``sum_i a_i d_i`` over finite updates.

  Materializing K deltas costs as much memory traffic as the training on a
  CPU (measured: 288 against 482 updates/s for 100 MLP clients), so when the
  weights are known before training (no variance weight) the buffer is
  never built. Same arguments as ``train_buffer`` plus ``weights`` [K];
  with a mesh, each device streams its share and the partial sums are
  added across devices (``psum``). ``chunk`` > 1 streams groups of that
  many clients, vmapped together (the last group may be smaller).

  Returns:
    ``(total, loss, finite)``.
  """

  def local(env, plan, ring, mix_into, xs):
    one = _client_delta(client_update, env, plan, ring, mix_into)

    def body(total, xs):
      w, a = xs
      delta, loss = one(*a)
      finite = jnp.isfinite(sum(jnp.sum(d) for d in jax.tree.leaves(delta)))
      total = jax.tree.map(lambda t, d: t + jnp.where(finite, w * d, 0.0),
                           total, delta)
      return total, (loss, finite)

    def chunk_body(total, xs):
      # ``chunk`` clients vmapped together: one wider matmul per layer
      # instead of several narrow ones.
      w, a = xs
      delta, loss = jax.vmap(one)(*a)
      finite = _finite_rows(delta)
      wf = jnp.where(finite, w, 0.0)
      total = jax.tree.map(
          lambda t, d: t + jnp.tensordot(
              wf, jnp.where(finite.reshape((-1,) + (1,) * (d.ndim - 1)), d,
                            0.0), axes=1), total, delta)
      return total, (loss, finite)

    zero = jax.tree.map(lambda r: jnp.zeros(r.shape[1:], r.dtype),
                        ring.params)
    if chunk == 1:
      total, rest = jax.lax.scan(body, zero, xs)
    else:
      total, rest = _chunked_scan(chunk_body, zero, xs, chunk)
    if mesh is not None:
      total = jax.lax.psum(total, CLIENT_AXIS)
    return total, rest

  args = _client_args(env, plan, ring, keys, arrivals)
  total, (loss, finite) = _over_clients(
      mesh, local, (env, plan, ring, mix_into), (weights, args),
      (P(), (P(CLIENT_AXIS), P(CLIENT_AXIS))))
  return total, loss, finite


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
    devices: how many devices; 0 (auto) takes the largest number of local
      devices that divides K.
    buffer_size: K.

  Returns:
    None for one device (no sharding), else a Mesh over the first devices.

  Raises:
    ValueError: more devices than there are, or a count that does not
      divide K (the error names mesh_devices).
  """
  available = jax.devices()
  if devices == 0:
    devices = max(d for d in range(1, len(available) + 1)
                  if buffer_size % d == 0)
  if devices > len(available) or buffer_size % devices:
    raise ValueError(
        f"mesh_devices={devices}: must divide buffer_size (K={buffer_size}) "
        f"and be at most the {len(available)} devices JAX sees; 0 chooses "
        "the largest such count")
  if devices == 1:
    return None
  return Mesh(np.asarray(available[:devices]), (CLIENT_AXIS,))


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


def prior_weights(config: EngineConfig, s_age: Callable, counts: jnp.ndarray,
                  arrivals: Arrivals, finite: jnp.ndarray | bool = True
                  ) -> Weights:
  """``a_i = n_i^gamma * s_age(tau_i) * valid_i``, known before training
  except for finiteness (pass ``finite`` once known)."""
  valid = arrivals.ok & arrivals.fresh & finite
  base = counts.astype(jnp.float32) ** config.data_weight_exponent * valid
  return Weights(valid=valid, base=base, weights=base * s_age(arrivals.tau))


def weigh_updates(config: EngineConfig, s_age: Callable, delta: PyTree,
                  plan: MaskPlan, tier: jnp.ndarray, counts: jnp.ndarray,
                  arrivals: Arrivals, finite: jnp.ndarray) -> Weights:
  """Phase 3: ``a_i = n_i^gamma * s_age(tau_i) [* s_var_i] * valid_i``."""
  w = prior_weights(config, s_age, counts, arrivals, finite)
  if config.variance_beta > 0:
    # d_i is a ratio, so scaling every update by one power of two changes no
    # bit of it, and huge (finite) updates no longer overflow its squares.
    _, e = jnp.frexp(jnp.max(jnp.stack(
        [jnp.max(jnp.abs(d)) for d in jax.tree.leaves(delta)])))
    scaled = jax.tree.map(lambda d: d * jnp.ldexp(1.0, -e), delta)
    consensus = aggregation.weighted_mean(scaled, plan.masks, tier, w.weights)
    dev = aggregation.deviation(scaled, plan.masks, tier, consensus)
    w = w.replace(weights=w.weights * staleness.buffer_variance_weight(
        dev, w.valid, config.variance_beta))
  return w


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


def count(counters: Counters, arrivals: Arrivals, w: Weights,
          upload_bytes: jnp.ndarray, bytes_down: jnp.ndarray,
          downloads: jnp.ndarray, extra_dropped: jnp.ndarray | int = 0
          ) -> tuple[Counters, jnp.ndarray, jnp.ndarray]:
  """Phase 6: adds one step to the cumulative counters.

  Args:
    counters: before the step.
    arrivals: the buffered updates.
    w: their weights.
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


def init_state(config: EngineConfig, server_opt: optax.GradientTransformation,
               key: jax.Array, env: Environment, params: PyTree,
               plan: MaskPlan, start: Start | None = None) -> SimState:
  """Version 0 in the ring and C tasks dispatched at ``start.clock``."""
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
  return SimState(
      params=params, opt_state=server_opt.init(params),
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
      client_depleted_at=jnp.full((n,), jnp.inf, jnp.float32))


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


def _train_and_aggregate(config: EngineConfig, client_update: Callable,
                         batching: str, s_age: Callable, env: Environment,
                         state: SimState, arrivals: Arrivals, keys: jax.Array,
                         dp_key: jax.Array, mesh: Mesh | None = None):
  """Phases 2-3 and the aggregate: ``(agg, weights, train_loss, defence)``;
  the defences (clipping, robust mean, DP noise) need the buffered path."""
  plan = state.plan
  tier = plan.client_tier[arrivals.clients]
  counts = env.data.counts[arrivals.clients]
  mix_into = state.params if config.update_rule == "mixing" else None
  if batching == "stream":
    prior = prior_weights(config, s_age, counts, arrivals)
    total, loss, finite = train_and_sum(client_update, env, plan, state.ring,
                                        keys, arrivals, prior.weights,
                                        mix_into, mesh, config.client_chunk)
    w = prior_weights(config, s_age, counts, arrivals, finite)
    agg = aggregation.normalize(total, plan.masks, tier, w.weights,
                                config.normalization, base_weights=w.base)
    return agg, w, loss, Defence.none()
  delta, loss, finite = train_buffer(client_update, batching, env, plan,
                                     state.ring, keys, arrivals, mix_into,
                                     mesh, config.client_chunk)
  defence = Defence.none()
  if config.clip != "none":
    delta, clipped = robust.clip_updates(
        delta, arrivals.ok & arrivals.fresh & finite, config.clip,
        config.clip_norm)
    defence = defence.replace(clipped=jnp.sum(clipped).astype(jnp.int32))
  w = weigh_updates(config, s_age, delta, plan, tier, counts, arrivals,
                    finite)
  keep = noise = None
  if config.robust_aggregation != "mean":
    keep, trimmed, values = robust.keep_mask(
        delta, plan.masks, tier, w.valid, config.robust_aggregation,
        config.trim_fraction)
    defence = defence.replace(trimmed=trimmed, values=values)
  if config.dp_noise_multiplier > 0:
    noise = privacy.gaussian_noise(
        dp_key, privacy.coverage(plan.masks, tier, w.valid),
        privacy.noise_std(config.dp_noise_multiplier, config.clip_norm))
  agg = aggregation.aggregate(delta, plan.masks, tier, w.weights,
                              config.normalization, base_weights=w.base,
                              keep=keep, noise=noise)
  return agg, w, loss, defence


def _per_client(state: SimState, arrivals: Arrivals, applied: jnp.ndarray
                ) -> dict:
  """Per-device tallies: updates applied, and the sum of their ages."""
  c = arrivals.clients
  return dict(
      client_applied=state.client_applied.at[c].add(applied.astype(
          jnp.int32)),
      client_staleness=state.client_staleness.at[c].add(
          jnp.where(applied, arrivals.tau, 0).astype(jnp.int32)))


def step_state(config: EngineConfig, client_update: Callable, batching: str,
               s_age: Callable, server_opt: optax.GradientTransformation,
               env: Environment, state: SimState, mesh: Mesh | None = None
               ) -> tuple[SimState, dict]:
  """One server step: the six phases in order, and a flat dict of scalars."""
  rkey = jax.random.fold_in(jax.random.fold_in(state.key, _KEY_ROUND),
                            state.version)
  arrivals, refilled, keys = _arrivals_and_keys(config, env, state, rkey)
  agg, w, train_loss, defence = _train_and_aggregate(
      config, client_update, batching, s_age, env, state, arrivals, keys,
      jax.random.fold_in(rkey, _KEY_DP), mesh)
  params, opt_state, ring, refused = server_update(server_opt, state, agg,
                                                   jnp.any(w.valid))
  version = state.version + 1
  spent, depleted_at, energy = _charge_arrivals(env, state, arrivals,
                                                refilled)
  tasks, busy, synced, down, n_started, dropped = _start_next(
      config, env, state, arrivals, refilled,
      jax.random.fold_in(rkey, _KEY_DISPATCH), version,
      jnp.isinf(depleted_at))
  tier = state.plan.client_tier[arrivals.clients]
  counters, n_applied, tau_sum = count(
      state.counters, arrivals, w, state.plan.upload_bytes[tier], down,
      n_started, dropped)
  counters = counters.replace(
      steps_refused=counters.steps_refused + refused.astype(jnp.int32),
      updates_clipped=counters.updates_clipped + defence.clipped,
      values_trimmed=exact.add(counters.values_trimmed, defence.trimmed),
      values_robust=exact.add(counters.values_robust, defence.values),
      energy_j=exact.add(counters.energy_j, energy))
  new_state = state.replace(
      params=params, opt_state=opt_state, ring=ring, version=version,
      clock=arrivals.clock, tasks=tasks, client_busy=busy,
      client_synced=synced, counters=counters,
      client_energy=spent, client_depleted_at=depleted_at,
      **_per_client(state, arrivals, w.valid & (w.weights > 0) & ~refused))
  applied = w.valid & (w.weights > 0)
  metrics = {
      "virtual_time_s": arrivals.clock,
      "updates_applied": n_applied,
      "mean_staleness": tau_sum / jnp.maximum(n_applied, 1),
      "train_loss": jnp.sum(jnp.where(applied, train_loss, 0.0)) /
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


def evaluate(apply_fn: ApplyFn, eval_batch_size: int, params: PyTree,
             x: jnp.ndarray, y: jnp.ndarray) -> dict:
  """Accuracy and mean loss on a held-out set, in fixed-size batches."""
  n = x.shape[0]
  b = min(eval_batch_size, n)
  nb = -(-n // b)
  pad = nb * b - n
  xp = jnp.pad(x, ((0, pad),) + ((0, 0),) * (x.ndim - 1))
  yp = jnp.pad(y, (0, pad))
  real = jnp.arange(nb * b) < n

  def batch(args):
    xb, yb, rb = args
    logits = apply_fn(params, xb)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, yb)
    hit = jnp.argmax(logits, -1) == yb
    return jnp.sum(jnp.where(rb, loss, 0.0)), jnp.sum(hit & rb)

  losses, hits = jax.lax.map(batch, (
      xp.reshape((nb, b) + x.shape[1:]), yp.reshape(nb, b),
      real.reshape(nb, b)))
  return {"test_loss": jnp.sum(losses) / n, "test_accuracy": jnp.sum(hits) / n}


def resolve_batching(config: EngineConfig) -> str:
  """How the K clients of a step are trained.

  ``auto``: on CPU ``stream`` when the weights are known before training
  (no variance weight), else ``map``; ``vmap`` on accelerators. Measured
  with ``experiments/benchmarks/throughput.py``.
  """
  batching = config.client_batching
  if batching == "auto":
    if jax.default_backend() != "cpu":
      return "vmap"
    return ("map" if config.variance_beta > 0 or defended(config) else
            "stream")
  return batching


def make_simulator(config: EngineConfig, apply_fn: ApplyFn,
                   max_local_steps: int | None = None,
                   client_tx: optax.GradientTransformation | None = None,
                   kinds: PyTree | None = None) -> Simulator:
  """Binds ``config`` to the engine's pure ``init``/``step``/``evaluate``.

  Args:
    config: a validated EngineConfig (see ``algorithms.preset``).
    apply_fn: ``apply_fn(params, x) -> logits``.
    max_local_steps: length of the local-step loop; must be >= every
      client's step count (``make_environment`` computes them). Defaults to
      ``config.local_steps``.
    client_tx: the client optimizer (the object the memory model charged);
      built from ``client_lr``/``client_momentum`` when None.
    kinds: ``client.leaf_kinds`` of the plan when no re-search will replace
      it: the client update then differentiates only what a mask trains.

  Returns:
    ``Simulator(init, step, evaluate, steps, mesh)`` with
    ``init(key, env, params, plan, start=None)`` (``start``: a
    ``Start``, e.g. after a probe round).
  """
  validate(config)
  s_age = staleness.make_staleness_fn(config.staleness, config.staleness_a,
                                      config.staleness_b)
  server_opt = make_server_optimizer(config)
  if client_tx is None:
    client_tx = make_client_optimizer(config.client_lr, config.client_momentum)
  client_update = make_client_update(
      apply_fn, config.batch_size, client_tx,
      max_local_steps or config.local_steps,
      unroll=True if config.unroll_local_steps else 1, kinds=kinds)
  batching = resolve_batching(config)
  mesh = client_mesh(config.mesh_devices, config.buffer_size)

  def init(key, env, params, plan, start=None):
    return init_state(config, server_opt, key, env, params, plan, start)

  def step(env, state):
    return step_state(config, client_update, batching, s_age, server_opt,
                      env, state, mesh)

  def evaluate_fn(params, x, y):
    return evaluate(apply_fn, config.eval_batch_size, params, x, y)

  def steps(env, state, n, budget=jnp.inf):
    return run_steps(step, env, state, n, budget)

  return Simulator(init=init, step=step, evaluate=evaluate_fn, steps=steps,
                   mesh=mesh)
