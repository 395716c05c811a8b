"""Analytic training memory and FLOPs of a parameter subset, from shapes.

Model (float32 everywhere, ``B`` = batch size, layers ``0..L-1`` in forward
order from ``groups.analyze``; ``in_l``/``out_l`` = elements per example of
layer ``l``'s input/output; ``e`` = the earliest layer with any trained group):

  weights      = 4 * (all parameters)  -- the whole model stays resident
                 (``frozen_weights='ram'``), or 4 * (trained parameters)
                 with ``frozen_weights='flash'``: frozen weights are read in
                 place from flash (the Tiny Training Engine's layout) and
                 reported as ``flash``, apart from the RAM ``total``.
  gradients    = 4 * (trained parameters)  -- only selected channels.
  optimizer    = slots * 4 * (trained parameters); slots: the client
                 optimizer's state per parameter (``optimizer_slots``: sgd 0,
                 momentum 1, adam 2).
  accumulator  = 4 * (trained parameters) when the local batch runs as
                 ``m > 1`` micro-batches (the running gradient sum beside
                 the micro-batch's own gradient); 0 for ``m = 1``.
  activations  = stored + workspace, where
    stored     = 4 * B * ( sum_{l > e} a_l                        (a)
                         + [a kernel/scale of layer e trains] * in_e (b)
                         + out_{L-1} )                              (c)
                 and 0 when nothing trains;
    workspace  = 4 * max( max_{l < e} p_l, B * max_{l >= e} p_l )   (d)
                 with p_l = in_l + out_l (e = L when nothing trains)

  (a) Backprop runs from the loss down to layer ``e`` only; layers before
      ``e`` store nothing. Between consecutive layers we assume one
      elementwise nonlinearity (e.g. relu) on the previous output, optionally
      followed by a size-changing op (pooling). For every layer ``l > e``,
      ``a_l = out_{l-1}`` (the nonlinearity's saved tensor, which is also
      layer l's input when sizes match, e.g. relu or reshape) plus ``in_l``
      when ``in_l != out_{l-1}`` (the pooled input, kept for layer l's
      weight gradient and the pool's backward), plus the layer's own state
      ``s_l`` (``Layer.internal``). Norm layers' saved statistics are
      O(groups) and ignored. An LSTM of H units over T steps keeps
      ``s_l = 6 H T``: per step its gates i, f, g, o, c_{t-1} and tanh(c_t),
      what backpropagation through time reads (h_{t-1} is the layer's
      output, stored as the next layer's input); every other layer 0.
      ``s_e`` counts at ``e`` too: any trained tensor of an LSTM, its bias
      alone included, needs the whole recurrence backward.
  (b) At layer ``e`` itself nothing is backpropagated further, so its input is
      needed only for a weight gradient (``dW = x^T g``, any channel fraction
      needs the whole input). A bias-only (or norm-bias-only) group needs none.
  (c) The loss keeps the logits/probabilities for its backward pass.
  (d) Transient buffers: the largest forward input+output pair (an LSTM
      adds its 4 H T gate pre-activations, ``Layer.transient``), which also
      bounds the pair of activation-gradient buffers alive during backward.
      The frozen prefix (layers before ``e``) stores nothing for backward,
      so a device runs it one example at a time and only accumulates its
      output, the batched input of layer ``e`` (as TinyTL-style on-device
      training does); its pairs are charged per example, the rest per
      batch. Non-increasing in ``e``, like ``stored``, which the exact
      search relies on.

Micro-batches: a device may run its batch of ``B`` as ``m`` micro-batches
of ``B/m`` (``m`` divides ``B``) and accumulate their gradients; the mean of
the micro-batch gradients is the batch gradient, so training, time and
FLOPs are unchanged and only memory moves: ``B`` above becomes ``B/m`` and
the accumulator is added.

FLOPs per example (what the engine uses for virtual task time):
  forward    = sum_l 2*MACs_l (+ out_l per bias, an LSTM's 4 H T; norms
               8*out_l; an embedding's lookup 0).
  input grad = sum_{l > e} 2*MACs_l (norms 8*out_l; embeddings 0).
  weight grad= per trained tensor: 2*steps_l*numel*f for kernels (f =
               trained channel fraction; ``2*MACs_l*f`` for Dense/Conv;
               steps_l: positions or sequence steps), out_l*f for biases
               (an LSTM's 4 H T f), 2*out_l*f for norm scale/bias, out_l*f
               for an embedding table (a scatter-add of its output gradient).
  Elementwise nonlinearities are not counted, an LSTM's gate functions
  (about 5 H T) included.

The earliest-layer terms (a)-(c) live in ``activation_cost``, which the
search (``knapsack``) calls too. See docs/design.md, Memory model.
"""

from __future__ import annotations

import jax
import numpy as np
import optax
from flax import traverse_util

from ftte_jax.core import client as client_lib
from ftte_jax.core.typing import PyTree
from ftte_jax.search import groups as groups_lib

BYTES = 4  # float32 weights, gradients, optimizer slots and activations.
FROZEN_PLACES = ("ram", "flash")  # where untrained weights live.
NORM_FLOPS_PER_ELEMENT = 8  # mean, variance, normalize, scale, shift.


def optimizer_slots(tx: optax.GradientTransformation, params: PyTree) -> int:
  """Per-parameter state slots of an optax optimizer: sgd 0, momentum 1, adam 2.

  Read from the abstract state ``jax.eval_shape(tx.init, params)``: its size
  over the parameters' size, floored so that scalar entries (Adam's step
  count) drop out. Any optax transformation works.

  Raises:
    TypeError: if ``tx`` is not an ``optax.GradientTransformation``.
  """
  if not isinstance(tx, optax.GradientTransformation):
    raise TypeError("optimizer must be an optax.GradientTransformation, got "
                    f"{tx!r}")
  # Not optax.tree_utils.tree_size: it calls jnp.size, which JAX deprecates
  # for the abstract (ShapeDtypeStruct) leaves used here.
  size = lambda tree: sum(leaf.size for leaf in jax.tree.leaves(tree))
  return size(jax.eval_shape(tx.init, params)) // max(size(params), 1)


def abstract_params(spec: groups_lib.GroupSpec) -> PyTree:
  """The bare params tree of ``spec`` as ``jax.ShapeDtypeStruct`` leaves."""
  return traverse_util.unflatten_dict({
      path: jax.ShapeDtypeStruct(shape, np.float32)
      for path, shape in zip(spec.paths, spec.shapes)})


def layer_arrays(info: groups_lib.ModelInfo) -> tuple[np.ndarray, np.ndarray]:
  """Per-example input and output elements of each layer ([L] int each)."""
  return (np.asarray([l.in_size for l in info.layers], np.int64),
          np.asarray([l.out_size for l in info.layers], np.int64))


def stored_after(info: groups_lib.ModelInfo) -> np.ndarray:
  """[L] per-example elements stored for backward if layer e is the earliest.

  Terms (a) + (c) of the module docstring, with layer e's own state; (b) is
  added per trained kernel.
  """
  ins, outs = layer_arrays(info)
  state = np.asarray([l.internal for l in info.layers], np.int64)
  a = ins.copy()  # a_l for l >= 1; a_0 is never used.
  a[1:] = outs[:-1] + np.where(ins[1:] != outs[:-1], ins[1:], 0)
  a = a + state
  suffix = np.concatenate([np.cumsum(a[::-1])[::-1][1:], [0]])
  return suffix + state + outs[-1]


def workspace_after(info: groups_lib.ModelInfo, batch_size: int) -> np.ndarray:
  """[L + 1] transient elements (batch included) if layer e is the earliest.

  Term (d) of the module docstring; index L means nothing trains.
  """
  ins, outs = layer_arrays(info)
  pair = ins + outs + np.asarray([l.transient for l in info.layers],
                                 np.int64)
  n = len(pair)
  out = np.zeros(n + 1, np.int64)
  for e in range(n + 1):
    prefix = int(pair[:e].max()) if e > 0 else 0
    suffix = int(pair[e:].max()) if e < n else 0
    out[e] = max(prefix, int(batch_size) * suffix)
  return out


def earliest_trained(on, tensor_layer, needs_input, num_layers: int):
  """Earliest trained layer ``e`` and whether its input must be stored.

  Works on host numpy and inside jit (array methods only).

  Args:
    on: ``[T]`` bool, tensor trains.
    tensor_layer: ``[T]`` int, layer of each tensor.
    needs_input: ``[T]`` bool, the tensor's gradient needs its layer input.
    num_layers: ``L``; ``e = L`` when nothing trains.

  Returns:
    ``(e, with_input)``: term (b) of the module docstring applies iff
    ``with_input``.
  """
  e = tensor_layer.min(initial=num_layers, where=on)
  return e, (on & needs_input & (tensor_layer == e)).any()


def activation_cost(on, tensor_layer, needs_input, stored, inputs):
  """The non-additive memory term: ``stored[e] + [with_input] * inputs[e]``.

  The one place the earliest-layer arithmetic lives; the analytic breakdown
  and the search's objective and feasibility test all call it. Works on host
  numpy and inside jit.

  Args:
    on, tensor_layer, needs_input: as in ``earliest_trained``.
    stored: ``[L]`` cost if layer ``e`` is the earliest (any unit).
    inputs: ``[L]`` cost of storing layer ``e``'s input (same unit).

  Returns:
    ``(e, cost)``; ``e = L`` and cost 0 when nothing trains.
  """
  num_layers = stored.shape[0]
  e, with_input = earliest_trained(on, tensor_layer, needs_input, num_layers)
  e_safe = e.clip(max=num_layers - 1)
  return e, (stored[e_safe] + with_input * inputs[e_safe]) * (e < num_layers)


def validated_slots(batch_size: int, spec: groups_lib.GroupSpec,
                    tx: optax.GradientTransformation,
                    frozen_weights: str = "ram", micro_batches: int = 1) -> int:
  """Validates ``batch_size``, ``tx``, ``frozen_weights`` and
  ``micro_batches``; returns ``tx``'s slots."""
  if int(batch_size) < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  if int(micro_batches) < 1 or int(batch_size) % int(micro_batches):
    raise ValueError(f"micro_batches must be a divisor of batch_size "
                     f"{batch_size}, got {micro_batches}")
  if frozen_weights not in FROZEN_PLACES:
    raise ValueError(f"frozen_weights must be one of {FROZEN_PLACES}, got "
                     f"{frozen_weights!r}")
  return optimizer_slots(tx, abstract_params(spec))


def memory_from_sizes(info: groups_lib.ModelInfo, spec: groups_lib.GroupSpec,
                      sizes: np.ndarray, batch_size: int,
                      tx: optax.GradientTransformation,
                      frozen_weights: str = "ram",
                      micro_batches: int = 1) -> dict[str, float]:
  """Memory breakdown for trained channel counts per tensor ([T] int)."""
  slots = validated_slots(batch_size, spec, tx, frozen_weights, micro_batches)
  micro = int(batch_size) // int(micro_batches)
  sizes = np.asarray(sizes, np.int64)
  per_channel = spec.numel[:, -1] // spec.sizes[:, -1]
  trained = int((per_channel * sizes).sum())
  ins, _ = layer_arrays(info)
  e, stored = activation_cost(sizes > 0, spec.layer, spec.needs_input,
                              stored_after(info), ins)
  in_ram = info.num_params if frozen_weights == "ram" else trained
  out = {
      "weights": float(BYTES * in_ram),
      "gradients": float(BYTES * trained),
      "optimizer_state": float(BYTES * slots * trained),
      "gradient_accumulator": float(BYTES * trained * (micro_batches > 1)),
      "activations_stored": float(BYTES * micro * stored),
      "workspace": float(BYTES * workspace_after(info, micro)[e]),
  }
  out["activations"] = out["activations_stored"] + out["workspace"]
  out["total"] = (out["weights"] + out["gradients"] + out["optimizer_state"]
                  + out["gradient_accumulator"] + out["activations"])
  out["flash"] = float(BYTES * (info.num_params - in_ram))
  return out


def training_memory(info: groups_lib.ModelInfo, spec: groups_lib.GroupSpec,
                    params: PyTree, mask: PyTree, batch_size: int,
                    tx: optax.GradientTransformation,
                    frozen_weights: str = "ram",
                    micro_batches: int = 1) -> dict[str, float]:
  """Peak on-device training memory (bytes) of training ``mask``.

  Args:
    info: from ``groups.analyze``.
    spec: from ``groups.make_groups`` (any fractions; the mask need not be a
      channel prefix, any selected entry charges its whole channel).
    params: parameter tree (structure only).
    mask: boolean/0-1 tree shaped like ``params``.
    batch_size: examples per local step.
    tx: the client optimizer (its state is charged per trained parameter).
    frozen_weights: 'ram' or 'flash' (module docstring, weights).
    micro_batches: the batch runs as this many micro-batches (divides
      ``batch_size``; module docstring).

  Returns:
    Dict of bytes: weights (in RAM), gradients, optimizer_state,
    gradient_accumulator, activations (= activations_stored + workspace),
    total (RAM), flash (frozen weights read from flash; 0 with 'ram').
  """
  sizes = groups_lib.mask_to_sizes(spec, params, mask)
  return memory_from_sizes(info, spec, sizes, batch_size, tx, frozen_weights,
                           micro_batches)


def _layer_flops(l: groups_lib.Layer) -> tuple[float, float]:
  """(forward, input-gradient) FLOPs per example of one layer."""
  if l.kind in ("linear", "recurrent"):
    bias = dict(l.param_shapes).get("bias")
    adds = l.steps * bias[-1] if bias else 0
    return 2.0 * l.macs + adds, 2.0 * l.macs
  if l.kind == "embed":
    return 0.0, 0.0
  return (float(NORM_FLOPS_PER_ELEMENT * l.out_size),
          float(NORM_FLOPS_PER_ELEMENT * l.out_size))


def _weight_grad_flops(l: groups_lib.Layer, name: str, shape, frac) -> float:
  """FLOPs per example of one trained tensor's gradient (a fraction
  ``frac`` of its output channels)."""
  if l.kind in ("linear", "recurrent") and name.startswith("kernel"):
    return 2.0 * l.steps * float(np.prod(shape)) * frac
  if l.kind in ("linear", "recurrent"):
    return l.steps * shape[-1] * frac
  if l.kind == "embed":
    return l.out_size * frac
  return 2.0 * l.out_size * frac


def flops_from_sizes(info: groups_lib.ModelInfo, spec: groups_lib.GroupSpec,
                     sizes: np.ndarray) -> float:
  """Training FLOPs per example for trained channel counts per tensor."""
  sizes = np.asarray(sizes, np.int64)
  per_layer = [_layer_flops(l) for l in info.layers]
  fwd = sum(f for f, _ in per_layer)
  on = sizes > 0
  e, _ = earliest_trained(on, spec.layer, spec.needs_input, len(info.layers))
  if e == len(info.layers):
    return float(fwd)
  bwd_in = sum(b for _, b in per_layer[e + 1:])
  bwd_w = 0.0
  for t in np.nonzero(on)[0]:
    bwd_w += _weight_grad_flops(info.layers[spec.layer[t]], spec.paths[t][-1],
                                spec.shapes[t],
                                sizes[t] / spec.sizes[t, -1])
  return float(fwd + bwd_in + bwd_w)


def training_flops(info: groups_lib.ModelInfo, spec: groups_lib.GroupSpec,
                   params: PyTree, mask: PyTree) -> float:
  """Training FLOPs per example (forward + backward) of training ``mask``."""
  return flops_from_sizes(info, spec,
                          groups_lib.mask_to_sizes(spec, params, mask))


def xla_training_memory(model, params: PyTree, batch_shape,
                        tx: optax.GradientTransformation,
                        input_dtype=np.float32,
                        label_shape: tuple[int, ...] | None = None) -> float:
  """XLA's compiled memory (bytes) of one full-model training step.

  The independent yardstick for the analytic model: arguments + outputs -
  aliased (donated) + temporaries from ``compile().memory_analysis()`` of a
  jitted step of ``tx`` on a batch of ``batch_shape`` (``input_dtype``;
  int32 labels of ``label_shape``, default ``batch_shape[:1]``).
  """
  x = jax.ShapeDtypeStruct(tuple(batch_shape), input_dtype)
  y = jax.ShapeDtypeStruct(tuple(label_shape or batch_shape[:1]), np.int32)

  apply_fn = lambda p, x: model.apply({"params": p}, x)

  def train_step(p, s, x, y):
    g = jax.grad(client_lib.cross_entropy, argnums=1)(apply_fn, p, x, y)
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s

  stats = jax.jit(train_step, donate_argnums=(0, 1)).lower(
      params, tx.init(params), x, y).compile().memory_analysis()
  return float(stats.argument_size_in_bytes + stats.output_size_in_bytes
               - stats.alias_size_in_bytes + stats.temp_size_in_bytes)
