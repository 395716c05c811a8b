"""Engine tests: an independent FedAvg reference, hand-computed cases,
determinism, virtual time and input validation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import build_engine, const_fleet, make_dataset, run_steps
from ftte_jax.core import algorithms
from ftte_jax.core import engine
from ftte_jax.core import exact
from ftte_jax.core import masks
from ftte_jax.data import client_data


def reference_batch_rows(key, offset, count, step, batch):
  # Written out independently of ftte_jax.client: the affine walk
  # j -> (a*j + b) mod n in Python integers, from the same key draws.
  w = [int(v) for v in jax.random.bits(key, (3,), jnp.uint32)]
  a = int(client_data.STRIDE_PRIMES[w[0] >> 24]) % count
  b = ((w[1] << 32) + w[2]) * int(count) >> 64
  return np.array([offset + (a * (step * batch + t) + b) % count
                   for t in range(batch)])


def test_fedavg_matches_python_loop_reference(tiny_model):
  apply, params0 = tiny_model
  _, _, data = make_dataset(num_clients=10, per_client=20, equal=False)
  x, y = np.asarray(data.x), np.asarray(data.y)
  config = algorithms.preset("fedavg", buffer_size=4, local_steps=3,
                             batch_size=8, client_lr=0.2)
  sim, env, state = build_engine(config, apply, params0, data, const_fleet(10))
  step = jax.jit(sim.step)
  root = jax.random.PRNGKey(1)
  offsets, counts = np.asarray(data.offsets), np.asarray(data.counts)

  def loss(p, xb, yb):
    logits = apply(p, xb)
    logp = jax.nn.log_softmax(logits)
    return -jnp.mean(logp[jnp.arange(len(yb)), yb])

  grad = jax.jit(jax.grad(loss))
  ref = jax.tree.map(np.asarray, params0)
  for r in range(4):
    clients = np.asarray(state.tasks.client)  # the engine's sampling
    k_train = jax.random.fold_in(
        jax.random.fold_in(jax.random.fold_in(root, 1), r), 0)
    deltas, sizes = [], []
    for c in clients:  # one client at a time, plain SGD
      local = jax.tree.map(np.array, ref)
      ckey = jax.random.fold_in(k_train, int(c))
      for i in range(3):
        rows = reference_batch_rows(ckey, offsets[c], counts[c], i, 8)
        g = grad(local, x[rows], y[rows])
        local = jax.tree.map(lambda p, gg: p - 0.2 * np.asarray(gg), local, g)
      deltas.append(jax.tree.map(lambda a, b: a - b, local, ref))
      sizes.append(counts[c])
    w = np.asarray(sizes, np.float64) / np.sum(sizes)
    ref = jax.tree.map(
        lambda p, *ds: p + sum(wi * d for wi, d in zip(w, ds)), ref, *deltas)
    state, _ = step(env, state)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5),
                 jax.device_get(state.params), ref)
  assert int(state.counters.updates_applied) == 16


def test_fedbuff_equals_fedavg_with_equal_speeds_and_c_equals_k(tiny_model):
  apply, params = tiny_model
  _, _, data = make_dataset(num_clients=8, per_client=16, equal=True)
  out = []
  for name in ("fedavg", "fedbuff"):
    # Step refill: with arrival refill, C = K tasks restart before the
    # server step and train one version behind.
    config = algorithms.preset(name, buffer_size=4, concurrency=4,
                               local_steps=2, batch_size=8, client_lr=0.1,
                               server_lr=1.0, refill="step")
    out.append(run_steps(*build_engine(config, apply, params, data, const_fleet(8)), 5))
  assert float(out[0].clock) == float(out[1].clock)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6),
               out[0].params, out[1].params)


def test_over_stale_update_is_dropped_and_counted(tiny_model):
  apply, params = tiny_model
  _, _, data = make_dataset(num_clients=2, per_client=16)
  # Client 0 takes ~1 s per task, client 1 ~10 s: with K = 1, C = 2 the slow
  # task arrives ~9 versions late, beyond a ring of S = 3.
  fleet = const_fleet(2, speed=np.array([1.0, 0.1]) * 2 * 32 *
                      float(masks.dense_flops_estimate(
                          params, jax.tree.map(jnp.ones_like, params))))
  config = algorithms.preset("fedbuff", buffer_size=1, concurrency=2,
                             ring_size=3, local_steps=2, batch_size=16,
                             deadline_s=100.0)
  sim, env, state = build_engine(config, apply, params, data, fleet)
  step = jax.jit(sim.step)
  for _ in range(9):
    state, _ = step(env, state)
  assert int(state.counters.updates_stale) == 0
  before = jax.device_get(state.params)
  state, m = step(env, state)  # the slow client's arrival at t = 10
  assert int(state.counters.updates_stale) == 1
  assert int(m["updates_applied"]) == 0
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.params),
               before)
  assert int(state.counters.staleness_hist[3]) == 1  # bin S holds tau >= S


def test_nonfinite_update_is_rejected_counted_and_model_stays_finite(
    tiny_model):
  apply, params = tiny_model
  x, y, data = make_dataset(num_clients=4, per_client=16)
  bad = data.rows(1)
  data = data.replace(x=data.x.at[bad].set(jnp.inf))
  config = algorithms.preset("fedavg", buffer_size=4, local_steps=2,
                             batch_size=8)
  state = run_steps(*build_engine(config, apply, params, data, const_fleet(4)), 3)
  assert int(state.counters.updates_nonfinite) == 3
  assert int(state.counters.updates_applied) == 9
  for leaf in jax.tree.leaves(state.params):
    assert np.isfinite(np.asarray(leaf)).all()


def test_same_seed_is_bit_identical_and_resume_replays(tiny_model):
  apply, params = tiny_model
  _, _, data = make_dataset(num_clients=12, per_client=16)
  config = algorithms.preset("ftte", concurrency=6, buffer_size=3,
                             local_steps=2, batch_size=8)
  fleet = const_fleet(12, speed=np.linspace(1e5, 1e6, 12), sigma=0.3)
  plan = masks.make_plan(params, [masks.last_n_mask(params, 2)],
                         np.zeros(12, np.int32))
  sim, env, s0 = build_engine(config, apply, params, data, fleet, plan, seed=7)
  a = run_steps(sim, env, s0, 6)
  b = run_steps(sim, env, s0, 6)
  jax.tree.map(np.testing.assert_array_equal, a, b)
  # Interrupt after 3 steps, round-trip the state through host memory, go on.
  mid = jax.device_put(jax.device_get(run_steps(sim, env, s0, 3)))
  c = run_steps(sim, env, mid, 3)
  jax.tree.map(np.testing.assert_array_equal, a, c)
  _, _, other = build_engine(config, apply, params, data, fleet, plan, seed=8)
  d = run_steps(sim, env, other, 6)
  assert not np.array_equal(np.asarray(d.params["layer1"]["kernel"]),
                            np.asarray(a.params["layer1"]["kernel"]))


def test_virtual_time_fedavg_waits_for_stragglers_fedbuff_does_not(
    tiny_model):
  apply, params = tiny_model
  n = 100
  _, _, data = make_dataset(num_clients=n, per_client=8)
  rng = np.random.default_rng(0)
  speed = np.full(n, 1e6)
  speed[rng.permutation(n)[:90]] /= 10.0
  fleet = const_fleet(n, speed=speed)
  plan = masks.full_plan(params, n)
  flops = float(plan.flops_per_example[0])
  fast_task, slow_task = 2 * 8 * flops / 1e6, 2 * 8 * flops / 1e5
  per_step = {}
  for name, c in (("fedavg", 10), ("fedbuff", 50)):
    config = algorithms.preset(name, buffer_size=10, concurrency=c,
                               local_steps=2, batch_size=8)
    state = run_steps(*build_engine(config, apply, params, data, fleet, plan), 20)
    per_step[name] = float(state.clock) / 20
  # P(no straggler among 10 of 90% stragglers) ~ 1e-10: every round waits.
  assert per_step["fedavg"] == pytest.approx(slow_task, rel=0.02)
  assert per_step["fedbuff"] < 0.25 * per_step["fedavg"]
  assert per_step["fedbuff"] > 0.5 * fast_task


@pytest.mark.parametrize("refill, count_timeouts", [
    ("step", False), ("arrival", True), ("arrival", False)])
def test_dropped_tasks_free_their_slot_at_the_deadline(tiny_model, refill,
                                                       count_timeouts):
  apply, params = tiny_model
  _, _, data = make_dataset(num_clients=10, per_client=8)
  config = algorithms.preset("fedbuff", concurrency=5, buffer_size=2,
                             local_steps=1, batch_size=8, deadline_s=50.0,
                             refill=refill, count_timeouts=count_timeouts)
  state = run_steps(*build_engine(config, apply, params, data,
                     const_fleet(10, dropout=0.5)), 30)
  cnt = state.counters
  assert int(cnt.updates_dropped) > 0
  assert int(cnt.updates_applied) > 0
  if refill == "step" or count_timeouts:
    # Timeouts take a place among the K of a step.
    assert int(cnt.updates_dropped) + int(cnt.updates_applied) == 60
  else:
    # The server waits for K received updates, as the papers do.
    assert int(cnt.updates_applied) == 60
  assert float(state.clock) >= 50.0  # some slot waited for its deadline


def test_memory_policy_excludes_devices_that_cannot_train(tiny_model):
  apply, params = tiny_model
  _, _, data = make_dataset(num_clients=10, per_client=8)
  plan = masks.full_plan(params, 10, memory_bytes=[1000.0])
  fleet = const_fleet(10).replace(
      memory=jnp.asarray([500.0] * 4 + [2000.0] * 6, jnp.float32))
  config = algorithms.preset("fedavg", buffer_size=3, local_steps=1)
  sim, env, state = build_engine(config, apply, params, data, fleet, plan)
  np.testing.assert_array_equal(np.asarray(env.eligible), [0] * 4 + [1] * 6)
  step = jax.jit(sim.step)
  for _ in range(10):
    assert (np.asarray(state.tasks.client) >= 4).all()
    state, _ = step(env, state)
  with pytest.raises(ValueError, match="memory_policy"):
    engine.make_environment(algorithms.preset("fedavg", buffer_size=7),
                            data, fleet, plan)
  loose = algorithms.preset("fedavg", buffer_size=7, memory_policy="ignore")
  assert bool(engine.make_environment(loose, data, fleet, plan).eligible.all())


@pytest.mark.parametrize("kwargs, option", [
    (dict(buffer_size=11, concurrency=10), "buffer_size"),
    (dict(buffer_size=0), "buffer_size"),
    (dict(ring_size=0), "ring_size"),
    (dict(staleness="linear"), "staleness"),
    (dict(normalization="median"), "normalization"),
    (dict(server_optimizer="lamb"), "server_optimizer"),
    (dict(client_lr=-1.0), "client_lr"),
    (dict(frobnicate=1), "unknown engine option"),
])
def test_bad_engine_options_raise_naming_the_option(kwargs, option):
  with pytest.raises(ValueError, match=option):
    algorithms.preset("fedbuff", **kwargs)


def test_unknown_preset_and_fedavg_concurrency():
  with pytest.raises(ValueError, match="algorithm must be one of"):
    algorithms.preset("scaffold")
  with pytest.raises(ValueError, match="concurrency must equal buffer_size"):
    algorithms.preset("fedavg", buffer_size=5, concurrency=10)


def test_concurrency_above_num_clients_is_rejected(tiny_model):
  _, params = tiny_model
  _, _, data = make_dataset(num_clients=4, per_client=8)
  config = algorithms.preset("fedbuff", concurrency=5, buffer_size=2)
  with pytest.raises(ValueError, match="concurrency"):
    engine.make_environment(config, data, const_fleet(4),
                            masks.full_plan(params, 4))


@pytest.mark.parametrize("first_download", ["whole", "deployed"])
def test_payload_accounting_masked_upload_and_changed_only_download(
    tiny_model, first_download):
  apply, params = tiny_model
  _, _, data = make_dataset(num_clients=10, per_client=8)
  # layer1 bias + kernel: 16*4+4.
  plan = masks.make_plan(params, [masks.last_n_mask(params, 2)],
                         np.zeros(10, np.int32))
  config = algorithms.preset("ftte", concurrency=4, buffer_size=2,
                             local_steps=1, batch_size=4,
                             first_download=first_download)
  sim, env, state = build_engine(config, apply, params, data,
                          const_fleet(10, speed=np.linspace(1e5, 1e6, 10)),
                          plan)
  step = jax.jit(sim.step)
  for _ in range(12):
    state, _ = step(env, state)
  cnt = state.counters
  model_bytes, sub_bytes = 4.0 * (6 * 16 + 16 + 16 * 4 + 4), 4.0 * (64 + 4)
  assert float(plan.upload_bytes[0]) == sub_bytes
  assert float(plan.model_bytes) == model_bytes
  assert exact.value(cnt.bytes_up) == int(cnt.uploads) * sub_bytes
  # First task of a client downloads the model, later ones only the
  # coordinates that can have changed (the trained subset). With arrival
  # refill a task can start and finish inside one step, so the clients
  # that ever downloaded are read from client_synced, not from snapshots.
  # With the starting model deployed on every device, every download is
  # the subset only.
  if first_download == "deployed":
    assert exact.value(cnt.bytes_down) == int(cnt.downloads) * sub_bytes
    return
  first = int(np.asarray(state.client_synced).sum())
  assert 4 < first < int(cnt.downloads)
  assert exact.value(cnt.bytes_down) == pytest.approx(
      first * model_bytes + (int(cnt.downloads) - first) * sub_bytes)


def test_preset_sizes_the_ring_to_the_expected_staleness():
  assert algorithms.preset("fedasync", concurrency=100).ring_size == 400
  assert algorithms.preset("fedbuff", concurrency=20, buffer_size=10
                           ).ring_size == 16
  assert algorithms.preset("ftte", concurrency=100, buffer_size=10,
                           ring_size=8).ring_size == 8
