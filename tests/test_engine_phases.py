"""Each engine phase on hand-made state, with hand-computed results."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ftte_jax.core import aggregation
from ftte_jax.core import algorithms
from ftte_jax.core import engine
from ftte_jax.core import exact
from ftte_jax.core import masks
from ftte_jax.core import client as client_lib
from ftte_jax.core import staleness
from ftte_jax.core import transforms
from ftte_jax.core.state import Counters, Ring, SimState, Start, Tasks
from helpers import (build_engine, components, const_fleet, make_dataset,
                     run_steps, tiny_model, weigh)

PARAMS = {"w": jnp.zeros((2,), jnp.float32)}


def hand_state(arrival, task_version, version, ring_size=4, params=None):
  """A SimState with the given tasks (clients 0..C-1) and server version."""
  params = PARAMS if params is None else params
  c = len(arrival)
  ring = Ring.create(params, ring_size)
  for v in range(1, version + 1):
    ring = ring.push(jnp.asarray(v, jnp.int32), params)
  return SimState(
      params=params, opt_state=optax.sgd(1.0).init(params), ring=ring,
      version=jnp.asarray(version, jnp.int32),
      clock=jnp.asarray(0.5, jnp.float32),
      tasks=Tasks(client=jnp.arange(c, dtype=jnp.int32),
                  version=jnp.asarray(task_version, jnp.int32),
                  arrival=jnp.asarray(arrival, jnp.float32),
                  ok=jnp.asarray([True, False] + [True] * (c - 2)),
                  energy=jnp.zeros((c,), jnp.float32)),
      client_busy=jnp.ones((c,), bool), client_synced=jnp.ones((c,), bool),
      counters=Counters.create(ring_size),
      plan=masks.full_plan(params, c), key=jax.random.PRNGKey(0),
      client_applied=jnp.zeros((c,), jnp.int32),
      client_staleness=jnp.zeros((c,), jnp.int32),
      client_energy=jnp.zeros((c,), jnp.float32),
      client_depleted_at=jnp.full((c,), jnp.inf, jnp.float32))


def test_ring_holds_the_last_s_versions():
  ring = Ring.create(PARAMS, 3)
  np.testing.assert_array_equal(ring.version, [0, -1, -1])
  for v in range(1, 5):
    ring = ring.push(jnp.asarray(v), {"w": jnp.full((2,), float(v))})
  # Versions 2, 3, 4 in slots 2, 0, 1.
  np.testing.assert_array_equal(ring.version, [3, 4, 2])
  np.testing.assert_array_equal(ring.params["w"][:, 0], [3.0, 4.0, 2.0])


def test_counters_start_with_the_probe_traffic():
  c = Counters.create(5, probe_bytes_up=exact.of(10.0),
                      probe_bytes_down=exact.of(20.0))
  assert c.staleness_hist.shape == (6,)
  assert exact.value(c.probe_bytes_up) == 10.0
  assert exact.value(c.probe_bytes_down) == 20.0
  assert exact.value(c.bytes_up) == 0.0 and int(c.downloads) == 0


def test_take_arrivals_picks_the_k_earliest_and_advances_the_clock():
  # Ring of 4 at version 5 holds versions 2..5; a task from version 1 is
  # over-stale.
  state = hand_state(arrival=[4.0, 1.0, 3.0, 2.0], task_version=[5, 1, 3, 4],
                     version=5)
  a = engine.take_arrivals(state, 2)
  np.testing.assert_array_equal(a.slots, [1, 3])
  np.testing.assert_array_equal(a.clients, [1, 3])
  np.testing.assert_array_equal(a.tau, [4, 1])
  np.testing.assert_array_equal(a.ok, [False, True])
  np.testing.assert_array_equal(a.fresh, [False, True])
  np.testing.assert_array_equal(a.ring_slot, [1, 0])
  assert float(a.clock) == 2.0


def test_take_arrivals_never_moves_the_clock_back():
  state = hand_state(arrival=[0.1, 0.2, 3.0], task_version=[0, 0, 0],
                     version=0).replace(clock=jnp.asarray(1.0, jnp.float32))
  assert float(engine.take_arrivals(state, 2).clock) == 1.0


def test_train_buffer_trains_from_the_pulled_version_and_zeroes_nonfinite():
  _, _, data = make_dataset(num_clients=3, per_client=4)
  params = {"w": jnp.zeros((2,), jnp.float32)}
  ring = Ring.create(params, 4).push(jnp.asarray(1), {"w": jnp.ones((2,))})
  plan = masks.make_plan(params, [{"w": jnp.asarray([1.0, 0.0])},
                                  {"w": jnp.asarray([1.0, 1.0])}],
                         np.asarray([0, 1, 1]))
  env_config = algorithms.preset("fedbuff", concurrency=3, buffer_size=3)
  env = engine.make_environment(env_config, data, const_fleet(3), plan)

  def fake_update(key, base, mask, data, state):
    del key, state
    # One "step" adds the client's count (client 2's is poisoned) in-mask.
    bump = jnp.where(data.count == 4, 1.0 * data.num_steps, jnp.nan)
    return client_lib.ClientResult(
        jax.tree.map(lambda b, m: b + m * bump, base, mask), jnp.zeros(()))

  data = data.replace(counts=data.counts.at[2].set(5))
  env = env.replace(data=data)
  arrivals = engine.Arrivals(
      slots=jnp.arange(3), clients=jnp.arange(3), tau=jnp.zeros(3, jnp.int32),
      ok=jnp.ones(3, bool), fresh=jnp.ones(3, bool),
      ring_slot=jnp.asarray([0, 1, 1]), clock=jnp.asarray(0.0),
      filled=jnp.ones(3, bool))
  for batching in ("map", "vmap"):
    comp = components(env_config, fake_update, batching=batching)
    delta, _, finite, _ = engine.train_buffer(
        comp, env, plan, ring, jax.random.split(jax.random.PRNGKey(0), 3),
        arrivals)
    np.testing.assert_array_equal(finite, [True, True, False])
    # Client 0: tier 0 mask [1, 0], five local steps; client 1: tier 1 mask.
    np.testing.assert_allclose(delta["w"], [[5.0, 0.0], [5.0, 5.0],
                                            [0.0, 0.0]])


def test_weigh_updates_data_size_age_and_validity():
  params = {"w": jnp.zeros((2,))}
  plan = masks.full_plan(params, 3)
  config = algorithms.preset("fedbuff", concurrency=3, buffer_size=3,
                             data_weight_exponent=1.0)
  arrivals = engine.Arrivals(
      slots=jnp.arange(3), clients=jnp.arange(3),
      tau=jnp.asarray([0, 3, 8]), ok=jnp.asarray([True, True, True]),
      fresh=jnp.asarray([True, True, True]), ring_slot=jnp.zeros(3, jnp.int32),
      clock=jnp.asarray(0.0), filled=jnp.ones(3, bool))
  w = weigh(config, {"w": jnp.ones((3, 2))}, plan, jnp.zeros(3, jnp.int32),
            [4, 9, 16], arrivals, [True, True, False],
            staleness.make_staleness_fn("polynomial", 0.5))
  np.testing.assert_array_equal(w.valid, [True, True, False])
  np.testing.assert_allclose(w.base, [4.0, 9.0, 0.0])
  # n_i * (1 + tau)^-0.5: 4 * 1, 9 / 2, 0.
  np.testing.assert_allclose(w.weights, [4.0, 4.5, 0.0], rtol=1e-6)


def test_server_update_applies_pushes_and_skips_an_empty_step():
  """Aggregate (buffer mean), apply with server SGD, push into the ring."""
  state = hand_state(arrival=[1.0, 2.0], task_version=[0, 0], version=2)
  delta = {"w": jnp.asarray([[2.0, 0.0], [0.0, 4.0]])}
  w = transforms.Buffer.start(jnp.asarray([True, True]),
                              jnp.zeros(2, jnp.int32), jnp.ones(2, jnp.int32),
                              jnp.zeros(2, jnp.int32), jnp.arange(2))
  opt = optax.sgd(0.5)
  tier = jnp.zeros(2, jnp.int32)
  agg = aggregation.aggregate(delta, state.plan.masks, tier, w.weights,
                              "buffer")
  params, _, ring, refused = engine.server_update(opt, state, agg,
                                                  jnp.any(w.valid))
  assert not bool(refused)
  # Mean over the 2 valid updates, times server lr 0.5.
  np.testing.assert_allclose(params["w"], [0.5, 1.0])
  assert int(ring.version[3 % 4]) == 3
  np.testing.assert_allclose(ring.params["w"][3], [0.5, 1.0])
  none = w.replace(valid=jnp.asarray([False, False]),
                   weights=jnp.zeros(2))
  agg = aggregation.aggregate(delta, state.plan.masks, tier, none.weights,
                              "buffer")
  params, _, _, refused = engine.server_update(opt, state, agg,
                                               jnp.any(none.valid))
  np.testing.assert_array_equal(params["w"], [0.0, 0.0])
  assert not bool(refused)
  # Finite updates whose sum overflows: the step is refused, model kept.
  huge = {"w": jnp.asarray([[3e38, 0.0], [3e38, 0.0]])}
  agg = aggregation.aggregate(huge, state.plan.masks, tier,
                              jnp.asarray([1.0, 1.0]), "coordinate")
  params, _, ring, refused = engine.server_update(
      optax.sgd(-10.0), state, agg, jnp.asarray(True))
  assert bool(refused)
  np.testing.assert_array_equal(params["w"], [0.0, 0.0])
  np.testing.assert_array_equal(ring.params["w"][3], [0.0, 0.0])


def test_dispatch_picks_idle_eligible_clients_and_times_their_tasks():
  _, _, data = make_dataset(num_clients=5, per_client=4)
  params = {"w": jnp.zeros((250,), jnp.float32)}  # 1,000 bytes.
  plan = masks.make_plan(params, [jax.tree.map(jnp.ones_like, params)],
                         np.zeros(5, np.int32), flops_per_example=[100.0])
  fleet = const_fleet(5, speed=1e3).replace(
      bw_up=jnp.full(5, 1e3, jnp.float32),
      bw_down=jnp.full(5, 2e3, jnp.float32))
  config = algorithms.preset("fedbuff", concurrency=2, buffer_size=2,
                             local_steps=3, batch_size=2, deadline_s=100.0)
  env = engine.make_environment(config, data, fleet, plan)
  env = env.replace(eligible=jnp.asarray([True, True, True, False, True]))
  busy = jnp.asarray([True, False, True, False, False])
  synced = jnp.asarray([False, True, False, False, False])
  d = engine.dispatch(env, plan, jax.random.PRNGKey(3), busy, synced,
                      jnp.asarray(10.0), 2, config.batch_size)
  assert sorted(np.asarray(d.clients).tolist()) == [1, 4]
  # Both download the whole model (1,000 bytes; the synced client's union
  # is the whole model too): 1000/2000 + 3*2*100/1000 + 1000/1000 = 2.1 s.
  np.testing.assert_allclose(d.arrival, [12.1, 12.1], rtol=1e-6)
  assert float(d.bytes_down) == 2000.0
  np.testing.assert_array_equal(d.busy, [True, True, True, False, True])
  np.testing.assert_array_equal(d.synced, [False, True, False, False, True])


def test_dispatch_past_the_deadline_arrives_at_the_deadline_not_ok():
  _, _, data = make_dataset(num_clients=2, per_client=4)
  params = {"w": jnp.zeros((250,), jnp.float32)}
  plan = masks.full_plan(params, 2)
  fleet = const_fleet(2, speed=1.0)  # Very slow: far past the deadline.
  config = algorithms.preset("fedbuff", concurrency=1, buffer_size=1,
                             deadline_s=5.0)
  env = engine.make_environment(config, data, fleet, plan)
  d = engine.dispatch(env, plan, jax.random.PRNGKey(0), jnp.zeros(2, bool),
                      jnp.zeros(2, bool), jnp.asarray(1.0), 1, 32)
  assert not bool(d.ok[0]) and float(d.arrival[0]) == 6.0


def test_count_adds_one_step():
  counters = Counters.create(4)
  arrivals = engine.Arrivals(
      slots=jnp.arange(3), clients=jnp.arange(3), tau=jnp.asarray([0, 2, 6]),
      ok=jnp.asarray([True, True, False]),
      fresh=jnp.asarray([True, True, True]),
      ring_slot=jnp.zeros(3, jnp.int32), clock=jnp.asarray(0.0),
      filled=jnp.ones(3, bool))
  w = transforms.Buffer.start(jnp.asarray([True, False, False]),
                              arrivals.tau, jnp.ones(3, jnp.int32),
                              jnp.zeros(3, jnp.int32), arrivals.clients)
  c, n_applied, tau_sum = engine.count(counters, arrivals, w,
                                       jnp.asarray([5.0, 7.0, 11.0]),
                                       jnp.asarray(30.0), jnp.asarray(3), 2)
  assert int(n_applied) == 1 and float(tau_sum) == 0.0
  assert int(c.updates_applied) == 1
  assert int(c.updates_dropped) == 1 + 2  # one in the buffer, two outside.
  assert int(c.updates_stale) == 0
  # Client 1 arrived and was fresh but invalid: it was non-finite.
  assert int(c.updates_nonfinite) == 1
  np.testing.assert_array_equal(c.staleness_hist, [1, 0, 1, 0, 0])
  assert exact.value(c.staleness_sum_arrivals) == 2.0
  assert exact.value(c.bytes_up) == 12.0
  assert exact.value(c.bytes_down) == 30.0
  assert int(c.uploads) == 2 and int(c.downloads) == 3


def test_init_starts_after_the_probe_and_counts_its_traffic(tiny_model):
  apply, params = tiny_model
  _, _, data = make_dataset(num_clients=4, per_client=8)
  config = algorithms.preset("fedbuff", concurrency=2, buffer_size=1)
  plan = masks.full_plan(params, 4)
  env = engine.make_environment(config, data, const_fleet(4), plan)
  sim = engine.make_simulator(config, apply)
  key = jax.random.PRNGKey(0)
  plain = jax.jit(sim.init)(key, env, params, plan)
  shifted = jax.jit(sim.init)(key, env, params, plan,
                              Start.of(clock=7.0, bytes_up=3.0,
                                       bytes_down=5.0))
  assert float(shifted.clock) == 7.0
  np.testing.assert_allclose(shifted.tasks.arrival, plain.tasks.arrival + 7.0)
  assert exact.value(shifted.counters.probe_bytes_up) == 3.0
  assert exact.value(shifted.counters.probe_bytes_down) == 5.0
  # Probe traffic stays out of the task counters (per-update figures).
  assert exact.value(shifted.counters.bytes_down) == exact.value(
      plain.counters.bytes_down)
  chex.assert_trees_all_equal(shifted.tasks.client, plain.tasks.client)


def test_replan_swaps_the_plan_and_counts_the_probe():
  state = hand_state(arrival=[1.0, 2.0], task_version=[0, 0], version=0)
  plan = masks.make_plan(PARAMS, [{"w": jnp.asarray([1.0, 0.0])}],
                         np.zeros(2, np.int32))
  new = engine.replan(state, plan, bytes_up=4.0, bytes_down=6.0)
  assert float(new.plan.upload_bytes[0]) == 4.0
  assert exact.value(new.counters.probe_bytes_up) == 4.0
  assert exact.value(new.counters.probe_bytes_down) == 6.0
  assert exact.value(new.counters.bytes_up) == 0.0


@pytest.mark.parametrize("batching", ["map", "vmap"])
def test_step_traces_once(tiny_model, batching):
  chex.clear_trace_counter()  # counts are per function, across parameters.
  apply, params = tiny_model
  _, _, data = make_dataset(num_clients=6, per_client=8)
  config = algorithms.preset("ftte", concurrency=4, buffer_size=2,
                             local_steps=1, batch_size=4, mask="full",
                             client_batching=batching)
  plan = masks.full_plan(params, 6)
  env = engine.make_environment(config, data, const_fleet(6), plan)
  sim = engine.make_simulator(config, apply)
  state = jax.jit(sim.init)(jax.random.PRNGKey(0), env, params, plan)
  step = jax.jit(chex.assert_max_traces(sim.step, n=1))
  for _ in range(3):
    state, metrics = step(env, state)
  assert int(state.version) == 3
  assert set(metrics) == {"virtual_time_s", "updates_applied",
                          "mean_staleness", "train_loss"}


@pytest.mark.parametrize("algorithm, rule", [
    ("fedavg", "delta"), ("fedbuff", "delta"), ("fedasync", "mixing")])
def test_streamed_aggregation_equals_the_buffered_one(tiny_model, algorithm,
                                                      rule):
  # Unequal clients, a NaN-free run; stream keeps only the running sum.
  apply, params = tiny_model
  _, _, data = make_dataset(num_clients=8, per_client=12, equal=False)
  out = {}
  for batching in ("map", "stream"):
    kw = dict(concurrency=4, buffer_size=1 if algorithm == "fedasync" else 4,
              local_steps=3, batch_size=4, update_rule=rule,
              client_batching=batching)
    if algorithm == "fedavg":
      kw.pop("concurrency")
    config = algorithms.preset(algorithm, **kw)
    out[batching] = run_steps(*build_engine(config, apply, params, data,
                                            const_fleet(8), seed=2), 6)
  chex.assert_trees_all_close(out["stream"].params, out["map"].params,
                              atol=1e-6)
  chex.assert_trees_all_equal(out["stream"].counters, out["map"].counters)


def test_stream_refuses_the_variance_weight():
  with pytest.raises(ValueError, match="client_batching='stream' needs"):
    algorithms.preset("ftte", client_batching="stream")


def test_variance_weight_survives_huge_finite_updates():
  params = {"w": jnp.zeros((3,))}
  plan = masks.full_plan(params, 3)
  config = algorithms.preset("ftte", concurrency=3, buffer_size=3,
                             mask="full")
  arrivals = engine.Arrivals(
      slots=jnp.arange(3), clients=jnp.arange(3), tau=jnp.zeros(3, jnp.int32),
      ok=jnp.ones(3, bool), fresh=jnp.ones(3, bool),
      ring_slot=jnp.zeros(3, jnp.int32), clock=jnp.asarray(0.0),
      filled=jnp.ones(3, bool))
  small = jnp.asarray([[1.0, 2.0, 0.0], [1.0, 2.5, 0.0], [-3.0, 0.0, 1.0]])
  args = (plan, jnp.zeros(3, jnp.int32), [2, 2, 2], arrivals,
          jnp.ones(3, bool))
  w_small = weigh(config, {"w": small}, *args)
  # 1e30 * small: its squares overflow float32, the ratio d_i does not.
  w_huge = weigh(config, {"w": small * 1e30}, *args)
  assert bool(jnp.all(jnp.isfinite(w_huge.weights)))
  np.testing.assert_allclose(w_huge.weights, w_small.weights, rtol=1e-5)


@pytest.mark.slow  # runs long: two step programs per algorithm
@pytest.mark.parametrize("algorithm", ["fedbuff", "ftte"])
def test_chunked_steps_equal_single_steps_bit_for_bit(tiny_model, algorithm):
  apply, params = tiny_model
  _, _, data = make_dataset(num_clients=8, per_client=12, equal=False)
  config = algorithms.preset(algorithm, concurrency=4, buffer_size=2,
                             local_steps=2, batch_size=4, mask="full")
  plan = masks.full_plan(params, 8)
  env = engine.make_environment(config, data, const_fleet(8, sigma=0.3), plan)
  sim = engine.make_simulator(config, apply, int(env.num_steps.max()))
  state = jax.jit(sim.init)(jax.random.PRNGKey(2), env, params, plan)
  step = jax.jit(sim.step)
  single = state
  for _ in range(7):
    single, _ = step(env, single)
  chunk = jax.jit(sim.steps)
  chunked, taken, over = chunk(env, state, 4)
  chunked, taken2, _ = chunk(env, chunked, 3)
  assert int(taken) == 4 and int(taken2) == 3 and not bool(over)
  chex.assert_trees_all_equal(chunked, single)
  # A budget stops before the first step that would pass it.
  budget = float(single.clock) - 1e-6
  stopped, taken, over = chunk(env, state, 100, budget)
  assert bool(over) and int(taken) == 6
  assert float(stopped.clock) <= budget


@pytest.mark.parametrize("size,free,n", [(10, 10, 3), (1000, 990, 8),
                                         (100, 3, 3), (50, 20, 16)])
def test_pick_idle_returns_distinct_available_clients(size, free, n):
  avail = np.zeros(size, bool)
  avail[np.random.default_rng(size).choice(size, free, replace=False)] = True
  pick = jax.jit(lambda k: engine.pick_idle(k, jnp.asarray(avail), n))
  for seed in range(20):
    got = np.asarray(pick(jax.random.PRNGKey(seed)))
    assert len(set(got.tolist())) == n and avail[got].all()


def test_pick_idle_is_uniform_over_available_clients():
  # 6 clients, 0 and 3 busy, pick 2: each of the 4 free ones is chosen with
  # probability 1/2 (both through the fast path and the exact fallback).
  avail = jnp.asarray([False, True, True, False, True, True])
  keys = jax.random.split(jax.random.PRNGKey(0), 4000)
  got = np.asarray(jax.vmap(lambda k: engine.pick_idle(k, avail, 2))(keys))
  freq = np.bincount(got.ravel(), minlength=6) / len(keys)
  np.testing.assert_allclose(freq, [0, .5, .5, 0, .5, .5], atol=0.03)
  pairs = {tuple(sorted(r)) for r in got.tolist()}
  assert len(pairs) == 6  # every pair of the four free clients occurs


@pytest.mark.slow  # runs long: a program per chunk size
@pytest.mark.parametrize("algorithm, batching", [
    ("fedbuff", "stream"), ("ftte", "map"), ("fedasync", "stream")])
def test_client_chunks_equal_one_client_at_a_time(tiny_model, algorithm,
                                                  batching):
  # K = 5 in chunks of 2: two full chunks and a remainder of one.
  apply, params = tiny_model
  _, _, data = make_dataset(num_clients=12, per_client=10, equal=False)
  out = {}
  for chunk in (1, 2):
    k = 1 if algorithm == "fedasync" else 5
    config = algorithms.preset(algorithm, concurrency=6, buffer_size=k,
                               local_steps=3, batch_size=4,
                               client_batching=batching, client_chunk=chunk)
    out[chunk] = run_steps(*build_engine(config, apply, params, data,
                                         const_fleet(12)), 6)
  chex.assert_trees_all_close(out[2].params, out[1].params, atol=1e-6)
  chex.assert_trees_all_equal(out[2].counters, out[1].counters)
