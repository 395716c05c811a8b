"""Tests for ftte_jax.data.client_data: the CSR layout and the sampler."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ftte_jax.data import client_data as cdl

X = np.arange(20, dtype=np.float32)[:, None]
Y = np.arange(20) % 3


def test_from_partition_layout_keeps_each_client_contiguous():
  parts = [np.array([0, 5]), np.array([7]), np.array([1, 2, 3])]
  cd = cdl.from_partition(X, Y, parts)
  np.testing.assert_array_equal(cd.counts, [2, 1, 3])
  np.testing.assert_array_equal(cd.offsets, [0, 2, 3])
  assert cd.num_clients == 3 and cd.num_examples == 6
  for i, p in enumerate(parts):  # the same examples, in a seeded order.
    got = np.asarray(cd.x)[cd.rows(i), 0]
    np.testing.assert_array_equal(np.sort(got), X[p, 0])
    np.testing.assert_array_equal(np.asarray(cd.y)[cd.rows(i)], Y[got.astype(int)])
  assert cd.x.dtype == np.float32 and cd.y.dtype == np.int32
  again = cdl.from_partition(X, Y, parts)
  np.testing.assert_array_equal(cd.x, again.x)


@pytest.mark.parametrize("parts,match", [
    ([], "at least one"), ([np.array([0]), np.array([], int)], "no examples"),
    ([np.array([20])], "outside")])
def test_from_partition_errors(parts, match):
  with pytest.raises(ValueError, match=match):
    cdl.from_partition(X, Y, parts)


def test_memory_is_examples_plus_clients_whatever_the_skew():
  skewed = [np.arange(15)] + [np.array([i]) for i in range(15, 20)]
  rep = cdl.layout_report(cdl.from_partition(X, Y, skewed))
  assert rep == {"num_clients": 6, "num_examples": 20, "max_n": 15,
                 "min_n": 1, "index_bytes": 2 * 6 * 4}


def test_stride_primes_are_primes_above_every_count():
  p = cdl.STRIDE_PRIMES.astype(np.int64)
  assert (p > cdl.MAX_CLIENT_EXAMPLES).all() and len(set(p)) == p.size
  for q in p[:8]:  # trial division, independent of the module's sieve
    assert all(q % d for d in range(2, int(q ** 0.5) + 1))


def _walk_draws(key, count, batch, steps):
  walk = cdl.make_walk(key, jnp.int32(count), batch)
  f = jax.jit(lambda i: cdl.batch_positions(walk, jnp.int32(count), i))
  return np.concatenate([np.asarray(f(i)) for i in range(steps)])


@pytest.mark.parametrize("count,batch", [(1, 4), (7, 3), (32, 32), (50, 8),
                                         (1000, 32)])
def test_walk_visits_every_example_once_per_epoch(count, batch):
  steps = -(-3 * count // batch)  # three epochs
  for seed in range(3):
    draws = _walk_draws(jax.random.PRNGKey(seed), count, batch, steps)
    assert draws.min() >= 0 and draws.max() < count
    for e in range(3):
      epoch = draws[e * count:(e + 1) * count]
      np.testing.assert_array_equal(np.sort(epoch), np.arange(count))
    # Epochs repeat the same order (one permutation per task).
    np.testing.assert_array_equal(draws[:count], draws[count:2 * count])


@pytest.mark.parametrize("count", [3, 1000, 65537, 999_999_937, 2 ** 30])
def test_walk_equals_the_affine_formula_in_python_integers(count):
  key = jax.random.PRNGKey(count % 97)
  w = [int(v) for v in jax.random.bits(key, (3,), jnp.uint32)]
  a = int(cdl.STRIDE_PRIMES[w[0] >> 24]) % count  # top 8 bits: 1 of 256
  b = ((w[1] << 32) + w[2]) * count >> 64  # a 64-bit fraction of count
  batch = 16
  walk = cdl.make_walk(key, jnp.int32(count), batch)
  for step in (0, 1, 12345, 2 ** 20 + 7):
    got = np.asarray(cdl.batch_positions(walk, jnp.int32(count), step))
    want = [(a * (step * batch + t) + b) % count for t in range(batch)]
    np.testing.assert_array_equal(got, want)


def test_walks_of_different_tasks_differ():
  firsts = {tuple(_walk_draws(jax.random.PRNGKey(s), 100, 10, 1))
            for s in range(20)}
  assert len(firsts) == 20


def test_incremental_walk_equals_batch_positions():
  count, batch = 997, 32
  walk = cdl.make_walk(jax.random.PRNGKey(5), jnp.int32(count), batch)
  r = jnp.zeros((), jnp.uint32)
  for step in range(70):  # past two epochs
    pos, r = cdl.walk_batch(walk, jnp.int32(count), r)
    np.testing.assert_array_equal(
        pos, cdl.batch_positions(walk, jnp.int32(count), step))


def test_mulmod_matches_python_integers():
  a = jnp.asarray([0, 5, 2 ** 30 - 1, 123456789], jnp.uint32)
  b = jnp.asarray([7, 2 ** 30 - 1, 2 ** 30 - 1, 987654], jnp.uint32)
  n = 2 ** 30
  got = np.asarray(cdl._mulmod(a, b, jnp.uint32(n), 30))
  np.testing.assert_array_equal(
      got, [int(x) * int(y) % n for x, y in zip(a, b)])
