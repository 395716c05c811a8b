"""Energy per task, the synchronous idle wait, trace columns and batteries,
with hand-computed figures (docs/design.md, "Energy and batteries")."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ftte_jax import experiment
from ftte_jax.core import algorithms
from ftte_jax.core import engine
from ftte_jax.core import exact
from ftte_jax.core import fleet as fleet_lib
from ftte_jax.core import masks
from helpers import (build_engine, const_fleet, make_dataset, run_steps,
                     tiny_config)

# Constants of the hand figures: J/FLOP, J/byte up and down, idle W.
ENERGY = dict(j_per_flop=1e-3, j_per_byte_up=2e-3, j_per_byte_down=1e-3,
              idle_w=0.5)


def test_task_energy_by_hand():
  # 600 FLOPs, 1,000 bytes down, 500 up, nominal 2 s.
  f = const_fleet(1, **ENERGY)
  one = lambda duration, ok, deadline=10.0: float(engine.task_energy(
      f, jnp.zeros(1, jnp.int32), jnp.asarray([600.0]),
      jnp.asarray([1000.0]), jnp.asarray([500.0]), jnp.asarray([2.0]),
      jnp.asarray([duration]), jnp.asarray([ok]), jnp.asarray(deadline))[0])
  # Arrived on time: 0.6 + 1.0 + 1.0 J.
  assert one(2.0, True) == pytest.approx(2.6, rel=1e-6)
  # Jitter made it 3 s: 1 s of waiting at 0.5 W. Faster than nominal: none.
  assert one(3.0, True) == pytest.approx(3.1, rel=1e-6)
  assert one(1.5, True) == pytest.approx(2.6, rel=1e-6)
  # Abandoned within the deadline: all the work, no upload.
  assert one(3.0, False) == pytest.approx(2.1, rel=1e-6)
  # Timed out: 8 s of work, dropped at 4 s: half of 0.6 + 1.0 + 3.0 J.
  assert one(8.0, False, deadline=4.0) == pytest.approx(2.3, rel=1e-6)


def _two_devices(config, **energy):
  """Two clients of 6 features (the tiny MLP: 180 params, 720 bytes), 100
  FLOPs an example; client 1 computes at half the speed of client 0."""
  apply, params = _mlp()
  _, _, data = make_dataset(num_clients=2, per_client=4)
  plan = masks.full_plan(params, 2, flops_per_example=[100.0])
  assert float(plan.model_bytes) == 720.0
  fleet = const_fleet(2, speed=[1e3, 5e2], **energy).replace(
      bw_up=jnp.full(2, 720.0, jnp.float32),
      bw_down=jnp.full(2, 1440.0, jnp.float32))
  return build_engine(config, apply, params, data, fleet, plan)


def _mlp():
  from helpers import tiny_model  # pylint: disable=g-import-not-at-top
  return tiny_model()


def test_fedavg_charges_each_task_and_the_straggler_wait():
  # 3 steps x 2 examples x 100 FLOPs: 0.6 s on client 0, 1.2 s on client 1;
  # 720 bytes down in 0.5 s and up in 1 s. Nominal 2.1 s and 2.7 s: the
  # round ends at 2.7 s and client 0 waits 0.6 s.
  config = algorithms.preset("fedavg", buffer_size=2, local_steps=3,
                             batch_size=2, deadline_s=100.0)
  sim, env, state = _two_devices(config, **ENERGY)
  state = run_steps(sim, env, state, 1)
  assert float(state.clock) == pytest.approx(2.7, rel=1e-6)
  # Each: 0.6 J compute + 0.72 J down + 1.44 J up = 2.76 J; client 0 adds
  # 0.5 W x 0.6 s = 0.3 J of waiting.
  np.testing.assert_allclose(state.client_energy, [3.06, 2.76], rtol=1e-5)
  assert exact.value(state.counters.energy_j) == pytest.approx(5.82, rel=1e-5)
  # The tasks started at 2.7 s are not charged until they arrive.
  state = run_steps(sim, env, state, 1)
  np.testing.assert_allclose(state.client_energy, [6.12, 5.52], rtol=1e-5)


def test_arrival_refill_charges_no_wait():
  # FedBuff, K = 1: client 0 arrives at 2.1 s and is charged 2.76 J, with
  # no wait (its slot restarts at once).
  config = algorithms.preset("fedbuff", concurrency=2, buffer_size=1,
                             local_steps=3, batch_size=2, deadline_s=100.0)
  sim, env, state = _two_devices(config, **ENERGY)
  state = run_steps(sim, env, state, 1)
  assert float(state.clock) == pytest.approx(2.1, rel=1e-6)
  np.testing.assert_allclose(state.client_energy, [2.76, 0.0], rtol=1e-5)


def test_energy_moves_no_draw_and_no_param(tiny_model):
  apply, params = tiny_model
  _, _, data = make_dataset(num_clients=8, per_client=12, equal=False)
  out = {}
  for name, energy in (("none", {}), ("some", ENERGY)):
    config = algorithms.preset("fedbuff", concurrency=4, buffer_size=2,
                               local_steps=2, batch_size=4)
    fleet = const_fleet(8, sigma=0.3, dropout=0.2, **energy)
    out[name] = run_steps(*build_engine(config, apply, params, data, fleet),
                          6)
  chex.assert_trees_all_equal(out["some"].params, out["none"].params)
  chex.assert_trees_all_equal(out["some"].tasks.arrival,
                              out["none"].tasks.arrival)
  assert float(out["none"].counters.energy_j[0]) == 0.0
  assert float(out["some"].counters.energy_j[0]) > 0.0


TRACE = ("speed_flops,bw_up,bw_down,memory_bytes,dropout,j_per_flop,"
         "idle_w,battery_j\n"
         "1e8,1e5,1e6,256000,0.1,1e-9,0.01,500\n"
         "1e9,1e6,1e7,4000000,0.0,1e-10,0.2,{bad}\n")


def test_trace_energy_columns_and_per_tier_defaults(tmp_path):
  path = tmp_path / "devices.csv"
  path.write_text(TRACE.format(bad="2e4"))
  cfg = fleet_lib.FleetConfig(trace_path=str(path),
                              energy_j_per_byte_up=(3e-6, 4e-6))
  f = fleet_lib.make_fleet(cfg, 2, 0)
  np.testing.assert_allclose(f.j_per_flop, [1e-9, 1e-10])
  np.testing.assert_allclose(f.idle_w, [0.01, 0.2])
  np.testing.assert_allclose(f.battery_j, [500.0, 2e4])
  # Absent columns: the config's value of each device's tier (by memory).
  np.testing.assert_allclose(f.j_per_byte_up, [3e-6, 4e-6])
  np.testing.assert_allclose(f.j_per_byte_down, [fleet_lib.J_PER_BYTE_WIFI] * 2)
  assert float(f.recharge_w) == 0.0


@pytest.mark.parametrize("bad, message", [
    ("-1", "devices.csv: line 3: battery_j must be > 0"),
    ("x", "devices.csv: line 3: battery_j 'x' is not a number"),
])
def test_trace_refuses_a_bad_energy_value(tmp_path, bad, message):
  path = tmp_path / "devices.csv"
  path.write_text(TRACE.format(bad=bad))
  with pytest.raises(ValueError, match=message):
    fleet_lib.read_trace(str(path))
  path.write_text(TRACE.format(bad="1").replace(",0.2,", ",-0.2,"))
  with pytest.raises(ValueError, match="line 3: idle_w must be >= 0"):
    fleet_lib.read_trace(str(path))


def test_per_tier_energy_options():
  cfg = fleet_lib.FleetConfig(memory_tiers=(1e5, 1e6), tier_probs=(0.5, 0.5),
                              energy_j_per_flop=(1e-9, 1e-10),
                              battery_mean_j=100.0, battery_sigma=0.5)
  f = fleet_lib.make_fleet(cfg, 400, 0)
  tier = np.asarray(f.tier)
  np.testing.assert_allclose(f.j_per_flop, np.where(tier, 1e-10, 1e-9))
  # Lognormal capacities with mean 100 J.
  assert 90 < float(np.mean(f.battery_j)) < 110
  # The battery draw moves no other draw.
  g = fleet_lib.make_fleet(fleet_lib.FleetConfig(
      memory_tiers=(1e5, 1e6), tier_probs=(0.5, 0.5)), 400, 0)
  np.testing.assert_array_equal(g.tier, f.tier)
  assert g.battery_j is None
  with pytest.raises(ValueError, match="^energy_j_per_flop must have one"):
    fleet_lib.make_fleet(fleet_lib.FleetConfig(
        energy_j_per_flop=(1e-9, 1e-10, 1e-11), memory_tiers=(1.0, 2.0)),
                         4, 0)
  with pytest.raises(ValueError, match="^energy_idle_w"):
    fleet_lib.make_fleet(fleet_lib.FleetConfig(energy_idle_w=(-1.0,)), 4, 0)
  with pytest.raises(ValueError, match="^battery_recharge_j_per_h needs"):
    fleet_lib.make_fleet(fleet_lib.FleetConfig(
        battery_recharge_j_per_h=5.0), 4, 0)


def _battery_engine(config, battery, n=4, recharge=0.0):
  apply, params = _mlp()
  _, _, data = make_dataset(num_clients=n, per_client=4)
  plan = masks.full_plan(params, n, flops_per_example=[100.0])
  # 1 J per FLOP: a task of 3 x 2 x 100 FLOPs costs 600 J (links free).
  fleet = const_fleet(n, speed=1e3, j_per_flop=1.0).replace(
      battery_j=jnp.asarray(battery, jnp.float32),
      recharge_w=jnp.asarray(recharge, jnp.float32))
  return build_engine(config, apply, params, data, fleet, plan)


def test_a_flat_battery_removes_its_device_and_the_server_steps_on():
  # Device 2 holds 100 J: its first task (600 J) empties it.
  config = algorithms.preset("fedbuff", concurrency=2, buffer_size=1,
                             local_steps=3, batch_size=2, deadline_s=100.0)
  sim, env, state = _battery_engine(config, [1e9, 1e9, 100.0, 1e9])
  step = jax.jit(sim.step)
  seen_after = []
  for _ in range(12):
    before = np.isfinite(np.asarray(state.client_depleted_at))
    state, _ = step(env, state)
    if before[2]:
      seen_after.append(np.asarray(state.tasks.client).tolist())
  depleted = np.asarray(state.client_depleted_at)
  assert np.isfinite(depleted[2]) and np.isinf(depleted[[0, 1, 3]]).all()
  assert float(state.client_energy[2]) == pytest.approx(600.0)
  # Charged when its task arrived, 0.6 s after a dispatch; never again.
  assert depleted[2] == pytest.approx(round(depleted[2] / 0.6) * 0.6,
                                      rel=1e-5)
  assert seen_after and all(2 not in c for c in seen_after)
  assert int(state.version) == 12 and int(state.counters.updates_applied) == 12


def test_recharge_keeps_a_battery_alive():
  # 500 J plus 2e6 J/s of recharge: after 0.6 s it has 1.2e6 J in hand.
  config = algorithms.preset("fedbuff", concurrency=2, buffer_size=1,
                             local_steps=3, batch_size=2, deadline_s=100.0)
  sim, env, state = _battery_engine(config, [500.0] * 4, recharge=2e6)
  state = run_steps(sim, env, state, 4)
  assert np.isinf(np.asarray(state.client_depleted_at)).all()


def test_fedavg_waits_only_for_live_devices_then_stops():
  # C = K = 2 over 3 devices: tasks cost 600 J, and a device leaves after
  # the task that passes its capacity: after 1, 1 and 2 tasks.
  config = algorithms.preset("fedavg", buffer_size=2, local_steps=3,
                             batch_size=2, deadline_s=100.0)
  sim, env, state = _battery_engine(config, [500.0, 500.0, 700.0], n=3)
  step = jax.jit(sim.step)
  clocks = []
  while bool(state.in_flight) and len(clocks) < 10:
    state, _ = step(env, state)
    clocks.append(float(state.clock))
  # 4 tasks of 0.6 s, two at a time while two devices are live, then one
  # (the step waits only for it); then nothing is in flight.
  assert not bool(state.in_flight)
  assert np.isfinite(np.asarray(state.client_depleted_at)).all()
  assert int(state.counters.uploads) == 4
  assert int(state.counters.updates_dropped) == 0
  np.testing.assert_allclose(np.diff([0.0] + clocks), 0.6, rtol=1e-5)
  # The chunked loop stops there too, instead of stepping on nothing.
  _, taken, _ = jax.jit(sim.steps)(env, state, 5)
  assert int(taken) == 0


def test_run_reports_energy_and_stops_when_the_fleet_is_flat():
  config = tiny_config("fedbuff", rounds=200, eval_every=50,
                       target_accuracy=0.01,
                       fleet=fleet_lib.FleetConfig(battery_mean_j=0.2))
  exp = experiment.build(config)
  state, history, timing = exp.run()
  out = exp.summary(state, history, timing)
  assert out["stopped_by"] == "fleet_depleted"
  # Every device that may train (full masks leave out the 0.6 tier) left.
  assert out["devices_depleted"] == out["eligible_clients"] == len(
      out["depletion_times_s"])
  assert out["energy_j"] == pytest.approx(sum(out["tier_energy_j"]),
                                          rel=1e-5)
  # The target (1% accuracy) is met at the first row, before any energy.
  assert out["energy_to_target_j"] == 0.0
  assert history[-1]["energy_j"] == pytest.approx(out["energy_j"])
  assert history[-1]["devices_depleted"] == out["devices_depleted"]
