"""Fleet profiles: named distributions, traces, and validation."""

import numpy as np
import pytest

from ftte_jax.core import fleet


def test_stragglers_and_tiers_are_drawn_as_asked():
  cfg = fleet.FleetConfig(speed_flops=1e9,
                          straggler_fraction=0.9, straggler_slowdown=10,
                          memory_tiers=(1e5, 1e6), tier_probs=(0.25, 0.75))
  f = fleet.make_fleet(cfg, num_clients=200, seed=0)
  speed = np.asarray(f.speed)
  assert (np.isclose(speed, 1e8)).sum() == 180
  assert (np.isclose(speed, 1e9)).sum() == 20
  tier = np.asarray(f.tier)
  np.testing.assert_array_equal(np.asarray(f.memory), np.where(tier, 1e6, 1e5))
  assert 30 < (tier == 0).sum() < 70
  g = fleet.make_fleet(cfg, num_clients=200, seed=0)
  np.testing.assert_array_equal(np.asarray(g.speed), speed)


def test_trace_roundtrip_and_tiers_from_memory(tmp_path):
  path = tmp_path / "devices.csv"
  path.write_text("device_id,speed_flops,bw_up,bw_down,memory_bytes,dropout\n"
                  "watch,1e8,1e5,1e6,256000,0.1\n"
                  "phone,1e9,1e6,1e7,4000000,0.0\n"
                  "sensor,5e7,5e4,5e5,256000,0.2\n")
  f = fleet.make_fleet(fleet.FleetConfig(trace_path=str(path)), 3, 0)
  np.testing.assert_allclose(np.asarray(f.speed), [1e8, 1e9, 5e7])
  np.testing.assert_array_equal(np.asarray(f.tier), [0, 1, 0])
  np.testing.assert_allclose(np.asarray(f.dropout), [0.1, 0.0, 0.2])


@pytest.mark.parametrize("body, message", [
    ("speed_flops,bw_up,bw_down,memory_bytes\n1,1,1,1\n", "missing column"),
    ("speed_flops,bw_up,bw_down,memory_bytes,dropout\n0,1,1,1,0\n",
     "line 2: speed_flops must be > 0"),
    ("speed_flops,bw_up,bw_down,memory_bytes,dropout\n1,1,1,1,1.5\n",
     "dropout must be in"),
    ("speed_flops,bw_up,bw_down,memory_bytes,dropout\n1,x,1,1,0\n",
     "line 2: bw_up 'x' is not a number"),
])
def test_bad_trace_files(tmp_path, body, message):
  path = tmp_path / "bad.csv"
  path.write_text(body)
  with pytest.raises(ValueError, match=message):
    fleet.read_trace(str(path))


@pytest.mark.parametrize("kwargs, option", [
    (dict(straggler_fraction=1.5), "straggler_fraction"),
    (dict(dropout=-0.1), "dropout"),
    (dict(speed_flops=0.0), "speed_flops"),
    (dict(bw_up=-5.0), "bw_up"),
    (dict(bw_down=float("inf")), "bw_down"),
    (dict(straggler_slowdown=0.5), "straggler_slowdown"),
    (dict(memory_tiers=(2e6, 1e6)), "memory_tiers"),
    (dict(memory_tiers=(1e6, 2e6), tier_probs=(0.5,)), "tier_probs"),
    (dict(speed_sigma=float("nan")), "speed_sigma"),
    (dict(dropout=float("nan")), "dropout"),
    (dict(memory_tiers=()), "memory_tiers"),
    (dict(tier_probs=(0.5, 0.7)), "tier_probs"),
    (dict(trace_path="/nonexistent.csv"), "trace_path"),
])
def test_bad_fleet_options(kwargs, option):
  with pytest.raises(ValueError, match=f"^{option}"):
    fleet.make_fleet(fleet.FleetConfig(**kwargs), 10, 0)


@pytest.mark.parametrize("num_clients", [0, -3, 2.5, True])
def test_bad_num_clients(num_clients):
  with pytest.raises(ValueError, match="^num_clients must be an integer >= 1"):
    fleet.make_fleet(fleet.FleetConfig(), num_clients, 0)


def test_trace_must_match_num_clients(tmp_path):
  path = tmp_path / "devices.csv"
  path.write_text("speed_flops,bw_up,bw_down,memory_bytes,dropout\n"
                  "1e8,1e5,1e6,256000,0.1\n")
  with pytest.raises(ValueError, match="has 1 devices but num_clients is 2"):
    fleet.make_fleet(fleet.FleetConfig(trace_path=str(path)), 2, 0)
