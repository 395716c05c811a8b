"""Aggregation transforms (``core/transforms.py``) with hand-computed numbers,
and the presets' compositions (``algorithms.fedavg`` ...) against the
command line's (``aggregator_from_config``)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ftte_jax.core import algorithms
from ftte_jax.core import masks
from ftte_jax.core import transforms as tx

PARAMS = {"w": jnp.zeros((2,))}


def _buffer(valid=(True, True, False), tau=(0, 3, 1), counts=(4, 9, 16),
            deltas=None):
  k = len(valid)
  buf = tx.Buffer.start(jnp.asarray(valid), jnp.asarray(tau, jnp.int32),
                        jnp.asarray(counts, jnp.int32),
                        jnp.zeros(k, jnp.int32), jnp.arange(k))
  return buf if deltas is None else buf.replace(
      deltas={"w": jnp.asarray(deltas, jnp.float32)})


def _ctx(params=PARAMS):
  return tx.Context(masks=masks.full_plan(params, 1).masks,
                    key=jax.random.PRNGKey(0), params=params)


def _apply(t, buf, ctx=None):
  ctx = ctx or _ctx()
  return t.update(buf, t.init(ctx.params), ctx)


def test_start_weights_valid_updates_one():
  b = _buffer()
  np.testing.assert_array_equal(b.weights, [1, 1, 0])
  np.testing.assert_array_equal(b.base, [1, 1, 0])


def test_data_then_age_weights_by_hand():
  chain = tx.chain(tx.weight_by_data(0.5),
                   tx.weight_by_age(lambda tau: 1.0 / (1.0 + tau)))
  assert chain.streamable
  b, state = _apply(chain, _buffer())
  assert state == ((), ())
  # sqrt(n) * 1/(1+tau): 2 * 1, 3 / 4; the invalid one stays 0.
  np.testing.assert_allclose(b.weights, [2.0, 0.75, 0.0])
  np.testing.assert_allclose(b.base, [2.0, 3.0, 0.0])  # no age factor.


def test_invalidate_zeroes_weights_and_validity():
  b = _buffer(valid=(True, True, True)).invalidate(jnp.asarray([False, True,
                                                                False]))
  np.testing.assert_array_equal(b.valid, [True, False, True])
  np.testing.assert_array_equal(b.weights, [1, 0, 1])


def test_streamable_is_a_property_of_every_transform():
  assert tx.weight_by_data().streamable and tx.weight_by_age(
      lambda t: t).streamable
  for t in (tx.weight_by_variance(1.0), tx.clip("fixed", 1.0),
            tx.robust_mean("median"), tx.dp_noise(1.0, 1.0)):
    assert not t.streamable
    assert not tx.chain(tx.weight_by_data(), t).streamable


def test_variance_weight_by_hand():
  # Two equal updates and an outlier, equal weights.
  d = [[1.0, 0.0], [1.0, 0.0], [-1.0, 2.0]]
  b, _ = _apply(tx.weight_by_variance(1.0),
                _buffer(valid=(True,) * 3, deltas=d))
  # d_i = ||D_i - mean||^2 / ||mean||^2, s = 1 / (1 + d), scaled to mean 1.
  mean = np.mean(d, 0)
  dev = np.array([np.sum((np.array(r) - mean) ** 2) for r in d]) / max(
      np.sum(mean ** 2), 1e-12)
  s = 1 / (1 + dev)
  np.testing.assert_allclose(b.weights, s / s.mean(), rtol=1e-5)


def test_clip_counts_and_scales():
  d = [[3.0, 4.0], [0.3, 0.4], [30.0, 40.0]]
  b, _ = _apply(tx.clip("fixed", 1.0), _buffer(valid=(True, True, False),
                                               deltas=d))
  np.testing.assert_allclose(b.deltas["w"][0], [0.6, 0.8], rtol=1e-6)
  np.testing.assert_allclose(b.deltas["w"][1], [0.3, 0.4], rtol=1e-6)
  assert int(b.updates_clipped) == 1  # the invalid row is not counted.


def test_normalizations_by_hand():
  d = {"w": jnp.asarray([[2.0, 0.0], [0.0, 4.0], [9.0, 9.0]])}
  b = _buffer(valid=(True, True, False)).replace(deltas=d)
  b = b.replace(weights=jnp.asarray([1.0, 3.0, 0.0]),
                base=jnp.asarray([2.0, 2.0, 0.0]))
  ctx = _ctx()
  got = {k: tx.normalize(k).reduce(b, ctx, None)["w"]
         for k in ("coordinate", "damped", "buffer")}
  total = np.array([2.0, 12.0])
  np.testing.assert_allclose(got["coordinate"], total / 4.0)
  np.testing.assert_allclose(got["damped"], total / 4.0)  # 2 + 2
  np.testing.assert_allclose(got["buffer"], total / 2.0)
  # The streamed sum gives the same aggregate.
  np.testing.assert_allclose(
      tx.normalize("buffer").reduce(b, ctx, {"w": jnp.asarray(total)})["w"],
      got["buffer"])


def test_chain_state_threads_through_a_stateful_transform():
  def counting(buf, state, ctx):
    return buf.replace(weights=buf.weights * (state + 1.0)), state + 1.0

  t = tx.chain(tx.BufferTransform(init=lambda p: jnp.zeros(()),
                                  update=counting), tx.weight_by_data(1.0))
  ctx = _ctx()
  state = t.init(PARAMS)
  b, state = t.update(_buffer(), state, ctx)
  b, state = t.update(_buffer(), state, ctx)
  assert float(state[0]) == 2.0
  np.testing.assert_allclose(b.weights, [8.0, 18.0, 0.0])


@pytest.mark.parametrize("name,composed", [
    ("fedavg", algorithms.fedavg()), ("fedbuff", algorithms.fedbuff()),
    ("fedasync", algorithms.fedasync()), ("ftte", algorithms.ftte())])
def test_preset_compositions_equal_the_config_path(name, composed):
  config = algorithms.preset(name, **({} if name == "fedasync" else
                                      {"concurrency": 5, "buffer_size": 5}))
  from_config = algorithms.aggregator_from_config(config)
  assert from_config.streamable == composed.streamable
  rng = np.random.default_rng(0)
  buf = _buffer(valid=(True, True, False, True, True), tau=(0, 2, 1, 5, 3),
                counts=(3, 7, 2, 9, 4), deltas=rng.normal(size=(5, 2)))
  ctx = _ctx()
  outs = []
  for agg in (from_config, composed):
    b, _ = agg.transform.update(buf, agg.init(PARAMS), ctx)
    outs.append((b.weights, agg.reduction.reduce(b, ctx, None)["w"]))
  np.testing.assert_allclose(outs[0][0], outs[1][0], rtol=1e-6)
  np.testing.assert_allclose(outs[0][1], outs[1][1], rtol=1e-6)
