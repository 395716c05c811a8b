"""Energy constants and battery capacities of a fleet: per tier, per
device from a trace, and refused when bad (docs/design.md, "Energy and
batteries")."""

import numpy as np
import pytest

from ftte_jax.core import fleet as fleet_lib


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
