"""Client update: the static fast paths equal the general masked path."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from helpers import make_dataset, tiny_model
from ftte_jax.core import client
from ftte_jax.core import losses


def _run(kinds, mask, unroll=True, steps=4, momentum=0.0):
  apply, params = tiny_model()
  _, _, data = make_dataset(num_clients=2, per_client=30)
  upd = client.make_client_update(
      apply, 8, client.make_client_optimizer(0.3, momentum), steps,
      unroll=unroll, kinds=kinds)
  local = client.LocalData(source=data, offset=data.offsets[1],
                           count=data.counts[1],
                           num_steps=jnp.int32(steps - 1))
  f = jax.jit(lambda k: upd(k, params, mask, local)[:2])
  return params, f(jax.random.PRNGKey(3))


def _mask(params, layer0, layer1_kernel):
  m = jax.tree.map(jnp.ones_like, params)
  m["layer0"] = jax.tree.map(lambda x: x * layer0, m["layer0"])
  m["layer1"]["kernel"] = m["layer1"]["kernel"] * layer1_kernel
  return m


@pytest.mark.parametrize("momentum", [0.0, 0.9])
@pytest.mark.parametrize("layer0,partial", [(0.0, False), (0.0, True),
                                            (1.0, False), (1.0, True)])
def test_static_kinds_equal_the_masked_path(layer0, partial, momentum):
  _, params = tiny_model()
  k1 = np.ones(params["layer1"]["kernel"].shape, np.float32)
  if partial:
    k1[:, 1:] = 0.0  # one output unit trained
  mask = _mask(params, layer0, jnp.asarray(k1))
  stacked = jax.tree.map(lambda m: np.asarray(m)[None], mask)
  kinds = client.leaf_kinds(stacked)
  assert kinds["layer0"]["kernel"] == ("all" if layer0 else "none")
  assert kinds["layer1"]["kernel"] == ("some" if partial else "all")
  base, (general, loss_g) = _run(None, mask, momentum=momentum)
  _, (fast, loss_f) = _run(kinds, mask, momentum=momentum)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6),
               general, fast)
  np.testing.assert_allclose(loss_g, loss_f, rtol=1e-6)
  if not layer0:  # frozen leaves come back exactly
    jax.tree.map(np.testing.assert_array_equal, fast["layer0"],
                 base["layer0"])
  moved = np.abs(np.asarray(fast["layer1"]["kernel"] -
                            base["layer1"]["kernel"]))
  assert moved.max() > 0 and (moved[:, 1:].max() == 0) == partial


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_rolled_loop_equals_unrolled(momentum):
  # The rolled loop is the default since it compiles faster; it computes
  # the same steps, to float rounding (XLA may fuse an unrolled body
  # differently, which moves last bits).
  _, params = tiny_model()
  mask = _mask(params, 1.0, jnp.ones_like(params["layer1"]["kernel"]))
  _, (rolled, loss_r) = _run(None, mask, unroll=1, momentum=momentum)
  _, (unrolled, loss_u) = _run(None, mask, unroll=True, momentum=momentum)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6),
               rolled, unrolled)
  np.testing.assert_allclose(loss_r, loss_u, rtol=1e-6)


def test_long_local_loops_are_not_unrolled():
  # 300 unrolled steps would take minutes to compile; the loop stays rolled.
  _, params = tiny_model()
  mask = jax.tree.map(jnp.ones_like, params)
  _, (p_roll, _) = _run(None, mask, unroll=1, steps=300)
  _, (p_auto, _) = _run(None, mask, unroll=True, steps=300)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6),
               p_roll, p_auto)


@pytest.mark.parametrize("micro_batches", [1, 2, 4, 8])
def test_micro_batch_accumulation_equals_one_batch(micro_batches):
  # An SGD step from the accumulated micro-batch gradient equals the step
  # from the one-pass batch gradient (to float rounding).
  apply, params = tiny_model()
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(32, 6)), jnp.float32)
  y = jnp.asarray(rng.integers(0, 4, 32), jnp.int32)
  tx = optax.sgd(0.5)
  want = jax.grad(lambda p: client.cross_entropy(apply, p, x, y))(params)
  loss = losses.classification(apply).loss
  got = jax.jit(client.accumulated_grad, static_argnums=(0, 3))(
      loss, params, {"x": x, "y": y}, micro_batches)
  step = lambda g: optax.apply_updates(params, tx.update(g, tx.init(params))[0])
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6),
               step(got), step(want))
  with pytest.raises(ValueError, match="micro_batches"):
    client.accumulated_grad(loss, params, {"x": x, "y": y}, 5)
