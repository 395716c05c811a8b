"""Student-t intervals over seeds (ftte_jax.experiment.stats)."""

import math

import numpy as np
import pytest

from ftte_jax.experiment import stats

# Two-sided 95% critical values t_{0.975, df} from a printed t table (e.g.
# NIST/SEMATECH e-Handbook, table 1.3.6.7.2), to the table's 3 decimals.
TABLE = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 9: 2.262,
         10: 2.228, 29: 2.045, 100: 1.984}


@pytest.mark.parametrize("df,want", sorted(TABLE.items()))
def test_t_quantile_matches_the_printed_table(df, want):
  assert stats.t_quantile(0.975, df) == pytest.approx(want, abs=6e-4)


def test_t_quantile_limits_and_symmetry():
  # df = 1 is the Cauchy distribution: quantile tan(pi (p - 1/2)).
  for p in (0.6, 0.9, 0.975, 0.999):
    assert stats.t_quantile(p, 1) == pytest.approx(
        math.tan(math.pi * (p - 0.5)), rel=1e-9)
  # df = 2 has a closed form: t = (2p - 1) sqrt(2 / (4 p (1 - p))).
  for p in (0.7, 0.95, 0.975):
    want = (2 * p - 1) * math.sqrt(2 / (4 * p * (1 - p)))
    assert stats.t_quantile(p, 2) == pytest.approx(want, rel=1e-9)
  assert stats.t_quantile(0.975, math.inf) == pytest.approx(1.959963985,
                                                            abs=1e-8)
  assert stats.t_quantile(0.025, 4) == -stats.t_quantile(0.975, 4)
  assert stats.t_quantile(0.5, 7) == 0.0
  # The CDF inverts the quantile.
  assert stats.t_cdf(stats.t_quantile(0.9, 3.5), 3.5) == pytest.approx(0.9)


def test_mean_ci_hand_computed():
  # 1..5: mean 3, s = sqrt(10 / 4) = 1.58114, se = s / sqrt(5) = 0.70711,
  # t_{0.975,4} = 2.776445, half width 1.963243.
  ci = stats.mean_ci([1, 2, 3, 4, 5])
  assert ci["n"] == 5 and ci["mean"] == 3.0
  assert ci["sd"] == pytest.approx(1.5811388, rel=1e-7)
  assert ci["half_width"] == pytest.approx(1.963243, rel=1e-6)
  assert (ci["low"], ci["high"]) == pytest.approx((1.036757, 4.963243),
                                                  rel=1e-6)
  # Two values 0.90, 0.94: mean 0.92, s = 0.028284, se = 0.02,
  # t_{0.975,1} = 12.7062 -> half width 0.254124.
  ci = stats.mean_ci([0.90, 0.94])
  assert ci["half_width"] == pytest.approx(0.254124, rel=1e-5)
  # A 90% interval is narrower: t_{0.95,4} = 2.131847.
  assert stats.mean_ci([1, 2, 3, 4, 5], 0.90)["half_width"] == pytest.approx(
      2.131847 * 1.5811388 / math.sqrt(5), rel=1e-6)


def test_mean_ci_covers_at_its_level():
  # Coverage of the true mean over many normal samples of 5 is ~95%.
  rng = np.random.default_rng(0)
  hits = 0
  for _ in range(2000):
    ci = stats.mean_ci(rng.normal(1.0, 2.0, 5))
    hits += ci["low"] <= 1.0 <= ci["high"]
  assert 0.935 < hits / 2000 < 0.965


def test_mean_ci_edge_cases():
  assert stats.mean_ci([]) == {"n": 0, "mean": None, "sd": None,
                               "half_width": None, "low": None, "high": None}
  one = stats.mean_ci([0.7])
  assert one["mean"] == 0.7 and one["half_width"] is None
  assert stats.mean_ci([2.0, 2.0, 2.0])["half_width"] == 0.0
  with pytest.raises(ValueError, match="finite"):
    stats.mean_ci([1.0, float("nan")])
  with pytest.raises(ValueError, match="level"):
    stats.mean_ci([1.0, 2.0], level=1.0)


def test_censored_reports_how_many_reached_and_a_lower_bound():
  out = stats.censored([10.0, None, 14.0], ends=[50.0, 40.0, 60.0])
  assert (out["seeds"], out["reached"], out["all_reached"]) == (3, 2, False)
  # The interval is over the two that reached only ...
  assert out["mean"] == 12.0 and out["n"] == 2
  # ... and the lower bound counts the unreached seed at its end, 40 s.
  assert out["lower_bound_mean"] == pytest.approx(64.0 / 3)
  assert "(2/3 reached)" in stats.fmt(out)
  full = stats.censored([1.0, 2.0, 3.0], ends=[9.0, 9.0, 9.0])
  assert full["all_reached"] and full["lower_bound_mean"] == 2.0
  assert stats.fmt(full) == "2 ± 2.5"
  assert stats.censored([None, None], [5.0, 6.0])["mean"] is None
  with pytest.raises(ValueError, match="one entry per seed"):
    stats.censored([1.0], [])
