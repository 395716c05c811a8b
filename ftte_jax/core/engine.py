"""The event-driven, semi-asynchronous federated engine.

One server step is six named, pure phases (``docs/design.md`` describes
them with the state they move):

  1. ``take_arrivals``: of the C tasks in flight take the K that arrive
     first and advance the virtual clock to the last of them;
  2. ``train_buffer``: train those K clients, each from the global version
     it pulled (kept in a ring of the last S versions), with its own mask,
     data and step count; non-finite updates are zeroed and flagged;
  3. ``weigh_updates``: weight each update by data size, age and (FTTE)
     deviation from the buffer's consensus; dropped, over-stale and
     non-finite updates get weight 0;
  4. ``server_update``: aggregate coordinate-wise and apply a server
     optimizer; push the new version into the ring;
  5. ``dispatch``: start K new tasks on idle, eligible clients and sample
     when they arrive (download + compute + upload time, jitter, dropout,
     deadline);
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

from ftte_jax.core import aggregation
from ftte_jax.core import staleness
from ftte_jax.core.algorithms import EngineConfig, validate
from ftte_jax.core.client import make_client_optimizer, make_client_update
from ftte_jax.core.fleet import Fleet
from ftte_jax.core.masks import MaskPlan
from ftte_jax.core.state import (Counters, Environment, Ring, SimState, Start,
                                 Tasks)
from ftte_jax.core.typing import ApplyFn, PyTree
from ftte_jax.data.client_data import ClientData

__all__ = ["Arrivals", "Counters", "Dispatch", "Environment", "Ring",
           "SimState", "Simulator", "Start", "Tasks", "Weights", "count",
           "dispatch", "make_environment", "make_simulator",
           "nominal_duration", "replan", "server_update", "take_arrivals",
           "train_buffer", "weigh_updates"]

# Named streams of the root key.
_KEY_INIT, _KEY_ROUND = 0, 1
_KEY_TRAIN, _KEY_DISPATCH = 0, 1


class Simulator(NamedTuple):
  """Pure functions of one configured engine (jit them at the call site)."""

  init: Callable[..., SimState]
  step: Callable[[Environment, SimState], tuple[SimState, dict]]
  evaluate: Callable[[PyTree, jnp.ndarray, jnp.ndarray], dict]


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


@struct.dataclass
class Weights:
  """Per-update weights of one step."""

  valid: jnp.ndarray  # [K] bool: arrived, fresh and finite.
  base: jnp.ndarray  # [K] float32: n_i^gamma * valid (no age factors).
  weights: jnp.ndarray  # [K] float32: base * s_age(tau) [* s_var].


@struct.dataclass
class Dispatch:
  """Bookkeeping of newly started tasks."""

  clients: jnp.ndarray  # [n] int32: the clients started.
  arrival: jnp.ndarray  # [n] float32: when each arrives (or times out).
  ok: jnp.ndarray  # [n] bool: will arrive (not abandoned, within deadline).
  bytes_down: jnp.ndarray  # [] float32: bytes the n tasks download.
  busy: jnp.ndarray  # [N] bool: updated client_busy.
  synced: jnp.ndarray  # [N] bool: updated client_synced.


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
    # Worst case: a first task downloads the whole model.
    nominal, _ = nominal_duration(config.batch_size, fleet, plan,
                                  jnp.arange(n), jnp.asarray(steps),
                                  jnp.zeros(n, bool))
    deadline = config.deadline_factor * float(
        np.asarray(nominal)[eligible].max())
  return Environment(data=data, fleet=fleet, eligible=jnp.asarray(eligible),
                     num_steps=jnp.asarray(steps),
                     deadline=jnp.asarray(deadline, jnp.float32))


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


def dispatch(env: Environment, plan: MaskPlan, key: jax.Array,
             busy: jnp.ndarray, synced: jnp.ndarray, clock: jnp.ndarray,
             n: int, batch_size: int) -> Dispatch:
  """Phase 5: starts ``n`` tasks on idle eligible clients, uniformly."""
  k_pick, k_time, k_drop = jax.random.split(key, 3)
  avail = env.eligible & ~busy
  scores = jnp.where(avail, jax.random.uniform(k_pick, busy.shape), -1.0)
  _, clients = jax.lax.top_k(scores, n)
  f = env.fleet
  nominal, down = nominal_duration(batch_size, f, plan, clients,
                                   env.num_steps[clients], synced[clients])
  duration = nominal * jnp.exp(f.task_sigma * jax.random.normal(k_time, (n,)))
  abandoned = jax.random.uniform(k_drop, (n,)) < f.dropout[clients]
  ok = ~abandoned & (duration <= env.deadline)
  return Dispatch(clients=clients, arrival=clock + jnp.where(
      ok, duration, env.deadline), ok=ok, bytes_down=jnp.sum(down),
                  busy=busy.at[clients].set(True),
                  synced=synced.at[clients].set(True))


def take_arrivals(state: SimState, k: int) -> Arrivals:
  """Phase 1: the K earliest arrivals (ties go to the lower slot)."""
  neg_arrival, slots = jax.lax.top_k(-state.tasks.arrival, k)
  versions = state.tasks.version[slots]
  ring_slot = versions % state.ring.size
  return Arrivals(
      slots=slots, clients=state.tasks.client[slots],
      tau=state.version - versions, ok=state.tasks.ok[slots],
      fresh=state.ring.version[ring_slot] == versions, ring_slot=ring_slot,
      clock=jnp.maximum(state.clock, -jnp.min(neg_arrival)))


def train_buffer(client_update: Callable, batching: str, env: Environment,
                 plan: MaskPlan, ring: Ring, key: jax.Array,
                 arrivals: Arrivals):
  """Phase 2: trains the K arrived clients from the versions they pulled.

  Base parameters and masks are gathered inside the per-client function,
  so the ``map`` path never materializes [K, ...] copies of them.

  Returns:
    ``(delta, loss, finite)``: deltas (leaves [K, ...], zero outside each
    client's mask and zeroed where non-finite), mean local losses [K], and
    [K] bool whether the update was finite.
  """
  single_tier = plan.num_tiers == 1  # static
  clients = arrivals.clients
  k = clients.shape[0]

  def one(key, slot, t, row, count, n_steps):
    base = jax.tree.map(lambda r: r[slot], ring.params)
    mask = jax.tree.map(lambda m: m[0] if single_tier else m[t], plan.masks)
    local, loss = client_update(key, base, mask, env.data.x, env.data.y,
                                row, count, n_steps)
    # Masked gradients leave unmasked coordinates exactly where they were,
    # so the delta is already zero outside the client's mask.
    return jax.tree.map(jnp.subtract, local, base), loss

  keys = jax.vmap(jax.random.fold_in, (None, 0))(key, clients)
  args = (keys, arrivals.ring_slot, plan.client_tier[clients],
          env.data.indices[clients], env.data.counts[clients],
          env.num_steps[clients])
  if batching == "vmap":
    delta, loss = jax.vmap(one)(*args)
  else:
    delta, loss = jax.lax.map(lambda a: one(*a), args)
  # A row sum is non-finite iff the row has NaN/Inf (or overflows, which
  # is rejected too); one contiguous pass instead of isfinite + all.
  finite = jnp.isfinite(sum(jnp.sum(d.reshape(k, -1), axis=1)
                            for d in jax.tree.leaves(delta)))
  delta = jax.lax.cond(
      jnp.all(finite), lambda d: d,
      lambda d: jax.tree.map(lambda x: jnp.where(
          finite.reshape((k,) + (1,) * (x.ndim - 1)), x, 0.0), d), delta)
  return delta, loss, finite


def weigh_updates(config: EngineConfig, s_age: Callable, delta: PyTree,
                  plan: MaskPlan, tier: jnp.ndarray, counts: jnp.ndarray,
                  arrivals: Arrivals, finite: jnp.ndarray) -> Weights:
  """Phase 3: ``a_i = n_i^gamma * s_age(tau_i) [* s_var_i] * valid_i``."""
  valid = arrivals.ok & arrivals.fresh & finite
  base = counts.astype(jnp.float32) ** config.data_weight_exponent * valid
  weights = base * s_age(arrivals.tau)
  if config.variance_beta > 0:
    consensus = aggregation.weighted_mean(delta, plan.masks, tier, weights)
    dev = aggregation.deviation(delta, plan.masks, tier, consensus)
    weights = weights * staleness.buffer_variance_weight(
        dev, valid, config.variance_beta)
  return Weights(valid=valid, base=base, weights=weights)


def server_update(server_opt: optax.GradientTransformation,
                  normalization: str, state: SimState, delta: PyTree,
                  tier: jnp.ndarray, w: Weights
                  ) -> tuple[PyTree, PyTree, Ring]:
  """Phase 4: aggregate, apply, push; nothing valid leaves the model as is.

  Returns:
    ``(params, opt_state, ring)`` after the step.
  """
  agg = aggregation.aggregate(delta, state.plan.masks, tier, w.weights,
                              normalization, base_weights=w.base)
  any_valid = jnp.any(w.valid)
  updates, opt_state = server_opt.update(
      jax.tree.map(jnp.negative, agg), state.opt_state, state.params)
  params = optax.tree_utils.tree_where(
      any_valid, optax.apply_updates(state.params, updates), state.params)
  opt_state = optax.tree_utils.tree_where(any_valid, opt_state,
                                          state.opt_state)
  return params, opt_state, state.ring.push(state.version + 1, params)


def count(counters: Counters, arrivals: Arrivals, w: Weights,
          upload_bytes: jnp.ndarray, started: Dispatch, n_started: int
          ) -> tuple[Counters, jnp.ndarray, jnp.ndarray]:
  """Phase 6: adds one step to the cumulative counters.

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
      updates_dropped=c.updates_dropped + jnp.sum(~ok),
      updates_stale=c.updates_stale + jnp.sum(ok & ~fresh),
      updates_nonfinite=c.updates_nonfinite + jnp.sum(ok & fresh & ~w.valid),
      staleness_sum=c.staleness_sum + tau_sum,
      staleness_hist=c.staleness_hist.at[jnp.minimum(tau, s)].add(
          ok.astype(jnp.int32)),
      bytes_up=c.bytes_up + up,
      bytes_down=c.bytes_down + started.bytes_down,
      uploads=c.uploads + jnp.sum(ok),
      downloads=c.downloads + n_started), n_applied, tau_sum


def replan(state: SimState, plan: MaskPlan, bytes_up: float = 0.0,
           bytes_down: float = 0.0) -> SimState:
  """Swaps in a new mask plan (a re-search) and counts its probe traffic."""
  c = state.counters
  return state.replace(plan=plan, counters=c.replace(
      bytes_up=c.bytes_up + bytes_up, bytes_down=c.bytes_down + bytes_down))


def init_state(config: EngineConfig, server_opt: optax.GradientTransformation,
               key: jax.Array, env: Environment, params: PyTree,
               plan: MaskPlan, start: Start = Start()) -> SimState:
  """Version 0 in the ring and C tasks dispatched at ``start.clock``."""
  n = env.data.num_clients
  clock = jnp.asarray(start.clock, jnp.float32)
  c = config.concurrency
  started = dispatch(env, plan, jax.random.fold_in(key, _KEY_INIT),
                     jnp.zeros((n,), bool), jnp.zeros((n,), bool), clock, c,
                     config.batch_size)
  return SimState(
      params=params, opt_state=server_opt.init(params),
      ring=Ring.create(params, config.ring_size),
      version=jnp.zeros((), jnp.int32), clock=clock,
      tasks=Tasks(client=started.clients.astype(jnp.int32),
                  version=jnp.zeros((c,), jnp.int32),
                  arrival=started.arrival, ok=started.ok),
      client_busy=started.busy, client_synced=started.synced,
      counters=Counters.create(
          config.ring_size, bytes_up=start.bytes_up,
          bytes_down=started.bytes_down + start.bytes_down, downloads=c),
      plan=plan, key=jnp.asarray(key))


def step_state(config: EngineConfig, client_update: Callable, batching: str,
               s_age: Callable, server_opt: optax.GradientTransformation,
               env: Environment, state: SimState) -> tuple[SimState, dict]:
  """One server step: the six phases in order, and a flat dict of scalars."""
  rkey = jax.random.fold_in(jax.random.fold_in(state.key, _KEY_ROUND),
                            state.version)
  arrivals = take_arrivals(state, config.buffer_size)
  plan = state.plan
  tier = plan.client_tier[arrivals.clients]
  delta, train_loss, finite = train_buffer(
      client_update, batching, env, plan, state.ring,
      jax.random.fold_in(rkey, _KEY_TRAIN), arrivals)
  w = weigh_updates(config, s_age, delta, plan, tier,
                    env.data.counts[arrivals.clients], arrivals, finite)
  params, opt_state, ring = server_update(
      server_opt, config.normalization, state, delta, tier, w)
  version = state.version + 1
  started = dispatch(env, plan, jax.random.fold_in(rkey, _KEY_DISPATCH),
                     state.client_busy.at[arrivals.clients].set(False),
                     state.client_synced, arrivals.clock, config.buffer_size,
                     config.batch_size)
  counters, n_applied, tau_sum = count(
      state.counters, arrivals, w, plan.upload_bytes[tier], started,
      config.buffer_size)
  slots = arrivals.slots
  tasks = Tasks(
      client=state.tasks.client.at[slots].set(started.clients),
      version=state.tasks.version.at[slots].set(
          jnp.full((config.buffer_size,), version, jnp.int32)),
      arrival=state.tasks.arrival.at[slots].set(started.arrival),
      ok=state.tasks.ok.at[slots].set(started.ok))
  new_state = state.replace(
      params=params, opt_state=opt_state, ring=ring, version=version,
      clock=arrivals.clock, tasks=tasks, client_busy=started.busy,
      client_synced=started.synced, counters=counters)
  applied = w.valid & (w.weights > 0)
  metrics = {
      "virtual_time_s": arrivals.clock,
      "updates_applied": n_applied,
      "mean_staleness": tau_sum / jnp.maximum(n_applied, 1),
      "train_loss": jnp.sum(jnp.where(applied, train_loss, 0.0)) /
                    jnp.maximum(n_applied, 1),
  }
  return new_state, metrics


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


def resolve_batching(batching: str) -> str:
  """``auto``: ``map`` on CPU, ``vmap`` on accelerators (measured, README)."""
  if batching == "auto":
    return "map" if jax.default_backend() == "cpu" else "vmap"
  return batching


def make_simulator(config: EngineConfig, apply_fn: ApplyFn,
                   max_local_steps: int | None = None) -> Simulator:
  """Binds ``config`` to the engine's pure ``init``/``step``/``evaluate``.

  Args:
    config: a validated EngineConfig (see ``algorithms.preset``).
    apply_fn: ``apply_fn(params, x) -> logits``.
    max_local_steps: length of the local-step loop; must be >= every
      client's step count (``make_environment`` computes them). Defaults to
      ``config.local_steps``.

  Returns:
    ``Simulator(init, step, evaluate)`` with
    ``init(key, env, params, plan, start=Start())``.
  """
  validate(config)
  s_age = staleness.make_staleness_fn(config.staleness, config.staleness_a,
                                      config.staleness_b)
  server_opt = make_server_optimizer(config)
  client_update = make_client_update(
      apply_fn, config.batch_size,
      make_client_optimizer(config.client_lr, config.client_momentum),
      max_local_steps or config.local_steps,
      unroll=True if config.unroll_local_steps else 1)
  batching = resolve_batching(config.client_batching)

  def init(key, env, params, plan, start=Start()):
    return init_state(config, server_opt, key, env, params, plan, start)

  def step(env, state):
    return step_state(config, client_update, batching, s_age, server_opt,
                      env, state)

  def evaluate_fn(params, x, y):
    return evaluate(apply_fn, config.eval_batch_size, params, x, y)

  return Simulator(init=init, step=step, evaluate=evaluate_fn)
