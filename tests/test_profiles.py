"""Device-class fleet profiles: marginals, correlations, exact counts."""

import math

import numpy as np
import pytest

from ftte_jax.core import fleet
from ftte_jax.core import profiles

MIX = "mcu:0.6,phone_low:0.2,phone_high:0.2"


def _spearman(a, b):
  ra = np.argsort(np.argsort(a))
  rb = np.argsort(np.argsort(b))
  return float(np.corrcoef(ra, rb)[0, 1])


def test_parse_mix():
  assert profiles.parse_mix("independent") is None
  assert profiles.parse_mix("phone_low") == (("phone_low", 1.0),)
  # Weakest first, whatever the order given.
  assert profiles.parse_mix("phone_high:0.25, mcu:0.75") == (
      ("mcu", 0.75), ("phone_high", 0.25))
  for bad, msg in [("toaster:1", "unknown class 'toaster'"),
                   ("mcu:0.5,mcu:0.5", "given twice"),
                   ("mcu:0.5,phone_low:0.4", "sum to 0.9"),
                   ("mcu:x", "'x' is not a probability"),
                   ("mcu:0,phone_low:1", "must be in \\(0, 1\\]"),
                   ("", "must be a string")]:
    with pytest.raises(ValueError, match=f"^fleet_profile.*{msg}"):
      profiles.parse_mix(bad)


def test_exact_class_counts_and_tiers_weakest_first():
  assert profiles.class_counts([0.6, 0.2, 0.2], 500).tolist() == [300, 100,
                                                                   100]
  # Largest remainder: 7 * (0.5, 0.3, 0.2) = 3.5, 2.1, 1.4 -> 4, 2, 1.
  assert profiles.class_counts([0.5, 0.3, 0.2], 7).tolist() == [4, 2, 1]
  cfg = fleet.FleetConfig(fleet_profile=MIX)
  f = fleet.make_fleet(cfg, 500, seed=3)
  tier = np.asarray(f.tier)
  assert np.bincount(tier).tolist() == [300, 100, 100]
  # The classes are known before the fleet (for the data partition).
  np.testing.assert_array_equal(fleet.device_classes(cfg, 500, 3), tier)
  g = fleet.make_fleet(cfg, 500, seed=3)
  np.testing.assert_array_equal(np.asarray(g.speed), np.asarray(f.speed))
  h = fleet.make_fleet(cfg, 500, seed=4)
  assert not np.array_equal(np.asarray(h.tier), tier)


def test_independent_classes_are_the_drawn_tiers():
  cfg = fleet.FleetConfig(memory_tiers=(1e5, 1e6, 2e6), speed_sigma=0.3,
                          straggler_fraction=0.5)
  np.testing.assert_array_equal(fleet.device_classes(cfg, 300, 7),
                                np.asarray(fleet.make_fleet(cfg, 300, 7).tier))


def test_marginals_are_the_class_ranges_log_uniform():
  n = 4000
  f = fleet.make_fleet(fleet.FleetConfig(
      fleet_profile="mcu:0.5,wearable:0.5", class_correlation=0.8), n, 0)
  tier = np.asarray(f.tier)
  for t, name in enumerate(("mcu", "wearable")):
    c = profiles.BY_NAME[name]
    link = next(iter(c.links.values()))
    on = tier == t
    for values, (lo, hi) in [(f.speed, c.speed_flops),
                             (f.memory, c.memory_bytes),
                             (f.bw_up, link.up), (f.bw_down, link.down)]:
      v = np.asarray(values, np.float64)[on]
      assert lo * (1 - 1e-6) <= v.min() and v.max() <= hi * (1 + 1e-6)
      # Log-uniform: the position in log space is uniform on [0, 1].
      pos = np.log(v / lo) / math.log(hi / lo)
      assert abs(pos.mean() - 0.5) < 0.03
      assert np.quantile(pos, [0.25, 0.75]) == pytest.approx([0.25, 0.75],
                                                            abs=0.04)
    np.testing.assert_allclose(np.asarray(f.j_per_flop)[on], c.j_per_flop,
                               rtol=1e-6)
    np.testing.assert_allclose(np.asarray(f.j_per_byte_up)[on],
                               link.j_per_byte, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(f.idle_w)[on], c.idle_w, rtol=1e-6)


@pytest.mark.parametrize("rho", [0.0, 0.5, 1.0])
def test_within_class_correlation_is_the_copula_s(rho):
  f = fleet.make_fleet(fleet.FleetConfig(fleet_profile="phone_low",
                                         class_correlation=rho), 4000, 1)
  speed, mem, up = (np.asarray(x) for x in (f.speed, f.memory, f.bw_up))
  # Spearman's rho of a Gaussian copula: (6 / pi) asin(rho / 2).
  want = 6 / math.pi * math.asin(rho / 2)
  for a, b in [(speed, mem), (speed, up), (mem, up)]:
    assert _spearman(a, b) == pytest.approx(want, abs=0.04 if rho < 1 else
                                            1e-9)


def test_weak_devices_are_weak_in_every_resource():
  f = fleet.make_fleet(fleet.FleetConfig(
      fleet_profile="mcu:0.25,wearable:0.25,phone_low:0.25,phone_high:0.25",
      class_correlation=0.0), 2000, 2)
  speed, mem, up = (np.asarray(x) for x in (f.speed, f.memory, f.bw_up))
  tier = np.asarray(f.tier)
  # Even with no within-class correlation the fleet's resources are
  # strongly correlated: the class ranges are ordered.
  assert _spearman(speed, mem) > 0.75 and _spearman(speed, up) > 0.6
  medians = [np.median(speed[tier == t]) for t in range(4)]
  assert medians == sorted(medians)
  # A microcontroller cannot hold the MLP's full training (1.87 MB), every
  # other class can.
  assert mem[tier == 0].max() < 1.87e6 < mem[tier > 0].min()
  assert np.asarray(f.j_per_flop)[tier == 0].min() > np.asarray(
      f.j_per_flop)[tier > 0].max()


def test_phone_link_and_stragglers():
  base = fleet.FleetConfig(fleet_profile="mcu:0.5,phone_high:0.5")
  wifi = fleet.make_fleet(base, 400, 5)
  lte = fleet.make_fleet(fleet.FleetConfig(
      fleet_profile="mcu:0.5,phone_high:0.5", phone_link="lte"), 400, 5)
  tier = np.asarray(wifi.tier)
  # The microcontrollers keep BLE; the phones move to LTE's range.
  np.testing.assert_array_equal(np.asarray(wifi.bw_up)[tier == 0],
                                np.asarray(lte.bw_up)[tier == 0])
  up = np.asarray(lte.bw_up)[tier == 1]
  assert 0.35e6 * 0.999 <= up.min() and up.max() <= 1.0e6 * 1.001
  np.testing.assert_allclose(np.asarray(lte.j_per_byte_up)[tier == 1],
                             2.5e-5, rtol=1e-6)
  slow = fleet.make_fleet(fleet.FleetConfig(
      fleet_profile="mcu:0.5,phone_high:0.5", straggler_fraction=0.9,
      straggler_slowdown=10), 400, 5)
  ratio = np.asarray(wifi.speed, np.float64) / np.asarray(slow.speed)
  assert np.isclose(ratio, 10, rtol=1e-5).sum() == 360
  assert np.isclose(ratio, 1, rtol=1e-6).sum() == 40
  # Only the speed moves.
  np.testing.assert_array_equal(np.asarray(slow.memory),
                                np.asarray(wifi.memory))


def test_bad_profile_options(tmp_path):
  with pytest.raises(ValueError, match="^fleet_profile: unknown class"):
    fleet.make_fleet(fleet.FleetConfig(fleet_profile="laptop"), 10, 0)
  trace = tmp_path / "t.csv"
  trace.write_text("speed_flops,bw_up,bw_down,memory_bytes,dropout\n"
                   "1,1,1,1,0\n")
  with pytest.raises(ValueError, match="^fleet_profile and trace_path"):
    fleet.make_fleet(fleet.FleetConfig(fleet_profile="mcu",
                                       trace_path=str(trace)), 1, 0)
  with pytest.raises(ValueError, match="^phone_link"):
    fleet.make_fleet(fleet.FleetConfig(fleet_profile="mcu",
                                       phone_link="5g"), 10, 0)
  with pytest.raises(ValueError, match="^class_correlation"):
    fleet.make_fleet(fleet.FleetConfig(fleet_profile="mcu",
                                       class_correlation=1.5), 10, 0)


def test_every_figure_names_a_source():
  for row in profiles.table():
    assert row["sources"] and all(row["sources"])
  for c in profiles.CLASSES:
    assert c.speed_flops[0] < c.speed_flops[1]
    assert c.memory_bytes[0] < c.memory_bytes[1]
    assert all(s in profiles.SOURCES for s in c.sources)
