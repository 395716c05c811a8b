"""Values from raw words: JAX's own transforms, and an exact reduction."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ftte_jax.core import draws


@pytest.mark.parametrize("seed", [0, 1, 7])
def test_uniform_and_normal_equal_jax_random_bit_for_bit(seed):
  key = jax.random.PRNGKey(seed)
  words = jax.random.bits(key, (3, 500), jnp.uint32)
  # Jitted, as in the engine: XLA fuses the scale and shift into one FMA.
  np.testing.assert_array_equal(jax.jit(draws.uniform)(words),
                                jax.random.uniform(key, (3, 500)))
  np.testing.assert_array_equal(
      jax.jit(lambda w: draws.uniform(w, -2.5, 4.0))(words),
      jax.random.uniform(key, (3, 500), minval=-2.5, maxval=4.0))
  np.testing.assert_array_equal(jax.jit(draws.normal)(words),
                                jax.random.normal(key, (3, 500)))


@pytest.mark.parametrize("n", [1, 2, 3, 1000, 65537, 999_999_937, 2 ** 30,
                               2 ** 32 - 1])
def test_below_scales_the_64_bit_fraction_in_python_integers(n):
  rng = np.random.default_rng(n % 1000)
  hi = rng.integers(0, 2 ** 32, 500, dtype=np.uint64)
  lo = rng.integers(0, 2 ** 32, 500, dtype=np.uint64)
  hi[:2], lo[:2] = [0, 2 ** 32 - 1], [0, 2 ** 32 - 1]  # the extremes
  got = np.asarray(draws.below(jnp.asarray(hi, jnp.uint32),
                               jnp.asarray(lo, jnp.uint32), n))
  want = [((int(h) << 32) + int(l)) * n >> 64 for h, l in zip(hi, lo)]
  np.testing.assert_array_equal(got, want)


def test_below_is_uniform_over_a_small_range():
  # 6000 draws over 6 values: each count within 5 sigma of 1000.
  w = jax.random.bits(jax.random.PRNGKey(3), (2, 6000), jnp.uint32)
  counts = np.bincount(np.asarray(draws.below(w[0], w[1], 6)), minlength=6)
  assert counts.sum() == 6000
  assert np.all(np.abs(counts - 1000) < 5 * np.sqrt(6000 / 6 * 5 / 6))
