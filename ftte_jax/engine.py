"""The event-driven, semi-asynchronous federated engine (DESIGN §3).

One server step (pure; jit it once, with the state donated):
  1. of the C tasks in flight take the K that arrive first and advance the
     virtual clock to the last of them;
  2. train those K clients, each from the global version it pulled (kept in a
     ring of the last S versions), with its own mask, data and step count;
  3. weight each update by data size, age and (FTTE) deviation from the
     buffer's consensus; zero the weight of dropped, over-stale and
     non-finite updates;
  4. aggregate coordinate-wise and apply a server optimizer;
  5. dispatch K new tasks to idle, eligible clients and sample when they
     arrive (download + compute + upload time, jitter, dropout, deadline).

Randomness: the run's root key lives in the state; step r draws from
``fold_in(fold_in(root, ROUND), r)``, client c's training from a further
``fold_in(., c)``. Nothing else is random, so a resumed run replays exactly.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from ftte_jax import aggregation, staleness
from ftte_jax.algorithms import EngineConfig, validate
from ftte_jax.client import make_client_update
from ftte_jax.client_data import ClientData
from ftte_jax.fleet import Fleet
from ftte_jax.masks import MaskPlan

PyTree = Any
ApplyFn = Callable[[PyTree, jnp.ndarray], jnp.ndarray]

# Named streams of the root key.
_KEY_INIT, _KEY_ROUND = 0, 1
_KEY_TRAIN, _KEY_DISPATCH = 0, 1


@struct.dataclass
class Environment:
  """Everything static across server steps; an argument of the jitted step
  (not a closure constant, so the dataset is not baked into the program)."""

  data: ClientData
  fleet: Fleet
  plan: MaskPlan  # the initial plan; the step reads SimState.plan.
  eligible: jnp.ndarray  # [N] bool: may be sampled (memory policy).
  num_steps: jnp.ndarray  # [N] int32: local steps of each client's task.
  deadline: jnp.ndarray  # [] float32: virtual seconds before a task is dropped.


@struct.dataclass
class Counters:
  """Cumulative accounting since the start of the run."""

  updates_applied: jnp.ndarray  # [] int32: updates with non-zero weight.
  updates_dropped: jnp.ndarray  # [] int32: abandoned or past the deadline.
  updates_stale: jnp.ndarray  # [] int32: pulled a version older than S.
  updates_nonfinite: jnp.ndarray  # [] int32: NaN/Inf in the update.
  staleness_sum: jnp.ndarray  # [] float32: sum of tau over applied updates.
  staleness_hist: jnp.ndarray  # [S + 1] int32: tau of arrivals; bin S: >= S.
  bytes_up: jnp.ndarray  # [] float32: bytes uploaded by arrived tasks.
  bytes_down: jnp.ndarray  # [] float32: bytes downloaded by dispatched tasks.
  uploads: jnp.ndarray  # [] int32: tasks that arrived and uploaded.
  downloads: jnp.ndarray  # [] int32: tasks dispatched.


@struct.dataclass
class SimState:
  """The whole simulation state; saving it is enough to resume exactly."""

  params: PyTree  # global model.
  opt_state: PyTree  # server optimizer state.
  ring: PyTree  # leaves [S, ...]: the last S global versions.
  ring_version: jnp.ndarray  # [S] int32: version held by each slot (-1 none).
  version: jnp.ndarray  # [] int32: server steps taken so far.
  clock: jnp.ndarray  # [] float32: virtual time, seconds.
  task_client: jnp.ndarray  # [C] int32: client running each in-flight task.
  task_version: jnp.ndarray  # [C] int32: version the task started from.
  task_arrival: jnp.ndarray  # [C] float32: virtual arrival (or deadline) time.
  task_ok: jnp.ndarray  # [C] bool: False if abandoned or past the deadline.
  client_busy: jnp.ndarray  # [N] bool: has a task in flight.
  client_synced: jnp.ndarray  # [N] bool: holds an earlier copy of the model.
  counters: Counters
  plan: MaskPlan  # live masks and their costs (a re-search replaces it).
  key: jnp.ndarray  # [2] uint32: the run's root key.


class Simulator(NamedTuple):
  """Pure functions of one configured engine (jit them at the call site)."""

  init: Callable[[jax.Array, Environment, PyTree], SimState]
  step: Callable[[Environment, SimState], tuple[SimState, dict]]
  evaluate: Callable[[PyTree, jnp.ndarray, jnp.ndarray], dict]


def num_local_steps(config: EngineConfig, counts: np.ndarray) -> np.ndarray:
  """Local steps of each client: fixed, or ceil(epochs * n_i / batch)."""
  counts = np.asarray(counts)
  if config.local_epochs is None:
    return np.full(counts.shape, config.local_steps, np.int32)
  return np.maximum(1, np.ceil(config.local_epochs * counts /
                               config.batch_size)).astype(np.int32)


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
  counts = np.asarray(data.counts)
  steps = num_local_steps(config, counts)
  tier = np.asarray(plan.client_tier)
  need = np.asarray(plan.memory_bytes)[tier]
  memory = np.asarray(fleet.memory)
  if config.memory_policy == "exclude":
    # Unknown requirement (NaN) never excludes.
    eligible = ~(need > memory)
  else:
    eligible = np.ones(n, bool)
  if eligible.sum() < config.concurrency:
    raise ValueError(
        f"memory_policy='exclude' leaves {int(eligible.sum())} of {n} devices "
        f"able to train their mask ({np.nanmax(need) if need.size else 0:.3g} "
        f"bytes needed at most), fewer than concurrency C="
        f"{config.concurrency}; lower concurrency, use a smaller mask, or set "
        "memory_policy='ignore'")
  if config.deadline_s is not None:
    deadline = config.deadline_s
  else:
    # Worst case: a first task downloads the whole model.
    nominal, _ = nominal_duration(config.batch_size, fleet, plan,
                                  jnp.arange(n), jnp.asarray(steps),
                                  jnp.zeros(n, bool))
    nominal = np.asarray(nominal)
    deadline = config.deadline_factor * float(nominal[eligible].max())
  return Environment(data=data, fleet=fleet, plan=plan,
                     eligible=jnp.asarray(eligible),
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


def _select(pred: jnp.ndarray, new: PyTree, old: PyTree) -> PyTree:
  return jax.tree.map(lambda a, b: jnp.where(pred, a, b), new, old)


def make_server_optimizer(config: EngineConfig) -> optax.GradientTransformation:
  """The optimizer that applies the aggregate (as a pseudo-gradient -Delta)."""
  if config.server_optimizer == "sgd":
    return optax.sgd(config.server_lr)
  if config.server_optimizer == "momentum":
    return optax.sgd(config.server_lr, momentum=config.server_momentum)
  return optax.adam(config.server_lr)


def make_simulator(config: EngineConfig, apply_fn: ApplyFn,
                   max_local_steps: int | None = None) -> Simulator:
  """Builds the engine's pure ``init``/``step``/``evaluate`` for ``config``.

  Args:
    config: a validated EngineConfig (see ``algorithms.preset``).
    apply_fn: ``apply_fn(params, x) -> logits``.
    max_local_steps: length of the local-step loop; must be >= every
      client's step count (``make_environment`` computes them). Defaults to
      ``config.local_steps``.
  """
  validate(config)
  c, k, s = config.concurrency, config.buffer_size, config.ring_size
  max_steps = max_local_steps or config.local_steps
  s_age = staleness.make_staleness_fn(config.staleness, config.staleness_a,
                                      config.staleness_b)
  server_opt = make_server_optimizer(config)
  client_update = make_client_update(
      apply_fn, config.batch_size, config.client_lr, max_steps,
      config.client_momentum,
      unroll=True if config.unroll_local_steps else 1)
  batching = config.client_batching
  if batching == "auto":
    batching = "map" if jax.default_backend() == "cpu" else "vmap"

  def train_clients(env, plan, ring, keys, ring_slot, tier, rows, counts,
                    steps):
    """Trains K clients; returns their deltas (leaves [K, ...]) and losses.

    Base parameters and masks are gathered inside the per-client function,
    so the lax.map path never materializes [K, ...] copies of them.
    """
    single_tier = plan.num_tiers == 1  # static

    def one(key, slot, t, row, count, n_steps):
      base = jax.tree.map(lambda r: r[slot], ring)
      mask = jax.tree.map(lambda m: m[0] if single_tier else m[t],
                          plan.masks)
      local, loss = client_update(key, base, mask, env.data.x, env.data.y,
                                  row, count, n_steps)
      # Masked gradients leave unmasked coordinates exactly where they were,
      # so the delta is already zero outside the client's mask.
      return jax.tree.map(jnp.subtract, local, base), loss

    args = (keys, ring_slot, tier, rows, counts, steps)
    if batching == "vmap":
      return jax.vmap(one)(*args)
    return jax.lax.map(lambda a: one(*a), args)

  def dispatch(env: Environment, plan: MaskPlan, key, busy, synced, clock,
               n: int):
    """Starts n tasks on idle eligible clients; returns their bookkeeping."""
    k_pick, k_time, k_drop = jax.random.split(key, 3)
    avail = env.eligible & ~busy
    scores = jnp.where(avail, jax.random.uniform(k_pick, busy.shape), -1.0)
    _, clients = jax.lax.top_k(scores, n)
    f = env.fleet
    nominal, down = nominal_duration(config.batch_size, f, plan, clients,
                                     env.num_steps[clients], synced[clients])
    duration = nominal * jnp.exp(f.task_sigma * jax.random.normal(k_time, (n,)))
    abandoned = jax.random.uniform(k_drop, (n,)) < f.dropout[clients]
    ok = ~abandoned & (duration <= env.deadline)
    arrival = clock + jnp.where(ok, duration, env.deadline)
    busy = busy.at[clients].set(True)
    synced = synced.at[clients].set(True)
    return clients, arrival, ok, jnp.sum(down), busy, synced

  def init(key: jax.Array, env: Environment, params: PyTree) -> SimState:
    """Initial state: version 0 in the ring, C tasks dispatched at t = 0."""
    n = env.data.num_clients
    ring = jax.tree.map(lambda p: jnp.broadcast_to(p, (s,) + p.shape), params)
    ring_version = jnp.full((s,), -1, jnp.int32).at[0].set(0)
    busy = jnp.zeros((n,), bool)
    synced = jnp.zeros((n,), bool)
    clock = jnp.zeros((), jnp.float32)
    clients, arrival, ok, down, busy, synced = dispatch(
        env, env.plan, jax.random.fold_in(key, _KEY_INIT), busy, synced,
        clock, c)
    zero_i, zero_f = jnp.zeros((), jnp.int32), jnp.zeros((), jnp.float32)
    counters = Counters(
        updates_applied=zero_i, updates_dropped=zero_i, updates_stale=zero_i,
        updates_nonfinite=zero_i, staleness_sum=zero_f,
        staleness_hist=jnp.zeros((s + 1,), jnp.int32), bytes_up=zero_f,
        bytes_down=down.astype(jnp.float32), uploads=zero_i,
        downloads=jnp.asarray(c, jnp.int32))
    return SimState(
        params=params, opt_state=server_opt.init(params), ring=ring,
        ring_version=ring_version, version=jnp.zeros((), jnp.int32),
        clock=clock, task_client=clients.astype(jnp.int32),
        task_version=jnp.zeros((c,), jnp.int32), task_arrival=arrival,
        task_ok=ok, client_busy=busy, client_synced=synced,
        counters=counters, plan=env.plan, key=jnp.asarray(key))

  def step(env: Environment, state: SimState) -> tuple[SimState, dict]:
    """One server step; returns the new state and a flat dict of scalars."""
    rkey = jax.random.fold_in(jax.random.fold_in(state.key, _KEY_ROUND),
                              state.version)
    k_train = jax.random.fold_in(rkey, _KEY_TRAIN)
    k_dispatch = jax.random.fold_in(rkey, _KEY_DISPATCH)

    # 1. The K earliest arrivals; ties go to the lower slot.
    neg_arrival, slots = jax.lax.top_k(-state.task_arrival, k)
    clock = jnp.maximum(state.clock, -jnp.min(neg_arrival))
    clients = state.task_client[slots]
    versions = state.task_version[slots]
    ok = state.task_ok[slots]
    tau = state.version - versions
    ring_slot = versions % s
    fresh = state.ring_version[ring_slot] == versions

    # 2. Train each from the version it pulled, with its own mask and data.
    plan = state.plan
    tier = plan.client_tier[clients]
    counts = env.data.counts[clients]
    keys = jax.vmap(jax.random.fold_in, (None, 0))(k_train, clients)
    delta, train_loss = train_clients(
        env, plan, state.ring, keys, ring_slot, tier,
        env.data.indices[clients],
        counts, env.num_steps[clients])
    # A row sum is non-finite iff the row has NaN/Inf (or overflows, which
    # is rejected too); one contiguous pass instead of isfinite + all.
    finite = jnp.isfinite(sum(jnp.sum(d.reshape(k, -1), axis=1)
                              for d in jax.tree.leaves(delta)))
    delta = jax.lax.cond(
        jnp.all(finite), lambda d: d,
        lambda d: jax.tree.map(lambda x: jnp.where(
            finite.reshape((k,) + (1,) * (x.ndim - 1)), x, 0.0), d), delta)

    # 3. Weights.
    valid = ok & fresh & finite
    base_weights = (counts.astype(jnp.float32) ** config.data_weight_exponent
                    * valid)
    weights = base_weights * s_age(tau)
    if config.variance_beta > 0:
      consensus = aggregation.weighted_mean(delta, plan.masks, tier,
                                            weights)
      dev = aggregation.deviation(delta, plan.masks, tier, consensus)
      s_var = staleness.buffer_variance_weight(dev, valid,
                                               config.variance_beta)
      weights = weights * s_var

    # 4. Aggregate and apply; a step with nothing valid leaves the model.
    agg = aggregation.aggregate(delta, plan.masks, tier, weights,
                                config.normalization,
                                base_weights=base_weights)
    any_valid = jnp.any(valid)
    updates, opt_state = server_opt.update(
        jax.tree.map(jnp.negative, agg), state.opt_state, state.params)
    params = _select(any_valid, optax.apply_updates(state.params, updates),
                     state.params)
    opt_state = _select(any_valid, opt_state, state.opt_state)
    version = state.version + 1
    ring = jax.tree.map(lambda r, p: r.at[version % s].set(p), state.ring,
                        params)
    ring_version = state.ring_version.at[version % s].set(version)

    # 5. Dispatch K new tasks from the new version.
    busy = state.client_busy.at[clients].set(False)
    new_clients, arrival, new_ok, down, busy, synced = dispatch(
        env, plan, k_dispatch, busy, state.client_synced, clock, k)

    up = jnp.sum(jnp.where(ok, plan.upload_bytes[tier], 0.0))
    applied = valid & (weights > 0)
    n_applied = jnp.sum(applied).astype(jnp.int32)
    tau_sum = jnp.sum(jnp.where(applied, tau, 0)).astype(jnp.float32)
    cnt = state.counters
    counters = Counters(
        updates_applied=cnt.updates_applied + n_applied,
        updates_dropped=cnt.updates_dropped + jnp.sum(~ok),
        updates_stale=cnt.updates_stale + jnp.sum(ok & ~fresh),
        updates_nonfinite=cnt.updates_nonfinite + jnp.sum(ok & fresh & ~finite),
        staleness_sum=cnt.staleness_sum + tau_sum,
        staleness_hist=cnt.staleness_hist.at[jnp.minimum(tau, s)].add(
            ok.astype(jnp.int32)),
        bytes_up=cnt.bytes_up + up,
        bytes_down=cnt.bytes_down + down,
        uploads=cnt.uploads + jnp.sum(ok),
        downloads=cnt.downloads + k)
    new_state = state.replace(
        params=params, opt_state=opt_state, ring=ring,
        ring_version=ring_version, version=version, clock=clock,
        task_client=state.task_client.at[slots].set(new_clients),
        task_version=state.task_version.at[slots].set(
            jnp.full((k,), version, jnp.int32)),
        task_arrival=state.task_arrival.at[slots].set(arrival),
        task_ok=state.task_ok.at[slots].set(new_ok),
        client_busy=busy, client_synced=synced, counters=counters)
    metrics = {
        "virtual_time_s": clock,
        "updates_applied": n_applied,
        "mean_staleness": tau_sum / jnp.maximum(n_applied, 1),
        "train_loss": jnp.sum(jnp.where(applied, train_loss, 0.0)) /
                      jnp.maximum(n_applied, 1),
    }
    return new_state, metrics

  def evaluate(params: PyTree, x: jnp.ndarray, y: jnp.ndarray) -> dict:
    """Accuracy and mean loss on a held-out set, in fixed-size batches."""
    n = x.shape[0]
    b = min(config.eval_batch_size, n)
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
    return {"test_loss": jnp.sum(losses) / n,
            "test_accuracy": jnp.sum(hits) / n}

  return Simulator(init=init, step=step, evaluate=evaluate)


def summary_counters(state: SimState) -> dict:
  """Host-side cumulative counters as plain Python numbers."""
  cnt = jax.device_get(state.counters)
  applied = int(cnt.updates_applied)
  return {
      "round": int(state.version),
      "virtual_time_s": float(state.clock),
      "updates_applied": applied,
      "updates_dropped": int(cnt.updates_dropped),
      "updates_stale": int(cnt.updates_stale),
      "updates_nonfinite": int(cnt.updates_nonfinite),
      "mean_staleness": float(cnt.staleness_sum) / max(applied, 1),
      "staleness_hist": [int(v) for v in cnt.staleness_hist],
      "bytes_up": float(cnt.bytes_up),
      "bytes_down": float(cnt.bytes_down),
      "upload_bytes_per_update": float(cnt.bytes_up) / max(int(cnt.uploads), 1),
      "download_bytes_per_update": float(cnt.bytes_down) / max(
          int(cnt.downloads), 1),
  }
