"""Fisher importance: hand numbers, microbatches, vmap over clients."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ftte_jax.search import groups
from ftte_jax.search import importance


def _loss(p, batch):
  x, y = batch
  return 0.5 * jnp.mean((x @ p["w"] - y) ** 2)


def test_fisher_hand_computed():
  p = {"w": jnp.array([[1.0], [2.0]])}
  x = jnp.array([[1.0, 0.0], [1.0, 1.0]])
  y = jnp.array([[0.0], [1.0]])
  # Residuals r = x @ w - y = [1, 2]; per-example grad r_i * x_i:
  # [1, 0] and [2, 2] -> sum of squares [1 + 4, 0 + 4].
  f = importance.fisher_diagonal(_loss, p, (x, y))
  np.testing.assert_allclose(f["w"][:, 0], [5.0, 4.0])
  # Full batch: mean grad [1.5, 1] squared.
  f = importance.fisher_diagonal(_loss, p, (x, y), microbatch_size=2)
  np.testing.assert_allclose(f["w"][:, 0], [2.25, 1.0])
  with pytest.raises(ValueError, match="microbatch_size"):
    importance.fisher_diagonal(_loss, p, (x, y), microbatch_size=3)


def _spec():
  layer = groups.Layer(0, ("d",), "Dense", "linear", (1, 2), (1, 4),
                       (("kernel", (2, 4)), ("bias", (4,))), 2, 4, 8)
  info = groups.ModelInfo((layer,), 12, ())
  return groups.make_groups(info, (0.25, 0.5, 1.0))


def test_group_importance_cumulative():
  spec = _spec()
  fisher = {"d": {"kernel": jnp.arange(8.0).reshape(2, 4),
                  "bias": jnp.array([1.0, 2.0, 3.0, 4.0])}}
  # Kernel channel sums [4, 6, 8, 10]; cumulative over 0, 1, 2, 4 channels.
  np.testing.assert_allclose(importance.group_importance(spec, fisher),
                             [[0, 4, 10, 28], [0, 1, 3, 10]])
  wrapped = importance.group_importance(spec, {"params": fisher})
  np.testing.assert_allclose(wrapped, [[0, 4, 10, 28], [0, 1, 3, 10]])


def test_vmap_over_clients():
  spec = _spec()
  params = {"d": {"kernel": jnp.ones((2, 4)), "bias": jnp.zeros(4)}}

  def loss(p, batch):
    x, y = batch
    return jnp.mean((x @ p["d"]["kernel"] + p["d"]["bias"] - y) ** 2)

  def scores(b):
    return importance.group_importance(
        spec, importance.fisher_diagonal(loss, params, b))

  key_x, key_y = jax.random.split(jax.random.key(0))
  xs = jax.random.normal(key_x, (3, 4, 2))  # 3 clients, 4 examples each.
  ys = jax.random.normal(key_y, (3, 4, 4))
  batched = jax.jit(jax.vmap(scores))((xs, ys))
  chex.assert_shape(batched, (3, 2, 4))
  for i in range(3):
    np.testing.assert_allclose(batched[i], scores((xs[i], ys[i])), rtol=1e-5)
