"""Host-side keys: jax.random.PRNGKey and fold_in bit for bit, without
compiling."""

import jax
import numpy as np
import pytest

from ftte_jax.core import keys


def _equal(a, b):
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert np.asarray(a).dtype == np.asarray(b).dtype == np.uint32


@pytest.mark.parametrize("seed", [0, 1, 7, 12345, 2**31 - 1])
def test_root_is_prngkey(seed):
  _equal(keys.root(seed), jax.random.PRNGKey(seed))


def test_fold_in_is_jax_fold_in():
  rng = np.random.default_rng(0)
  for i in range(200):
    key = jax.random.fold_in(jax.random.PRNGKey(int(rng.integers(2**31))),
                             int(rng.integers(2**32)))
    data = int(rng.integers(2**32)) if i % 2 else int(rng.integers(16))
    _equal(keys.fold_in(key, data), jax.random.fold_in(key, data))
  _equal(keys.fold_in(keys.root(3), 2**32 - 1),
         jax.random.fold_in(jax.random.PRNGKey(3), 2**32 - 1))


def test_nothing_is_compiled():
  compiles, listening = [], [True]

  def listener(event, duration, **kwargs):
    del duration, kwargs
    if listening[0] and event == "/jax/core/compile/backend_compile_duration":
      compiles.append(event)

  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    keys.fold_in(keys.fold_in(keys.root(11), 5), 9)
    assert not compiles
    jax.jit(lambda x: x * 3 + 1)(np.float32(2))  # the listener hears one.
    assert compiles
  finally:
    listening[0] = False


@pytest.mark.parametrize("seed", [-1, 2**31, 2**32 + 5])
def test_other_seeds_go_to_jax(seed):
  _equal(keys.root(seed), jax.random.PRNGKey(seed))


def test_a_traced_key_goes_to_jax():
  fold = jax.jit(lambda k: keys.fold_in(k, 4))
  _equal(fold(keys.root(2)), jax.random.fold_in(jax.random.PRNGKey(2), 4))


def test_out_of_range_data_fails_as_jax_fails():
  with pytest.raises(OverflowError):
    keys.fold_in(keys.root(0), -1)
