"""Malicious devices, clipping, robust means and client-level DP.

Hand-computed cases, an independent per-coordinate numpy reference for the
robust means (with masks, tiers, weights and every normalization), and
end-to-end runs under each attack.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ftte_jax import experiment
from ftte_jax.core import adversary
from ftte_jax.core import aggregation
from ftte_jax.core import algorithms
from ftte_jax.core import fleet as fleet_lib
from ftte_jax.core import privacy
from ftte_jax.core import robust
from helpers import tiny_config


def test_fixed_clip_scales_long_updates_to_the_bound():
  d = {"w": jnp.asarray([[3.0, 4.0], [0.3, 0.4], [0.0, 0.0]])}
  out, clipped = robust.clip_updates(d, jnp.asarray([True, True, False]),
                                     "fixed", 1.0)
  np.testing.assert_allclose(out["w"], [[0.6, 0.8], [0.3, 0.4], [0, 0]],
                             rtol=1e-6)
  np.testing.assert_array_equal(clipped, [True, False, False])


def test_median_clip_uses_the_valid_updates_median_norm():
  # Norms 1, 2, 10 (valid) and 100 (invalid, ignored): median 2.
  d = {"a": jnp.asarray([[1.0], [2.0], [6.0], [100.0]]),
       "b": jnp.asarray([[0.0], [0.0], [8.0], [0.0]])}
  valid = jnp.asarray([True, True, True, False])
  out, clipped = robust.clip_updates(d, valid, "median", 0.0)
  # Every row is cut to the bound (an invalid one weighs 0 anyway); only
  # valid ones are counted.
  np.testing.assert_allclose(out["a"][:, 0], [1.0, 2.0, 1.2, 2.0], rtol=1e-6)
  np.testing.assert_allclose(out["b"][:, 0], [0.0, 0.0, 1.6, 0.0], rtol=1e-6)
  np.testing.assert_array_equal(clipped, [False, False, True, False])


def test_clip_of_an_update_whose_squares_overflow_stays_finite():
  d = {"w": jnp.asarray([[3e30, 4e30], [0.3, 0.4]])}
  assert np.isinf(jnp.sqrt(jnp.sum(d["w"][0] ** 2)))  # naive: overflow.
  np.testing.assert_allclose(robust.update_norms(d), [5e30, 0.5], rtol=1e-6)
  out, _ = robust.clip_updates(d, jnp.asarray([True, True]), "fixed", 1.0)
  np.testing.assert_allclose(out["w"], [[0.6, 0.8], [0.3, 0.4]], rtol=1e-6)


def test_trimmed_mean_and_median_by_hand():
  # One coordinate, five clients: trim 0.2 drops -1 and 100.
  d = {"w": jnp.asarray([[5.0], [-1.0], [2.0], [100.0], [0.0]])}
  m = {"w": jnp.ones((1, 1))}
  tier = jnp.zeros(5, jnp.int32)
  ones = jnp.ones(5)
  valid = ones > 0
  keep, trimmed, values = robust.keep_mask(d, m, tier, valid, "trimmed_mean",
                                           0.2)
  np.testing.assert_array_equal(keep["w"][:, 0], [1, 0, 1, 0, 1])
  assert (float(trimmed), float(values)) == (2.0, 5.0)
  agg = aggregation.aggregate(d, m, tier, ones, "coordinate", keep=keep)
  np.testing.assert_allclose(agg["w"], [7.0 / 3.0], rtol=1e-6)
  keep, _, _ = robust.keep_mask(d, m, tier, valid, "median")
  assert float(aggregation.aggregate(d, m, tier, ones, keep=keep)["w"][0]) == 2
  # Even count (the 100 invalid): the mean of the middle two, 0 and 2.
  valid4 = jnp.asarray([True, True, True, False, True])
  keep, _, _ = robust.keep_mask(d, m, tier, valid4, "median")
  agg = aggregation.aggregate(d, m, tier, valid4.astype(jnp.float32),
                              keep=keep)
  assert float(agg["w"][0]) == 1.0


def _reference(d, m, tier, w, base, mode, beta, normalization):
  """Per coordinate: sort the participants, trim, normalize what is kept."""
  k, p = d.shape
  out = np.zeros(p)
  for c in range(p):
    part = [i for i in range(k) if w[i] > 0 and m[tier[i], c] > 0]
    order = sorted(part, key=lambda i: (d[i, c], i))
    n = len(order)
    t = (max(n - 1, 0) // 2) if mode == "median" else int(np.floor(beta * n))
    kept = order[t:n - t]
    den = {"coordinate": w, "damped": base,
           "buffer": (w > 0).astype(float)}[normalization]
    num = sum(w[i] * d[i, c] for i in kept)
    out[c] = num / max(sum(den[i] for i in kept), 1e-12)
  return out


@pytest.mark.parametrize("mode,beta", [("trimmed_mean", 0.1),
                                       ("trimmed_mean", 0.3), ("median", 0)])
@pytest.mark.parametrize("normalization", aggregation.NORMALIZATIONS)
def test_robust_means_match_a_per_coordinate_reference(mode, beta,
                                                       normalization):
  rng = np.random.default_rng(0)
  k, p, t = 9, 12, 3
  d = rng.normal(size=(k, p)).astype(np.float32)
  m = (rng.random((t, p)) < 0.6).astype(np.float32)
  tier = rng.integers(0, t, k).astype(np.int32)
  d = d * m[tier]
  base = rng.uniform(0.5, 2.0, k).astype(np.float32)
  base[[2, 5]] = 0.0  # two invalid updates
  w = (base * rng.uniform(0.2, 1.0, k)).astype(np.float32)
  keep, trimmed, values = robust.keep_mask(
      {"x": jnp.asarray(d)}, {"x": jnp.asarray(m)}, jnp.asarray(tier),
      jnp.asarray(w > 0), mode, beta)
  agg = aggregation.aggregate({"x": jnp.asarray(d)}, {"x": jnp.asarray(m)},
                              jnp.asarray(tier), jnp.asarray(w),
                              normalization, base_weights=jnp.asarray(base),
                              keep=keep)
  np.testing.assert_allclose(
      agg["x"], _reference(d, m, tier, w, base, mode, beta, normalization),
      rtol=1e-5, atol=1e-6)
  n_part = sum(m[tier[i]].sum() for i in range(k) if w[i] > 0)
  assert float(values) == n_part
  assert float(trimmed) == n_part - float(np.asarray(keep["x"]).sum())


def test_trim_fraction_zero_is_the_weighted_mean():
  rng = np.random.default_rng(1)
  d = {"x": jnp.asarray(rng.normal(size=(6, 5)), jnp.float32)}
  m = {"x": jnp.ones((1, 5))}
  tier, w = jnp.zeros(6, jnp.int32), jnp.asarray(rng.uniform(0.1, 1, 6))
  keep, trimmed, _ = robust.keep_mask(d, m, tier, w > 0, "trimmed_mean", 0.0)
  assert float(trimmed) == 0
  for norm in aggregation.NORMALIZATIONS:
    np.testing.assert_allclose(
        aggregation.aggregate(d, m, tier, w, norm, base_weights=w,
                              keep=keep)["x"],
        aggregation.aggregate(d, m, tier, w, norm, base_weights=w)["x"],
        rtol=1e-5)


# ---------------------------------------------------------------------------
# Attacks.

DELTA = {"w": jnp.asarray([1.0, -2.0, 0.0])}
MASK = {"w": jnp.asarray([1.0, 1.0, 0.0])}


@pytest.mark.parametrize("behavior,expected", [
    ("sign_flip", [-1.0, 2.0, 0.0]), ("scale", [100.0, -200.0, 0.0]),
    ("nan", [np.nan, np.nan, 0.0]), ("stale_replay", [1.0, -2.0, 0.0])])
def test_each_behaviour_by_hand(behavior, expected):
  attack = adversary.Attack(behavior)
  key = jax.random.PRNGKey(0)
  out = adversary.corrupt(attack, DELTA, MASK, key, jnp.asarray(True))
  np.testing.assert_array_equal(out["w"], expected)
  honest = adversary.corrupt(attack, DELTA, MASK, key, jnp.asarray(False))
  np.testing.assert_array_equal(honest["w"], DELTA["w"])


def test_noise_attack_replaces_the_update_on_its_mask_only():
  mask = {"w": (jnp.arange(20000) < 10000).astype(jnp.float32)}
  out = adversary.corrupt(adversary.Attack("noise", noise_std=3.0), mask,
                          mask, jax.random.PRNGKey(0), jnp.asarray(True))
  assert float(jnp.abs(out["w"][10000:]).max()) == 0.0
  assert abs(float(jnp.std(out["w"][:10000])) - 3.0) < 0.1
  assert abs(float(jnp.mean(out["w"][:10000]))) < 0.1


def test_replay_base_is_the_oldest_stored_version():
  assert int(adversary.oldest_slot(jnp.asarray([4, 5, 2, 3]))) == 2
  assert int(adversary.oldest_slot(jnp.asarray([0, 1, -1, -1]))) == 0


def test_attackers_are_a_fixed_share_drawn_apart_from_the_fleet():
  base = fleet_lib.FleetConfig(speed_sigma=0.5)
  cfg = dataclasses.replace(base, malicious_fraction=0.3,
                            malicious_behavior="scale")
  honest, bad = (fleet_lib.make_fleet(c, 50, seed=3) for c in (base, cfg))
  assert honest.malicious is None and honest.attack is None
  assert int(bad.malicious.sum()) == 15 and bad.attack.behavior == "scale"
  np.testing.assert_array_equal(honest.speed, bad.speed)


# ---------------------------------------------------------------------------
# End to end: every behaviour, the model finite, defences counted.


def _run(algorithm, behavior, fraction=0.3, tiers=(0.6, 2.0), **engine_kw):
  config = tiny_config(algorithm, rounds=8, eval_every=4, engine_kw=engine_kw,
                       memory_tier_fractions=tiers)
  config = dataclasses.replace(config, fleet=dataclasses.replace(
      config.fleet, malicious_fraction=fraction, malicious_behavior=behavior))
  exp = experiment.build(config)
  state, history, timing = exp.run()
  return state, exp.summary(state, history, timing)


@pytest.mark.slow
@pytest.mark.parametrize("behavior", adversary.BEHAVIORS)
def test_every_behaviour_leaves_a_finite_model_under_a_robust_mean(behavior):
  # beta = 0.4 trims from 3 participants on (floor(0.4 * 3) = 1): with the
  # NaN attack, a buffer of 5 rarely holds 5 finite updates, so 0.2 (which
  # needs 5) trimmed only when the draws happened to give such a step.
  state, summary = _run("fedbuff", behavior, tiers=(2.0,), buffer_size=5,
                        concurrency=10,
                        clip="median", robust_aggregation="trimmed_mean",
                        trim_fraction=0.4)
  assert all(np.isfinite(np.asarray(x)).all()
             for x in jax.tree.leaves(state.params))
  assert summary["malicious_clients"] == 5
  assert summary["malicious_behavior"] == behavior
  assert summary["values_trimmed"] > 0
  assert summary["values_robust"] >= summary["values_trimmed"]
  if behavior == "nan":
    assert summary["updates_nonfinite"] > 0
    assert summary["malicious_updates_applied"] == 0
  else:
    assert summary["malicious_updates_applied"] > 0
  if behavior == "scale":
    assert summary["updates_clipped"] > 0


@pytest.mark.slow
def test_ftte_with_searched_masks_composes_with_a_median_and_clipping():
  # Tiers and masks at the aggregate: the per-coordinate reference above.
  state, summary = _run("ftte", "sign_flip", clip="fixed", clip_norm=0.01,
                        robust_aggregation="median")
  assert np.asarray(state.plan.upload_bytes).max() < float(
      state.plan.model_bytes)
  assert summary["values_trimmed"] > 0 and summary["updates_clipped"] > 0
  assert all(np.isfinite(np.asarray(x)).all()
             for x in jax.tree.leaves(state.params))


# ---------------------------------------------------------------------------
# Client-level differential privacy.


def test_dp_noise_has_std_z_clip_over_n_on_covered_coordinates():
  """Four clipped updates, buffer mean: noise std z * S / n per coordinate."""
  k, p, z, s = 4, 200_000, 1.5, 0.2
  deltas = {"x": jnp.asarray(np.tile([[3.0], [0.05], [1.0], [0.0]], (1, p)))}
  masks = {"x": jnp.stack([jnp.ones(p), (jnp.arange(p) < p // 2) * 1.0])}
  tier = jnp.asarray([0, 0, 0, 1])
  w = jnp.asarray([1.0, 1.0, 0.5, 0.0])  # the last invalid: tier 1 absent.
  clipped, _ = robust.clip_updates(deltas, w > 0, "fixed", s)
  cover = privacy.coverage(masks, tier, w > 0)
  noise = privacy.gaussian_noise(jax.random.PRNGKey(0), cover,
                                 privacy.noise_std(z, s))
  agg = aggregation.aggregate(clipped, masks, tier, w, "buffer", noise=noise)
  # Per-row norms are sqrt(p) times the entry: only the tiny row survives.
  row = np.asarray([s, 0.05, s, 0.0]) / np.sqrt(p)
  row[1] = min(0.05, s / np.sqrt(p))
  clean = (1.0 * row[0] + 1.0 * row[1] + 0.5 * row[2]) / 3
  resid = np.asarray(agg["x"]) - clean
  assert abs(resid.std() / (z * s / 3) - 1) < 0.01
  assert abs(resid.mean()) < 4 * z * s / 3 / np.sqrt(p)
  np.testing.assert_array_equal(np.asarray(cover["x"]), np.ones(p))


def test_dp_noise_skips_coordinates_no_valid_update_trains():
  masks = {"x": jnp.asarray([[1.0, 1.0, 0.0], [0.0, 1.0, 1.0]])}
  cover = privacy.coverage(masks, jnp.asarray([0, 1]),
                           jnp.asarray([True, False]))
  np.testing.assert_array_equal(cover["x"], [1.0, 1.0, 0.0])


@pytest.mark.parametrize("override,name", [
    (dict(clip="none"), "clip"), (dict(clip="median"), "clip"),
    (dict(data_weight_exponent=1.0), "data_weight_exponent"),
    (dict(robust_aggregation="median"), "robust_aggregation")])
def test_dp_refuses_unbounded_sensitivity(override, name):
  kw = dict(clip="fixed", dp_noise_multiplier=1.0)
  kw.update(override)
  with pytest.raises(ValueError, match=f"needs {name}="):
    algorithms.preset("fedbuff", **kw)
  with pytest.raises(ValueError, match="needs variance_beta="):
    algorithms.preset("ftte", clip="fixed", dp_noise_multiplier=1.0,
                      data_weight_exponent=0.0)


def test_defences_refuse_the_streamed_path():
  with pytest.raises(ValueError, match="stream"):
    algorithms.preset("fedbuff", client_batching="stream", clip="median")


def test_epsilon_against_the_gaussian_rdp_closed_form():
  """Without sampling, T Gaussian mechanisms have RDP T*a/(2 z^2); the
  classical conversion eps = rdp + log(1/delta)/(a-1) bounds the
  accountant's (tighter) answer from above, and for large z both agree to
  within the conversion's slack."""
  pytest.importorskip("dp_accounting")
  z, t, delta = 2.0, 50, 1e-5
  orders = np.concatenate([np.linspace(1.01, 10, 500),
                           np.arange(11, 1000)])
  classic = np.min(t * orders / (2 * z * z) + np.log(1 / delta) /
                   (orders - 1))
  eps = privacy.epsilon(z, t, delta)
  assert eps <= classic + 1e-9
  assert eps >= 0.8 * classic
  assert privacy.epsilon(2 * z, t, delta) < eps
  assert privacy.epsilon(z, t, delta, sampling_rate=0.1) < eps
  assert privacy.epsilon(z, 0, delta) == 0.0


@pytest.mark.slow
def test_dp_run_reports_epsilon():
  pytest.importorskip("dp_accounting")
  config = tiny_config("fedbuff", rounds=6, eval_every=3, engine_kw=dict(
      clip="fixed", clip_norm=0.5, dp_noise_multiplier=1.0))
  exp = experiment.build(config)
  state, history, timing = exp.run()
  summary = exp.summary(state, history, timing)
  most = int(np.asarray(state.client_applied).max())
  assert summary["dp_max_participations"] == most > 0
  assert summary["dp_epsilon"] == pytest.approx(
      privacy.epsilon(1.0, most, 1e-5))
  assert summary["dp_epsilon_poisson"] < summary["dp_epsilon"] * 10
  assert int(np.asarray(state.client_applied).sum()) == \
      summary["client_updates"]
