"""Model analysis and parameter groups for the subset search.

``analyze`` runs a flax (linen) model abstractly (``jax.eval_shape``) under
``flax.linen.intercept_methods`` and records every call of a known leaf layer
in forward order: its type, path, input/output shapes and parameter shapes.
That record (a ``ModelInfo``) is all the memory model (``search.memory``)
and the search (``search.knapsack``, ``search.plan``) need; nothing is
trained.

``make_groups`` turns a ``ModelInfo`` into parameter groups. Every parameter
tensor (in layer order) is split into nested output-channel fractions: the
group at fraction ``f`` is the first ``ceil(f * C)`` entries of the tensor's
last axis (output channels of Dense/Conv kernels, biases and norm scales).
Fractions are cumulative, so a tensor is trained at one *level*
``k in [0, K]`` (0 = not trained, ``k`` = the first ``sizes[k]`` channels);
the search chooses one level per tensor.

Assumptions (documented here, used by ``search.memory``):
  * The model is a chain: leaf layers run in call order, each consuming (a
    function of) the previous one's output. Residual branches are treated as
    part of that chain.
  * A recurrent layer (``models.LSTM``) is one call over the whole sequence;
    its time loop runs inside it. It records the state it keeps per example
    for backpropagation through time (``internal``) and its transient gate
    buffer (``transient``), both exact for its equations (``search.memory``).
  * Parameterless ops (activations, pooling, reshapes) are invisible to the
    interceptor; they are charged in the memory model at the size of the
    next layer's input.
  * Each parameterized module is called once (no weight sharing).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from ftte_jax import models as models_lib
from ftte_jax.core.typing import PyTree

# Layer kinds the memory model knows. ``linear``: Dense/Conv (MAC-based FLOPs,
# kernel gradient needs the layer input); ``norm``: normalization layers
# (elementwise FLOPs, scale gradient needs the normalized input); ``embed``:
# a table lookup of integer tokens (its gradient needs the token ids);
# ``recurrent``: an LSTM over a whole sequence (``models.LSTM``).
_KINDS = {
    nn.Dense: "linear",
    nn.Conv: "linear",
    nn.LayerNorm: "norm",
    nn.GroupNorm: "norm",
    nn.RMSNorm: "norm",
    nn.BatchNorm: "norm",
    nn.Embed: "embed",
    models_lib.LSTM: "recurrent",
}
# Tensors whose gradient needs the layer's stored input (weight-like); the
# others (biases, an LSTM's recurrent kernel, whose input h_{t-1} is the
# layer's own output) only need the output gradient and the layer's state.
_NEEDS_INPUT = ("kernel", "scale", "embedding", "kernel_i")
# An LSTM keeps per step and example, for backpropagation through time,
# its four gates, c_{t-1} and tanh(c_t): 6 H values (h_{t-1} is its output).
LSTM_STATE_PER_UNIT = 6
LSTM_GATES = 4
DEFAULT_FRACTIONS = (1.0,)
PAPER_FRACTIONS = (0.125, 0.25, 0.5, 1.0)


@dataclasses.dataclass(frozen=True)
class Layer:
  """One recorded leaf-layer call (static metadata, per example)."""

  index: int  # position in forward order.
  path: tuple[str, ...]  # module path, e.g. ('Conv_0',).
  type_name: str  # flax class name, e.g. 'Conv'.
  kind: str  # 'linear' or 'norm'.
  in_shape: tuple[int, ...]  # input shape, batch axis included.
  out_shape: tuple[int, ...]  # output shape, batch axis included.
  param_shapes: tuple[tuple[str, tuple[int, ...]], ...]  # (name, shape).
  in_size: int  # input elements per example.
  out_size: int  # output elements per example.
  macs: int  # multiply-accumulates per example (linear and recurrent
  #   layers; 0 for norms and embeddings).
  internal: int = 0  # elements per example the layer keeps for its own
  #   backward beyond its input and output (an LSTM's state, 6 H T).
  transient: int = 0  # elements per example alive only during its forward
  #   beyond input and output (an LSTM's gate pre-activations, 4 H T).
  steps: int = 1  # times each weight is applied per example: spatial
  #   positions (Dense/Conv), sequence steps (LSTM).


@dataclasses.dataclass(frozen=True)
class ModelInfo:
  """Forward-ordered leaf layers of a model and its parameter count."""

  layers: tuple[Layer, ...]
  num_params: int  # all parameters, trained or not.
  params_key: tuple[str, ...]  # params' prefix in the tree: () or ('params',).


def _shape_of(x) -> tuple[int, ...]:
  return tuple(int(d) for d in x.shape)


def _record_calls(model: nn.Module, variables: PyTree, example_input: Any,
                  apply_kwargs: dict) -> tuple[list, dict]:
  """Runs the model abstractly; returns its known leaf-layer calls.

  Returns:
    ``(calls, seen_types)``: ``(module, in_shape, out_shape)`` per known
    leaf-layer call in forward (call-start) order, and the type name of every
    module called, by path.
  """
  calls: list[tuple[int, Any, tuple, tuple]] = []  # (order, module, in, out)
  seen_types: dict[tuple[str, ...], str] = {}
  counter = [0]

  def interceptor(next_fun, args, kwargs, context):
    if context.method_name != "__call__":
      return next_fun(*args, **kwargs)
    order = counter[0]
    counter[0] += 1
    out = next_fun(*args, **kwargs)
    module = context.module
    path = tuple(module.path)
    seen_types.setdefault(path, type(module).__name__)
    if type(module) in _KINDS:
      if not args or not hasattr(args[0], "shape") or not hasattr(out, "shape"):
        raise ValueError(f"layer {'/'.join(path)} ({type(module).__name__}): "
                         "expected one array input and one array output")
      calls.append((order, module, _shape_of(args[0]), _shape_of(out)))
    return out

  def fwd(v, x):
    return model.apply(v, x, **apply_kwargs)

  with nn.intercept_methods(interceptor):
    jax.eval_shape(fwd, variables, example_input)
  return [c[1:] for c in sorted(calls, key=lambda c: c[0])], seen_types


def _make_layer(index: int, module: nn.Module, in_shape: tuple,
                out_shape: tuple, param_shapes: tuple, batch: int) -> Layer:
  kind = _KINDS[type(module)]
  in_size = math.prod(in_shape) // batch
  out_size = math.prod(out_shape) // batch
  shapes = dict(param_shapes)
  kernel = shapes.get("kernel")
  macs, internal, transient, steps = 0, 0, 0, 1
  if kind == "linear" and kernel:
    steps = out_size // kernel[-1]
    macs = steps * math.prod(kernel)
  elif kind == "recurrent":
    if len(in_shape) != 3:
      raise ValueError(f"layer {'/'.join(module.path)} (LSTM): expected an "
                       f"input [B, T, D], got {in_shape}")
    steps, hidden = in_shape[1], out_shape[-1]
    macs = steps * (math.prod(shapes["kernel_i"]) +
                    math.prod(shapes["kernel_h"]))
    internal = LSTM_STATE_PER_UNIT * hidden * steps
    transient = LSTM_GATES * hidden * steps
  return Layer(index, tuple(module.path), type(module).__name__, kind,
               in_shape, out_shape, param_shapes, in_size, out_size, macs,
               internal, transient, steps)


def _check_covered(flat: dict, layers: Sequence[Layer],
                   seen_types: dict) -> None:
  """Raises on the first parameter that no known layer owns."""
  covered = {l.path + (name,) for l in layers for name, _ in l.param_shapes}
  for k in flat:
    if k not in covered:
      owner = k[:-1]
      while owner and owner not in seen_types:
        owner = owner[:-1]
      raise ValueError(
          f"parameter {'/'.join(k)} belongs to layer {'/'.join(k[:-1])} of "
          f"type {seen_types.get(owner, 'unknown')}, which the memory model "
          f"cannot analyze; known layer types: "
          f"{sorted(t.__name__ for t in _KINDS)}")


def analyze(model: nn.Module, params: PyTree, example_input: Any,
            **apply_kwargs) -> ModelInfo:
  """Records the model's leaf-layer calls abstractly (no FLOPs are spent).

  Args:
    model: a flax linen module whose ``apply(variables, x, **apply_kwargs)``
      runs the forward pass.
    params: the parameter tree, either ``{'params': ...}`` (flax variables) or
      the bare params collection. Only shapes are read.
    example_input: an array, ``jax.ShapeDtypeStruct`` or shape tuple (float32)
      with a leading batch axis (int32 tokens for a model that embeds
      them).
    **apply_kwargs: forwarded to ``model.apply`` (e.g. ``train=False``).

  Returns:
    A ``ModelInfo`` with layers in forward order.

  Raises:
    ValueError: if a parameter belongs to a layer type the memory model cannot
      analyze (naming its path and type), or a layer is called twice.
  """
  if isinstance(example_input, (tuple, list)):
    example_input = jax.ShapeDtypeStruct(tuple(example_input), jnp.float32)
  has_key = isinstance(params, dict) and "params" in params
  variables = params if has_key else {"params": params}
  calls, seen_types = _record_calls(model, variables, example_input,
                                    apply_kwargs)
  # Sorted: the order jax flattens the params in.
  flat = dict(sorted(traverse_util.flatten_dict(variables["params"]).items()))
  layers = []
  for module, in_shape, out_shape in calls:
    path = tuple(module.path)
    if path in {l.path for l in layers}:
      raise ValueError(f"layer {'/'.join(path)} ({type(module).__name__}) is "
                       "called more than once; weight sharing is not supported")
    pshapes = tuple((k[-1], _shape_of(v)) for k, v in flat.items()
                    if k[:-1] == path)
    layers.append(_make_layer(len(layers), module, in_shape, out_shape,
                              pshapes, int(example_input.shape[0])))
  _check_covered(flat, layers, seen_types)
  num_params = int(sum(math.prod(v.shape) for v in flat.values()))
  return ModelInfo(tuple(layers), num_params, ("params",) if has_key else ())


@dataclasses.dataclass(frozen=True)
class GroupSpec:
  """Parameter tensors in layer order, each with nested channel levels.

  Level ``k`` of tensor ``t`` trains its first ``sizes[t, k]`` output channels
  (level 0: none). Arrays are numpy (host, static metadata).
  """

  paths: tuple[tuple[str, ...], ...]  # [T] path of each tensor in the params.
  shapes: tuple[tuple[int, ...], ...]  # [T] tensor shapes.
  fractions: tuple[float, ...]  # [K] channel fractions, ascending, last 1.0.
  layer: np.ndarray  # [T] int: forward index of the tensor's layer.
  needs_input: np.ndarray  # [T] bool: gradient needs the layer input.
  sizes: np.ndarray  # [T, K+1] int: channels trained at each level.
  numel: np.ndarray  # [T, K+1] int: parameters trained at each level.
  valid: np.ndarray  # [T, K+1] bool: level is distinct from lower levels.
  params_key: tuple[str, ...]  # prefix of params in the tree.

  @property
  def num_tensors(self) -> int:
    return len(self.paths)

  @property
  def num_groups(self) -> int:
    """Distinct (tensor, fraction) groups."""
    return int(self.valid[:, 1:].sum())


def make_groups(info: ModelInfo,
                channel_fractions: Sequence[float] = DEFAULT_FRACTIONS
                ) -> GroupSpec:
  """Splits each parameter tensor into nested output-channel groups.

  Args:
    info: from ``analyze``.
    channel_fractions: ascending fractions in (0, 1], ending with 1.0, e.g.
      ``(1.0,)`` (whole tensors) or ``PAPER_FRACTIONS``.

  Returns:
    A ``GroupSpec``; tensors ordered by layer, then kernel/scale before bias.
  """
  fr = tuple(float(f) for f in channel_fractions)
  if (not fr or fr[-1] != 1.0 or any(not 0 < f <= 1 for f in fr)
      or any(a >= b for a, b in zip(fr, fr[1:]))):
    raise ValueError("channel_fractions must be strictly ascending values in "
                     f"(0, 1] ending with 1.0, got {channel_fractions}")
  paths, shapes, layer, needs, sizes, numel = [], [], [], [], [], []
  for l in info.layers:
    for name, shape in sorted(l.param_shapes,
                              key=lambda p: p[0] not in _NEEDS_INPUT):
      c = shape[-1]
      per_channel = math.prod(shape[:-1])
      s = [0] + [max(1, math.ceil(f * c)) for f in fr]
      paths.append(l.path + (name,))
      shapes.append(shape)
      layer.append(l.index)
      needs.append(name in _NEEDS_INPUT)
      sizes.append(s)
      numel.append([per_channel * x for x in s])
  sizes_a = np.asarray(sizes, np.int64).reshape(-1, len(fr) + 1)
  valid = np.ones_like(sizes_a, bool)
  valid[:, 1:] = sizes_a[:, 1:] > sizes_a[:, :-1]
  return GroupSpec(tuple(paths), tuple(shapes), fr,
                   np.asarray(layer, np.int64), np.asarray(needs, bool),
                   sizes_a, np.asarray(numel, np.int64).reshape(sizes_a.shape),
                   valid, info.params_key)


def _bare(tree: PyTree) -> PyTree:
  """The params collection of a tree given bare or as flax variables."""
  return tree["params"] if isinstance(tree, dict) and "params" in tree \
      else tree


def flat_params(tree: PyTree) -> dict[tuple[str, ...], Any]:
  """``{path: leaf}`` of a params-shaped tree (bare or flax variables).

  Either form is accepted whatever ``analyze`` was given; paths match
  ``GroupSpec.paths``.
  """
  return traverse_util.flatten_dict(_bare(tree))


def levels_to_mask(spec: GroupSpec, params: PyTree, levels) -> PyTree:
  """Boolean mask tree shaped like ``params`` for one level per tensor.

  Jit-compatible in ``levels`` ([T] int); ``params`` supplies the tree
  structure (shapes only). Returns the same nesting as ``params``.
  """
  levels = jnp.asarray(levels)
  sizes = jnp.asarray(spec.sizes)
  bare = _bare(params)
  index = {p: t for t, p in enumerate(spec.paths)}

  def leaf(path, x):
    n = sizes[index[path], levels[index[path]]]
    return jnp.broadcast_to(jnp.arange(x.shape[-1]) < n, x.shape)

  mask = traverse_util.unflatten_dict(
      {path: leaf(path, x) for path, x in flat_params(bare).items()})
  return mask if bare is params else {"params": mask}


def mask_to_sizes(spec: GroupSpec, params: PyTree, mask: PyTree) -> np.ndarray:
  """Channels trained per tensor for an arbitrary mask ([T] int, host).

  A channel counts as trained if any of its entries is selected; the memory
  model charges whole channels.
  """
  flat = flat_params(mask)
  out = np.zeros(spec.num_tensors, np.int64)
  for t, p in enumerate(spec.paths):
    m = np.asarray(flat[p]).astype(bool)
    m = np.broadcast_to(m, spec.shapes[t]).reshape(-1, spec.shapes[t][-1])
    out[t] = int(m.any(axis=0).sum())
  return out
