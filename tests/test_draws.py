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


@pytest.mark.parametrize("seed", [0, 1, 42, 2 ** 31 - 1])
def test_fold_in_equals_jax_random_fold_in_bit_for_bit(seed):
  key = jax.random.PRNGKey(seed)
  data = np.array([0, 1, 2, 7, 12345, 2 ** 31 - 1, 2 ** 31, 2 ** 32 - 1],
                  np.uint32)
  want = np.stack([np.asarray(jax.random.fold_in(key, d)) for d in data])
  for d, w in zip(data, want):
    np.testing.assert_array_equal(draws.fold_in(key, d), w)
  # Jitted and vmapped over data, as the engine derives client keys; int32
  # data (client ids, versions) converts as JAX converts it.
  np.testing.assert_array_equal(
      jax.jit(jax.vmap(draws.fold_in, (None, 0)))(key, data), want)
  np.testing.assert_array_equal(
      jax.jit(draws.fold_in)(key, jnp.int32(5)), jax.random.fold_in(key, 5))
  # Nested and vmapped over the key too.
  keys = jax.vmap(draws.fold_in, (None, 0))(key, jnp.arange(4))
  np.testing.assert_array_equal(
      jax.vmap(draws.fold_in, (0, None))(keys, 9),
      np.stack([np.asarray(jax.random.fold_in(k, 9)) for k in keys]))


def test_fold_in_refuses_non_scalar_data():
  with pytest.raises(ValueError, match="data must be a scalar"):
    draws.fold_in(jax.random.PRNGKey(0), jnp.arange(3))


def test_fold_in_leaves_typed_keys_to_jax():
  key = jax.random.key(3)
  np.testing.assert_array_equal(
      jax.random.key_data(draws.fold_in(key, 4)),
      jax.random.key_data(jax.random.fold_in(key, 4)))


@pytest.mark.parametrize("n", [1, 2, 3, 5, 64])
def test_few_bits_equals_jax_random_bits_bit_for_bit(n):
  for seed in (0, 9):
    key = jax.random.fold_in(jax.random.PRNGKey(seed), 3)
    want = jax.random.bits(key, (n,), jnp.uint32)
    np.testing.assert_array_equal(draws.few_bits(key, n), want)
    np.testing.assert_array_equal(
        jax.jit(draws.few_bits, static_argnums=1)(key, n), want)


def test_few_bits_without_partitionable_threefry_calls_jax():
  key = jax.random.PRNGKey(5)
  with jax.threefry_partitionable(False):
    np.testing.assert_array_equal(draws.few_bits(key, 3),
                                  jax.random.bits(key, (3,), jnp.uint32))
