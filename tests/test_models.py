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
          "mobilenetv2": (2, 16, 16, 3), "femnist_cnn": (2, 28, 28, 1),
          "char_lstm": (2, 12)}
# Models that take int32 tokens [B, T] and give logits [B, T, classes].
SEQUENCE = ("char_lstm",)


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
    x = jax.ShapeDtypeStruct(shape, jnp.int32 if name in SEQUENCE else
                             jnp.float32)
    variables = jax.eval_shape(model.init, jax.random.key(0), x)
    out[name] = (model, variables, x)
  return out


@pytest.mark.parametrize("name", M.MODELS)
def test_logits_shape_and_params_only(inited, name):
  model, variables, x = inited[name]
  assert set(variables) == {"params"}  # no batch_stats / mutable state.
  y = jax.eval_shape(model.apply, variables, x)
  want = (2, 12, 7) if name in SEQUENCE else (2, 7)
  assert y.shape == want and y.dtype == jnp.float32


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


def _count(variables):
  return sum(a.size for a in jax.tree.leaves(variables))


def test_femnist_cnn_is_leafs():
  # LEAF models/femnist/cnn.py: conv5x5 1->32 (800 + 32), conv5x5 32->64
  # (51,200 + 64), dense 7*7*64 -> 2048 (6,422,528 + 2,048), dense 2048 ->
  # 62 (126,976 + 62): 6,603,710 parameters.
  v = jax.eval_shape(M.get_model("femnist_cnn", 62).init, jax.random.key(0),
                     jnp.zeros((1, 28, 28, 1)))
  shapes = {k: a.shape for k, a in _flat(v).items()}
  assert shapes == {"layer00_conv/bias": (32,),
                    "layer00_conv/kernel": (5, 5, 1, 32),
                    "layer01_conv/bias": (64,),
                    "layer01_conv/kernel": (5, 5, 32, 64),
                    "layer02_dense/bias": (2048,),
                    "layer02_dense/kernel": (3136, 2048),
                    "layer03_dense/bias": (62,),
                    "layer03_dense/kernel": (2048, 62)}
  assert _count(v) == 6_603_710


def test_char_lstm_shapes_and_size():
  # Embedding 84x8 (672); LSTM 8->256: 8*1024 + 256*1024 + 1024 (271,360);
  # LSTM 256->256: 2*262,144 + 1024 (525,312); dense 256->84 (21,588).
  v = jax.eval_shape(M.get_model("char_lstm", 84).init, jax.random.key(0),
                     jax.ShapeDtypeStruct((1, 80), jnp.int32))
  assert _count(v) == 672 + 271_360 + 525_312 + 21_588 == 818_932
  assert _flat(v)["layer01_lstm/kernel_i"].shape == (8, 1024)
  with pytest.raises(ValueError, match="integer tokens"):
    M.get_model("char_lstm", 84).init(jax.random.key(0), jnp.zeros((1, 4)))


def test_lstm_matches_a_step_by_step_reference():
  layer = M.LSTM(3)
  x = np.random.default_rng(0).normal(size=(2, 5, 4)).astype(np.float32)
  p = layer.init(jax.random.key(1), x)["params"]
  # The forget gate's bias starts at 1 (TF's forget_bias), the rest at 0.
  np.testing.assert_array_equal(p["bias"], [0, 0, 0, 1, 1, 1, 0, 0, 0, 0, 0,
                                            0])
  got = np.asarray(layer.apply({"params": p}, x))
  wi, wh, b = (np.asarray(p[k], np.float64) for k in
               ("kernel_i", "kernel_h", "bias"))
  sig = lambda z: 1 / (1 + np.exp(-z))
  h = c = np.zeros((2, 3))
  for t in range(5):
    z = x[:, t] @ wi + h @ wh + b
    i, f, g, o = np.split(z, 4, axis=1)
    c = sig(f) * c + sig(i) * np.tanh(g)
    h = sig(o) * np.tanh(c)
    np.testing.assert_allclose(got[:, t], h, rtol=1e-5, atol=1e-6)
