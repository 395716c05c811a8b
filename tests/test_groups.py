"""Model analysis and parameter groups."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ftte_jax.search import groups


class _Net(nn.Module):

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(4, (3, 3), strides=2, padding="VALID", name="conv")(x)
    x = nn.Conv(4, (3, 3), feature_group_count=4, name="dw")(nn.relu(x))
    x = nn.GroupNorm(num_groups=2, name="gn")(x)
    x = x.reshape(x.shape[0], -1)
    return nn.Dense(2, name="head")(nn.relu(x))


def _net():
  model = _Net()
  params = jax.eval_shape(model.init, jax.random.key(0),
                          jnp.zeros((1, 9, 9, 3)))["params"]
  return model, params


def test_analyze_records_layers_in_order():
  model, params = _net()
  info = groups.analyze(model, params, (2, 9, 9, 3))
  assert [l.path for l in info.layers] == [("conv",), ("dw",), ("gn",),
                                           ("head",)]
  conv, dw, gn, head = info.layers
  assert conv.out_shape == (2, 4, 4, 4)
  assert (conv.in_size, conv.out_size, conv.macs) == (243, 64, 64 * 27)
  # Depthwise: 3x3x1 per output channel.
  assert dict(dw.param_shapes)["kernel"] == (3, 3, 1, 4)
  assert dw.macs == 64 * 9
  assert (gn.kind, gn.macs) == ("norm", 0)
  assert (head.in_size, head.macs) == (64, 128)
  assert info.num_params == (27 * 4 + 4) + (9 * 4 + 4) + 8 + (64 * 2 + 2)
  # Wrapped variables give the same layers.
  assert groups.analyze(model, {"params": params},
                        (2, 9, 9, 3)).layers == info.layers


def test_make_groups_nested_fractions():
  model, params = _net()
  info = groups.analyze(model, params, (1, 9, 9, 3))
  spec = groups.make_groups(info, groups.PAPER_FRACTIONS)
  assert spec.paths[:2] == (("conv", "kernel"), ("conv", "bias"))
  np.testing.assert_array_equal(spec.sizes[0], [0, 1, 1, 2, 4])
  np.testing.assert_array_equal(spec.valid[0], [1, 1, 0, 1, 1])
  np.testing.assert_array_equal(spec.numel[0], [0, 27, 27, 54, 108])
  head_kernel = spec.paths.index(("head", "kernel"))
  np.testing.assert_array_equal(spec.sizes[head_kernel], [0, 1, 1, 1, 2])
  assert spec.needs_input.tolist() == [1, 0, 1, 0, 1, 0, 1, 0]
  assert spec.layer.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]


def test_levels_to_mask_roundtrip():
  model, params = _net()
  info = groups.analyze(model, params, (1, 9, 9, 3))
  spec = groups.make_groups(info, (0.5, 1.0))
  levels = np.array([1, 2, 0, 0, 2, 0, 1, 1])
  mask = groups.levels_to_mask(spec, params, levels)
  assert mask["conv"]["kernel"].shape == (3, 3, 3, 4)
  np.testing.assert_array_equal(mask["conv"]["kernel"][0, 0, 0],
                                [1, 1, 0, 0])
  np.testing.assert_array_equal(
      groups.mask_to_sizes(spec, params, mask),
      spec.sizes[np.arange(8), levels])
  wrapped = groups.levels_to_mask(spec, {"params": params}, levels)
  assert set(wrapped) == {"params"}
  # Jit-compatible in the levels.
  jitted = jax.jit(lambda lv: groups.levels_to_mask(spec, params, lv))(levels)
  jax.tree.map(np.testing.assert_array_equal, jitted, mask)


class _Scale(nn.Module):

  @nn.compact
  def __call__(self, x):
    return x * self.param("s", nn.initializers.ones, (x.shape[-1],))


class _WithUnknown(nn.Module):

  @nn.compact
  def __call__(self, x):
    return nn.Dense(3)(_Scale(name="myscale")(x))


class _Shared(nn.Module):

  @nn.compact
  def __call__(self, x):
    d = nn.Dense(4)
    return d(d(x))


def test_bad_inputs():
  m = _WithUnknown()
  p = jax.eval_shape(m.init, jax.random.key(0), jnp.zeros((1, 4)))
  with pytest.raises(ValueError, match="myscale.*_Scale"):
    groups.analyze(m, p, (1, 4))
  m = _Shared()
  p = jax.eval_shape(m.init, jax.random.key(0), jnp.zeros((1, 4)))
  with pytest.raises(ValueError, match="more than once"):
    groups.analyze(m, p, (1, 4))
  model, params = _net()
  info = groups.analyze(model, params, (1, 9, 9, 3))
  for bad in [(0.5,), (1.0, 0.5), (0.0, 1.0), ()]:
    with pytest.raises(ValueError, match="channel_fractions"):
      groups.make_groups(info, bad)
