"""Model zoo for edge devices (flax linen): MLP, LeNet-5, ResNet-8/20,
MobileNetV2, LEAF's FEMNIST CNN and a character-level LSTM (LEAF's
Shakespeare model).

Constraints shared by every model, because the engine vmaps clients over their
own weights and the memory model walks layers:
  * params only: no BatchNorm or other mutable collections (GroupNorm, the
    federated-learning standard, where a norm is wanted);
  * input NHWC float32 (the MLP flattens whatever it gets), output logits
    [B, num_classes]; the character model takes int32 tokens [B, T] and
    gives logits [B, T, num_classes];
  * only layers the memory model knows (nn.Dense, nn.Conv, nn.GroupNorm,
    nn.Embed, and ``LSTM`` below, a whole recurrent layer in one call), so
    ``nn.intercept_methods`` sees every layer;
  * submodules are named ``layerNN_<kind>`` in forward order, so the
    (alphabetical) flattening order of the params dict is forward order.

Convolutions take ``conv_impl``: 'xla' (lax.conv_general_dilated) or 'im2col'
(explicit shifted slices + one matmul, passed to nn.Conv as its
``conv_general_dilated``, so the module and its params are unchanged). On
CPU, vmapping per-client weights turns XLA convolutions into grouped
convolutions, which are slow; im2col turns them into batched matmuls. See
experiments/benchmarks/conv_paths.py for the measurements behind the default.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

MODELS = ("mlp", "lenet5", "resnet8", "resnet20", "mobilenetv2",
          "femnist_cnn", "char_lstm")
CONV_IMPLS = ("auto", "xla", "im2col")


def im2col_conv(lhs, rhs, window_strides, padding, lhs_dilation=None,
                rhs_dilation=None, dimension_numbers=None,
                feature_group_count=1, precision=None,
                preferred_element_type=None):
  """Drop-in for ``lax.conv_general_dilated`` (NHWC, HWIO) as im2col + matmul.

  Supports what the zoo uses: 2-D, any strides and padding, groups
  (depthwise included), no dilation; anything else falls back to XLA.

  Args:
    lhs: [B, H, W, C] input.
    rhs: [kh, kw, C / groups, O] kernel.
    window_strides: (sh, sw).
    padding: 'SAME', 'VALID' or [(lo, hi), (lo, hi)].
    lhs_dilation, rhs_dilation, dimension_numbers, precision,
      preferred_element_type: as in lax.conv_general_dilated.
    feature_group_count: groups G; C and O must be divisible by G.

  Returns:
    [B, H', W', O] output, equal to the XLA convolution up to float rounding.
  """
  dn = lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
  plain = all(d in (None, 1) for d in (*(lhs_dilation or ()),
                                       *(rhs_dilation or ())))
  nhwc = dn == lax.conv_dimension_numbers(lhs.shape, rhs.shape,
                                          ("NHWC", "HWIO", "NHWC"))
  if not (plain and nhwc and lhs.ndim == 4):
    return lax.conv_general_dilated(
        lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
        dimension_numbers, feature_group_count, precision=precision,
        preferred_element_type=preferred_element_type)
  kh, kw, cg, o = rhs.shape
  sh, sw = window_strides
  if isinstance(padding, str):
    padding = lax.padtype_to_pads(lhs.shape[1:3], (kh, kw), (sh, sw), padding)
  (pt, pb), (pl, pr) = padding
  x = jnp.pad(lhs, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
  ho = (x.shape[1] - kh) // sh + 1
  wo = (x.shape[2] - kw) // sw + 1
  cols = [x[:, i:i + sh * (ho - 1) + 1:sh, j:j + sw * (wo - 1) + 1:sw, :]
          for i in range(kh) for j in range(kw)]
  g = feature_group_count
  if g == 1:
    patches = jnp.concatenate(cols, axis=-1)  # [B, ho, wo, kh*kw*C]
    return jnp.dot(patches, rhs.reshape(kh * kw * cg, o), precision=precision,
                   preferred_element_type=preferred_element_type)
  p = jnp.stack(cols, axis=3)  # [B, ho, wo, kh*kw, C]
  p = p.reshape(*p.shape[:4], g, cg)
  k = rhs.reshape(kh * kw, cg, g, o // g)
  y = jnp.einsum("bhwkgc,kcgo->bhwgo", p, k, precision=precision,
                 preferred_element_type=preferred_element_type)
  return y.reshape(*y.shape[:3], o)


def resolve_conv_impl(conv_impl: str) -> str:
  """Maps 'auto' to the measured-fastest exact path for the current backend.

  On CPU im2col wins for the vmapped per-client path the engine uses
  (experiments/benchmarks/conv_paths.py); on accelerators the vendor
  convolution kernels are the safer default.
  """
  if conv_impl not in CONV_IMPLS:
    raise ValueError(f"conv_impl: unknown {conv_impl!r}; valid: "
                     f"{list(CONV_IMPLS)}")
  if conv_impl == "auto":
    return "im2col" if jax.default_backend() == "cpu" else "xla"
  return conv_impl


def _groups(channels: int, max_groups: int = 8) -> int:
  return max(g for g in range(1, max_groups + 1) if channels % g == 0)


class _Namer:
  """Hands out ``layerNN_kind`` names in call (= forward) order."""

  def __init__(self):
    self._n = itertools.count()

  def __call__(self, kind: str) -> str:
    i = next(self._n)
    if i >= 100:
      raise ValueError("models: more than 100 layers would break the "
                       "two-digit name order")
    return f"layer{i:02d}_{kind}"


def _conv(name: Callable[[str], str], impl: str, features: int,
          kernel: int, stride: int = 1, groups: int = 1,
          use_bias: bool = True) -> nn.Conv:
  fn = im2col_conv if resolve_conv_impl(impl) == "im2col" else None
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride),
                 padding="SAME", feature_group_count=groups,
                 use_bias=use_bias, conv_general_dilated=fn,
                 name=name("conv"))


def _norm(name: Callable[[str], str], kind: str, channels: int
          ) -> Callable[[jnp.ndarray], jnp.ndarray]:
  if kind == "group":
    return nn.GroupNorm(num_groups=_groups(channels), name=name("norm"))
  if kind == "none":
    return lambda x: x
  raise ValueError(f"norm: unknown {kind!r}; valid: ['group', 'none']")


class MLP(nn.Module):
  """Multilayer perceptron on flattened input (default 784-200-200-10)."""

  num_classes: int = 10
  hidden: Sequence[int] = (200, 200)

  @nn.compact
  def __call__(self, x):
    name = _Namer()
    x = x.reshape((x.shape[0], -1))
    for h in self.hidden:
      x = nn.relu(nn.Dense(h, name=name("dense"))(x))
    return nn.Dense(self.num_classes, name=name("dense"))(x)


class LeNet5(nn.Module):
  """LeNet-5 style CNN: conv6-pool-conv16-pool-120-84-classes ('SAME' convs)."""

  num_classes: int = 10
  conv_impl: str = "auto"

  @nn.compact
  def __call__(self, x):
    name = _Namer()
    x = nn.relu(_conv(name, self.conv_impl, 6, 5)(x))
    x = nn.max_pool(x, (2, 2), (2, 2))
    x = nn.relu(_conv(name, self.conv_impl, 16, 5)(x))
    x = nn.max_pool(x, (2, 2), (2, 2))
    x = x.reshape((x.shape[0], -1))
    x = nn.relu(nn.Dense(120, name=name("dense"))(x))
    x = nn.relu(nn.Dense(84, name=name("dense"))(x))
    return nn.Dense(self.num_classes, name=name("dense"))(x)


class ResNet(nn.Module):
  """CIFAR-style ResNet (He et al. 2016): depth = 6n + 2, stages 16/32/64.

  Basic blocks with GroupNorm and 1x1 projection shortcuts where the shape
  changes; global average pooling; one dense head.
  """

  num_classes: int = 10
  depth: int = 20
  width: int = 16
  norm: str = "group"
  conv_impl: str = "auto"

  @nn.compact
  def __call__(self, x):
    if self.depth < 8 or (self.depth - 2) % 6:
      raise ValueError(f"depth must be 6n + 2 with n >= 1 (8, 14, 20, ...), "
                       f"got {self.depth}")
    name, impl = _Namer(), self.conv_impl
    n = (self.depth - 2) // 6
    x = _conv(name, impl, self.width, 3, use_bias=False)(x)
    x = nn.relu(_norm(name, self.norm, self.width)(x))
    for stage in range(3):
      c = self.width * 2 ** stage
      for b in range(n):
        stride = 2 if stage > 0 and b == 0 else 1
        y = _conv(name, impl, c, 3, stride, use_bias=False)(x)
        y = nn.relu(_norm(name, self.norm, c)(y))
        y = _conv(name, impl, c, 3, use_bias=False)(y)
        y = _norm(name, self.norm, c)(y)
        if stride != 1 or x.shape[-1] != c:
          x = _conv(name, impl, c, 1, stride, use_bias=False)(x)
        x = nn.relu(x + y)
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.num_classes, name=name("dense"))(x)


class MobileNetV2(nn.Module):
  """Small MobileNetV2 (Sandler et al. 2018) for 32x32 / 28x28 inputs.

  Inverted residual blocks (1x1 expand, 3x3 depthwise via
  ``feature_group_count``, 1x1 linear projection) with ReLU6 and GroupNorm.
  ``blocks`` rows are (expansion t, channels c, repeats n, first stride s),
  scaled by ``width_mult``; the default is a shortened CIFAR variant.
  """

  num_classes: int = 10
  width_mult: float = 0.5
  blocks: Sequence[tuple[int, int, int, int]] = (
      (1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 2, 2), (6, 64, 2, 2),
      (6, 96, 1, 1))
  stem: int = 32
  head: int = 256
  norm: str = "group"
  conv_impl: str = "auto"

  @nn.compact
  def __call__(self, x):
    name, impl = _Namer(), self.conv_impl
    ch = lambda c: max(8, int(round(c * self.width_mult / 8)) * 8)
    c_in = ch(self.stem)
    x = _conv(name, impl, c_in, 3, use_bias=False)(x)
    x = nn.relu6(_norm(name, self.norm, c_in)(x))
    for t, c, n, s in self.blocks:
      c_out = ch(c)
      for i in range(n):
        stride = s if i == 0 else 1
        hidden = c_in * t
        y = x
        if t != 1:
          y = _conv(name, impl, hidden, 1, use_bias=False)(y)
          y = nn.relu6(_norm(name, self.norm, hidden)(y))
        y = _conv(name, impl, hidden, 3, stride, groups=hidden,
                  use_bias=False)(y)
        y = nn.relu6(_norm(name, self.norm, hidden)(y))
        y = _conv(name, impl, c_out, 1, use_bias=False)(y)
        y = _norm(name, self.norm, c_out)(y)
        x = x + y if stride == 1 and c_in == c_out else y
        c_in = c_out
    x = _conv(name, impl, ch(self.head), 1, use_bias=False)(x)
    x = nn.relu6(_norm(name, self.norm, ch(self.head))(x))
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.num_classes, name=name("dense"))(x)


class FemnistCNN(nn.Module):
  """LEAF's FEMNIST CNN (models/femnist/cnn.py): conv 5x5 32 - pool -
  conv 5x5 64 - pool - dense 2048 - classes; 'SAME' convs, ReLU, 2x2 max
  pools (stride 2). 6,603,710 parameters for 62 classes on 28x28x1."""

  num_classes: int = 62
  dense: int = 2048
  conv_impl: str = "auto"

  @nn.compact
  def __call__(self, x):
    name = _Namer()
    x = nn.relu(_conv(name, self.conv_impl, 32, 5)(x))
    x = nn.max_pool(x, (2, 2), (2, 2))
    x = nn.relu(_conv(name, self.conv_impl, 64, 5)(x))
    x = nn.max_pool(x, (2, 2), (2, 2))
    x = x.reshape((x.shape[0], -1))
    x = nn.relu(nn.Dense(self.dense, name=name("dense"))(x))
    return nn.Dense(self.num_classes, name=name("dense"))(x)


def _lstm_bias(key, shape, dtype=jnp.float32):
  """Zeros, with the forget gate's quarter at 1 (TF's BasicLSTMCell, which
  LEAF's model uses, adds forget_bias=1 to the forget gate)."""
  del key
  h = shape[0] // 4
  return jnp.zeros(shape, dtype).at[h:2 * h].set(1.0)


class LSTM(nn.Module):
  """One LSTM layer over a whole sequence: [B, T, D] -> [B, T, H].

  Gates ``[i, f, g, o] = x_t W_i + h_{t-1} W_h + b`` (``kernel_i`` [D, 4H],
  ``kernel_h`` [H, 4H], ``bias`` [4H]); ``c_t = s(f) c_{t-1} + s(i)
  tanh(g)``, ``h_t = s(o) tanh(c_t)``, from zero state. The time loop is a
  ``lax.scan`` inside this one module call, so the memory model sees the
  layer as a unit (``search.groups`` kind 'recurrent').
  """

  features: int

  @nn.compact
  def __call__(self, x):
    h = self.features
    kernel_i = self.param("kernel_i", nn.initializers.lecun_normal(),
                          (x.shape[-1], 4 * h))
    kernel_h = self.param("kernel_h", nn.initializers.orthogonal(),
                          (h, 4 * h))
    bias = self.param("bias", _lstm_bias, (4 * h,))
    z_in = jnp.dot(x, kernel_i) + bias  # [B, T, 4H], all steps at once.

    def step(carry, z_t):
      c, prev = carry
      i, f, g, o = jnp.split(z_t + jnp.dot(prev, kernel_h), 4, axis=-1)
      c = nn.sigmoid(f) * c + nn.sigmoid(i) * jnp.tanh(g)
      out = nn.sigmoid(o) * jnp.tanh(c)
      return (c, out), out

    zero = jnp.zeros(x.shape[:1] + (h,), z_in.dtype)
    _, outs = lax.scan(step, (zero, zero), jnp.swapaxes(z_in, 0, 1))
    return jnp.swapaxes(outs, 0, 1)


class CharLSTM(nn.Module):
  """Character-level language model (LEAF's Shakespeare model, McMahan et
  al. 2017): embedding 8, ``layers`` LSTMs of ``hidden`` units, a dense
  layer to the vocabulary at every position. Tokens [B, T] int32 in
  [0, vocab_size) -> logits [B, T, num_classes]; the vocabulary is the
  classes unless ``vocab_size`` is given. 818,932 parameters for 84
  classes with the defaults."""

  num_classes: int = 84
  embed_dim: int = 8
  hidden: int = 256
  layers: int = 2
  vocab_size: int | None = None

  @nn.compact
  def __call__(self, x):
    if not jnp.issubdtype(x.dtype, jnp.integer):
      raise ValueError(f"char_lstm takes integer tokens [B, T], got "
                       f"{x.dtype} of shape {x.shape}")
    if x.ndim != 2:
      raise ValueError(f"char_lstm takes tokens [B, T], got shape {x.shape}")
    name = _Namer()
    x = nn.Embed(self.vocab_size or self.num_classes, self.embed_dim,
                 name=name("embed"))(x)
    for _ in range(self.layers):
      x = LSTM(self.hidden, name=name("lstm"))(x)
    return nn.Dense(self.num_classes, name=name("dense"))(x)


_REGISTRY: dict[str, tuple[type[nn.Module], dict[str, Any]]] = {
    "mlp": (MLP, {}),
    "lenet5": (LeNet5, {}),
    "resnet8": (ResNet, {"depth": 8}),
    "resnet20": (ResNet, {"depth": 20}),
    "mobilenetv2": (MobileNetV2, {}),
    "femnist_cnn": (FemnistCNN, {}),
    "char_lstm": (CharLSTM, {}),
}


def get_model(name: str, num_classes: int, **kwargs) -> nn.Module:
  """Builds a zoo model by name.

  Args:
    name: one of MODELS ('mlp', 'lenet5', 'resnet8', 'resnet20',
      'mobilenetv2', 'femnist_cnn', 'char_lstm').
    num_classes: output logits.
    **kwargs: fields of the model class (e.g. ``hidden`` for mlp and
      char_lstm, ``conv_impl`` / ``norm`` for the CNNs, ``width_mult`` for
      mobilenetv2, ``embed_dim`` / ``layers`` for char_lstm).

  Returns:
    An unbound flax module mapping [B, H, W, C] float32 to [B, num_classes]
    (char_lstm: [B, T] int32 tokens to [B, T, num_classes]).
  """
  if name not in _REGISTRY:
    raise ValueError(f"model: unknown {name!r}; valid: {list(MODELS)}")
  if not isinstance(num_classes, int) or num_classes < 1:
    raise ValueError(f"num_classes must be an integer >= 1, got "
                     f"{num_classes!r}")
  cls, fixed = _REGISTRY[name]
  fields = {f.name for f in dataclasses.fields(cls)} - {
      "parent", "name", "num_classes", *fixed}
  unknown = set(kwargs) - fields
  if unknown:
    raise ValueError(f"model {name!r}: unknown options {sorted(unknown)}; "
                     f"valid: {sorted(fields)}")
  if "conv_impl" in kwargs:
    resolve_conv_impl(kwargs["conv_impl"])
  if "norm" in kwargs and kwargs["norm"] not in ("group", "none"):
    raise ValueError(f"norm: unknown {kwargs['norm']!r}; valid: "
                     "['group', 'none']")
  return cls(num_classes=num_classes, **fixed, **kwargs)
