"""Tests for ftte_jax.models."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from ftte_jax import models as M

SHAPES = {"mlp": (2, 28, 28, 1), "lenet5": (2, 28, 28, 1),
          "resnet8": (2, 16, 16, 3), "resnet20": (2, 16, 16, 3),
          "mobilenetv2": (2, 16, 16, 3)}


def _flat(variables):
  """Params as {'layer03_conv/kernel': array}, in sorted (forward) order."""
  flat = traverse_util.flatten_dict(variables["params"], sep="/")
  return dict(sorted(flat.items()))


@pytest.fixture(scope="module")
def inited():
  # Abstract init (tracing, no compilation) keeps the structural tests fast.
  out = {}
  for name, shape in SHAPES.items():
    model = M.get_model(name, 7)
    x = jax.ShapeDtypeStruct(shape, jnp.float32)
    variables = jax.eval_shape(model.init, jax.random.key(0), x)
    out[name] = (model, variables, x)
  return out


@pytest.mark.parametrize("name", M.MODELS)
def test_logits_shape_and_params_only(inited, name):
  model, variables, x = inited[name]
  assert set(variables) == {"params"}  # no batch_stats / mutable state.
  y = jax.eval_shape(model.apply, variables, x)
  assert y.shape == (2, 7) and y.dtype == jnp.float32


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mobilenetv2"])
def test_forward_is_finite(name):
  model = M.get_model(name, 7)
  x = jax.random.normal(jax.random.key(1), (2, 8, 8, 1))
  y = jax.jit(lambda x: model.apply(model.init(jax.random.key(0), x), x))(x)
  chex.assert_shape(y, (2, 7))
  assert bool(jnp.isfinite(y).all())


def test_mlp_default_is_784_200_200_10():
  v = jax.eval_shape(M.get_model("mlp", 10).init, jax.random.key(0),
                     jnp.zeros((1, 28, 28, 1)))
  shapes = [a.shape for k, a in _flat(v).items() if k.endswith("kernel")]
  assert shapes == [(784, 200), (200, 200), (200, 10)]


@pytest.mark.parametrize("name", M.MODELS)
def test_param_order_is_forward_order(inited, name):
  model, variables, x = inited[name]
  calls = []

  def record(next_fun, args, kwargs, context):
    if context.method_name == "__call__" and context.module.name and (
        context.module.name.startswith("layer")):
      calls.append(context.module.name)
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(record):
    jax.eval_shape(model.apply, variables, x)
  # Sorted layer names, the order jax.tree flattens the params in (which
  # masks.last_n_mask relies on), are the forward order.
  assert calls == sorted(variables["params"])


def test_depthwise_conv_in_mobilenet(inited):
  _, variables, _ = inited["mobilenetv2"]
  kernels = [a.shape for k, a in _flat(variables).items()
             if k.endswith("kernel") and a.ndim == 4]
  assert any(s[:3] == (3, 3, 1) and s[3] > 1 for s in kernels)


@pytest.mark.parametrize("groups,stride,padding", [
    (1, 1, "SAME"), (1, 2, "SAME"), (1, 1, "VALID"), (4, 2, "SAME"),
    (8, 1, ((1, 2), (0, 1)))])
def test_im2col_matches_xla_conv(groups, stride, padding):
  k1, k2 = jax.random.split(jax.random.key(0))
  x = jax.random.normal(k1, (2, 9, 7, 8))
  w = jax.random.normal(k2, (3, 3, 8 // groups, 16))
  args = ((stride, stride), padding)
  kw = dict(dimension_numbers=("NHWC", "HWIO", "NHWC"),
            feature_group_count=groups)
  ref = jax.jit(lambda x, w: jax.lax.conv_general_dilated(x, w, *args,
                                                          **kw))(x, w)
  got = jax.jit(lambda x, w: M.im2col_conv(x, w, *args, **kw))(x, w)
  np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("groups", [1, 4])
def test_conv_impls_agree_on_gradients_under_vmap(groups):
  # Per-client weights under vmap: XLA sees a grouped conv, im2col a batched
  # matmul; values and gradients must agree.
  x = jax.random.normal(jax.random.key(1), (3, 2, 6, 6, 4))
  grads = {}
  for impl in ("xla", "im2col"):
    fn = M.im2col_conv if impl == "im2col" else None
    conv = nn.Conv(4, (3, 3), strides=(2, 2), feature_group_count=groups,
                   conv_general_dilated=fn)

    @jax.jit
    def vgrad(x, conv=conv):
      p = conv.init(jax.random.key(0), x[0])["params"]
      ps = jax.tree.map(lambda a: jnp.stack([a, 1.1 * a, 0.9 * a]), p)
      loss = lambda p, xb: jnp.sum(jnp.tanh(conv.apply({"params": p}, xb)))
      return jax.vmap(jax.grad(loss))(ps, x)
    grads[impl] = vgrad(x)
  chex.assert_trees_all_close(grads["xla"], grads["im2col"], rtol=1e-4,
                              atol=1e-5)


def test_auto_conv_impl_resolves_per_backend():
  want = "im2col" if jax.default_backend() == "cpu" else "xla"
  assert M.resolve_conv_impl("auto") == want


@pytest.mark.parametrize("call,match", [
    (lambda: M.get_model("vgg16", 10), r"model: unknown 'vgg16'; valid: "
     r"\['mlp'"),
    (lambda: M.get_model("mlp", 0), "num_classes"),
    (lambda: M.get_model("mlp", 10, conv_impl="xla"), r"unknown options "
     r"\['conv_impl'\]; valid: \['hidden'\]"),
    (lambda: M.get_model("lenet5", 10, conv_impl="cudnn"), "conv_impl"),
    (lambda: M.get_model("resnet8", 10, norm="batch"), r"norm: unknown "
     r"'batch'; valid: \['group', 'none'\]"),
    (lambda: M.get_model("resnet20", 10, depth=8), "unknown options"),
])
def test_bad_options(call, match):
  with pytest.raises(ValueError, match=match):
    call()


def test_resnet_depth_checked():
  with pytest.raises(ValueError, match="6n \\+ 2"):
    M.ResNet(depth=9).init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)))
