"""Hand-computed aggregation and staleness-weight cases."""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from ftte_jax.core import aggregation
from ftte_jax.core import staleness


def test_fedbuff_three_updates_staleness_0_1_3_both_normalizations():
  s = staleness.make_staleness_fn("polynomial", a=0.5)
  w = np.asarray(s(jnp.array([0, 1, 3])))
  np.testing.assert_allclose(w, [1.0, 1 / math.sqrt(2), 0.5], rtol=1e-6)
  deltas = {"w": jnp.array([[1.0, -2.0], [2.0, 0.0], [4.0, 2.0]])}
  masks = {"w": jnp.ones((1, 2))}  # one tier: the full model
  tier = jnp.zeros(3, jnp.int32)
  # Buffer (1/K): (1*1 + 2/sqrt2 + 0.5*4) / 3 and (1*-2 + 0 + 0.5*2) / 3.
  buf = aggregation.aggregate(deltas, masks, tier, jnp.asarray(w), "buffer")
  np.testing.assert_allclose(
      buf["w"], [(3 + math.sqrt(2)) / 3, -1 / 3], rtol=1e-6)
  # Coordinate: divide by sum of weights 1 + 1/sqrt2 + 1/2 = (3+sqrt2)/2.
  coord = aggregation.aggregate(deltas, masks, tier, jnp.asarray(w),
                                "coordinate")
  np.testing.assert_allclose(
      coord["w"], [2.0, -1.0 / ((3 + math.sqrt(2)) / 2)], rtol=1e-6)


def test_coordinate_wise_aggregation_with_two_masks():
  # Client A (tier 0) trains coordinates 0 and 1, B (tier 1) trains 1, 2.
  deltas = {"w": jnp.array([[2.0, 4.0, 0.0], [0.0, 8.0, 6.0]])}
  masks = {"w": jnp.array([[1.0, 1.0, 0.0], [0.0, 1.0, 1.0]])}
  out = aggregation.aggregate(deltas, masks, jnp.array([0, 1]),
                              jnp.array([1.0, 3.0]))
  # coord 0: A alone; coord 1: (1*4 + 3*8) / 4; coord 2: B alone.
  np.testing.assert_allclose(out["w"], [2.0, 7.0, 6.0], rtol=1e-6)


def test_untrained_coordinate_and_zero_weights_give_zero():
  deltas = {"w": jnp.array([[1.0, 0.0]])}  # zero outside the mask
  masks = {"w": jnp.array([[1.0, 0.0]])}
  tier = jnp.zeros(1, jnp.int32)
  np.testing.assert_array_equal(
      aggregation.aggregate(deltas, masks, tier, jnp.array([1.0]))["w"],
      [1.0, 0.0])
  np.testing.assert_array_equal(
      aggregation.aggregate(deltas, masks, tier, jnp.array([0.0]),
                            "buffer")["w"], [0.0, 0.0])


def test_deviation_and_variance_weight():
  deltas = {"w": jnp.array([[1.0, 0.0], [3.0, 0.0]])}
  masks = {"w": jnp.ones((1, 2))}
  tier = jnp.zeros(2, jnp.int32)
  mean = aggregation.weighted_mean(deltas, masks, tier, jnp.array([1.0, 1.0]))
  np.testing.assert_allclose(mean["w"], [2.0, 0.0])
  d = aggregation.deviation(deltas, masks, tier, mean)
  np.testing.assert_allclose(d, [0.25, 0.25])  # 1^2 / 2^2
  np.testing.assert_allclose(staleness.variance_weight(d, 2.0), [2 / 3, 2 / 3])


def test_deviation_counts_only_the_clients_own_coordinates():
  # A (tier 0) trains coordinate 0 only, B (tier 1) both coordinates.
  deltas = {"w": jnp.array([[1.0, 0.0], [3.0, 4.0]])}
  masks = {"w": jnp.array([[1.0, 0.0], [1.0, 1.0]])}
  tier = jnp.array([0, 1])
  mean = aggregation.weighted_mean(deltas, masks, tier, jnp.array([1.0, 1.0]))
  np.testing.assert_allclose(mean["w"], [2.0, 4.0])  # coord 1: B alone
  d = aggregation.deviation(deltas, masks, tier, mean)
  # A: (1-2)^2 / 2^2 on its own coordinate; B: (1 + 0) / (4 + 16).
  np.testing.assert_allclose(d, [0.25, 1 / 20], rtol=1e-6)


@pytest.mark.parametrize("name, a, b, tau, expected", [
    ("constant", 0.5, 4.0, [0, 7], [1.0, 1.0]),
    ("polynomial", 1.0, 4.0, [0, 1, 3], [1.0, 0.5, 0.25]),
    ("hinge", 0.5, 2.0, [0, 2, 4], [1.0, 1.0, 0.5]),
    ("exponential", math.log(2), 4.0, [0, 1, 2], [1.0, 0.5, 0.25]),
])
def test_staleness_functions(name, a, b, tau, expected):
  s = staleness.make_staleness_fn(name, a, b)
  np.testing.assert_allclose(s(jnp.array(tau)), expected, rtol=1e-6)


def test_bad_staleness_and_normalization():
  with pytest.raises(ValueError, match="staleness must be one of"):
    staleness.make_staleness_fn("cosine")
  with pytest.raises(ValueError, match="staleness_a"):
    staleness.make_staleness_fn("polynomial", a=-1)
  with pytest.raises(ValueError, match="normalization"):
    aggregation.aggregate({"w": jnp.ones((1, 1))}, {"w": jnp.ones((1, 1))},
                          jnp.zeros(1, jnp.int32), jnp.ones(1), "sum")


def test_damped_normalization_shrinks_stale_updates_absolutely():
  # Two full-model updates, equal data; ages 0 and 3 with (1+tau)^-0.5.
  deltas = {"w": jnp.array([[2.0], [4.0]])}
  masks = {"w": jnp.ones((1, 1))}
  tier = jnp.zeros(2, jnp.int32)
  base = jnp.array([1.0, 1.0])
  w = base * jnp.array([1.0, 0.5])
  damped = aggregation.aggregate(deltas, masks, tier, w, "damped",
                                 base_weights=base)
  np.testing.assert_allclose(damped["w"], [(2.0 + 0.5 * 4.0) / 2.0])
  coord = aggregation.aggregate(deltas, masks, tier, w, "coordinate")
  np.testing.assert_allclose(coord["w"], [(2.0 + 2.0) / 1.5])
  with pytest.raises(ValueError, match="base_weights"):
    aggregation.aggregate(deltas, masks, tier, w, "damped")


def test_buffer_variance_weight_has_mean_one_over_valid_updates():
  # d = 0, 1, 3 with beta = 1: raw 1, 1/2, 1/4; the third is invalid, so the
  # mean over valid updates is 3/4 and the weights become 4/3, 2/3, 1/3.
  w = staleness.buffer_variance_weight(jnp.array([0.0, 1.0, 3.0]),
                                       jnp.array([True, True, False]), 1.0)
  np.testing.assert_allclose(w, [4 / 3, 2 / 3, 1 / 3], rtol=1e-6)
