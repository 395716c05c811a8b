"""Analytic memory model: hand-computed numbers and a check against XLA."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ftte_jax import models
from ftte_jax.core.client import make_client_optimizer
from ftte_jax.search import groups
from ftte_jax.search import memory

SGD, MOMENTUM, ADAM = optax.sgd(0.1), optax.sgd(0.1, 0.9), optax.adam(1e-3)


class _MLP(nn.Module):
  """4 -> 3 -> 2: 15 + 8 = 23 parameters."""

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(3)(x))
    return nn.Dense(2)(x)


class _CNN(nn.Module):
  """Conv 3x3 (1 -> 2, SAME) on 4x4, then Dense 32 -> 3: 20 + 99 params."""

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(2, (3, 3))(x))
    return nn.Dense(3)(x.reshape(x.shape[0], -1))


def _setup(model, shape, fractions=(1.0,)):
  params = jax.eval_shape(model.init, jax.random.key(0),
                          jnp.zeros(shape))["params"]
  info = groups.analyze(model, params, shape)
  return params, info, groups.make_groups(info, fractions)


def _mask(spec, params, **levels):
  lv = np.zeros(spec.num_tensors, np.int64)
  for name, k in levels.items():
    lv[spec.paths.index(tuple(name.split("__")))] = k
  return groups.levels_to_mask(spec, params, lv)


def test_mlp_frozen_weights_in_flash_hand_computed():
  # Same MLP (23 params, batch 5). With frozen weights in flash, RAM holds
  # only the trained weights: Dense_1 bias (2 params) -> RAM weights 8,
  # grads 8, no slots, stored 40, workspace 100: total 156; flash holds the
  # other 21 params: 84 bytes.
  params, info, spec = _setup(_MLP(), (1, 4))
  mask = _mask(spec, params, Dense_1__bias=1)
  m = memory.training_memory(info, spec, params, mask, 5, SGD, "flash")
  assert m == {"weights": 8.0, "gradients": 8.0, "optimizer_state": 0.0,
               "gradient_accumulator": 0.0, "activations_stored": 40.0,
               "workspace": 100.0, "activations": 140.0, "total": 156.0,
               "flash": 84.0}
  # Dense_1 kernel+bias (8 params), adam: weights 32, grads 32, slots 64,
  # stored 4*5*(3 + 2) = 100, workspace 100: 328; flash 4*15 = 60.
  mask = _mask(spec, params, Dense_1__kernel=1, Dense_1__bias=1)
  m = memory.training_memory(info, spec, params, mask, 5, ADAM, "flash")
  assert (m["total"], m["flash"]) == (328.0, 60.0)
  # Full training: every weight is in RAM, nothing in flash, same as 'ram'.
  ones = jax.tree.map(lambda p: np.ones(p.shape), params)
  assert (memory.training_memory(info, spec, params, ones, 5, MOMENTUM, "flash")
          == memory.training_memory(info, spec, params, ones, 5, MOMENTUM))
  with pytest.raises(ValueError, match="frozen_weights"):
    memory.training_memory(info, spec, params, ones, 5, SGD, "disk")


def test_mlp_micro_batches_hand_computed():
  # Batch 4, Dense_1 kernel+bias (8 params), SGD, frozen weights in RAM.
  # Earliest layer 1 with its input: stored 2 logits + 3 inputs = 5 per
  # example; workspace 4*max(7, b*5) for a batch of b.
  # One batch of 4: 92 + 32 + stored 4*4*5 + workspace 4*20 = 284.
  # Two micro-batches of 2: activations halve (40 + 4*max(7, 10) = 40) and
  # an accumulator of the 8 trained params (32) is added: 236.
  params, info, spec = _setup(_MLP(), (1, 4))
  mask = _mask(spec, params, Dense_1__kernel=1, Dense_1__bias=1)
  one = memory.training_memory(info, spec, params, mask, 4, SGD)
  two = memory.training_memory(info, spec, params, mask, 4, SGD,
                               micro_batches=2)
  assert (one["activations"], one["gradient_accumulator"], one["total"]) == (
      160.0, 0.0, 284.0)
  assert (two["activations_stored"], two["workspace"],
          two["gradient_accumulator"], two["total"]) == (40.0, 40.0, 32.0,
                                                         236.0)
  with pytest.raises(ValueError, match="micro_batches"):
    memory.training_memory(info, spec, params, mask, 4, SGD, micro_batches=3)


def test_mlp_hand_computed():
  # in/out per example: layer0 4/3, layer1 3/2. Batch 5, 4 bytes.
  # weights 4*23 = 92; pairs in+out p = [7, 5]; workspace by earliest
  # trained layer e: e=0: 4*5*7 = 140; e=1: 4*max(7, 5*5) = 100; none: 4*7.
  params, info, spec = _setup(_MLP(), (1, 4))
  mem = lambda m, opt: memory.training_memory(info, spec, params, m, 5, opt)
  # Dense_1 bias only: earliest layer 1, no input: stored = logits 2.
  m = mem(_mask(spec, params, Dense_1__bias=1), SGD)
  assert m == {"weights": 92.0, "gradients": 8.0, "optimizer_state": 0.0,
               "gradient_accumulator": 0.0, "activations_stored": 40.0,
               "workspace": 100.0, "activations": 140.0, "total": 240.0,
               "flash": 0.0}
  # Dense_1 kernel+bias, adam: stored = in1 3 + logits 2.
  m = mem(_mask(spec, params, Dense_1__kernel=1, Dense_1__bias=1), ADAM)
  assert (m["gradients"], m["optimizer_state"], m["activations_stored"],
          m["total"]) == (32.0, 64.0, 100.0, 388.0)
  # Everything, momentum: stored = in0 4 + in1 3 + logits 2.
  ones = jax.tree.map(lambda p: np.ones(p.shape), params)
  m = mem(ones, MOMENTUM)
  assert (m["gradients"], m["optimizer_state"], m["activations_stored"],
          m["total"]) == (92.0, 92.0, 180.0, 596.0)
  # Dense_0 bias only: earliest 0 but no input: stored = in1 3 + logits 2.
  m = mem(_mask(spec, params, Dense_0__bias=1), SGD)
  assert (m["activations_stored"], m["total"]) == (100.0, 344.0)
  # Nothing trains: weights + one example's workspace.
  assert mem(jax.tree.map(lambda p: np.zeros(p.shape), params),
             SGD)["total"] == 120.0

  flops = lambda m: memory.training_flops(info, spec, params, m)
  # forward 2*12 + 3 + 2*6 + 2 = 41.
  assert flops(_mask(spec, params)) == 41.0
  assert flops(_mask(spec, params, Dense_1__bias=1)) == 43.0
  # + input grad of layer 1 (12) + weight grads 2*12 + 3 + 2*6 + 2.
  assert flops(ones) == 94.0


def test_cnn_hand_computed():
  # conv: in 16, out 32, MACs 32*9; dense: in 32, out 3. Batch 2.
  # weights 4*119 = 476; workspace 4*2*max(16+32, 32+3) = 384.
  params, info, spec = _setup(_CNN(), (1, 4, 4, 1), (0.5, 1.0))
  assert [l.macs for l in info.layers] == [288, 96]
  half_kernel = _mask(spec, params, Conv_0__kernel=1)  # 1 of 2 channels.
  m = memory.training_memory(info, spec, params, half_kernel, 2, SGD)
  # grads 4*9; stored = in0 16 + in1 32 + logits 3 = 51 -> 4*2*51.
  assert (m["gradients"], m["activations_stored"], m["total"]) == (
      36.0, 408.0, 1304.0)
  # forward 2*288 + 32 + 2*96 + 3 = 803; input grad of dense 192;
  # weight grad of half the conv kernel 288.
  assert memory.training_flops(info, spec, params, half_kernel) == 1283.0
  # A non-prefix mask charges whole channels: one entry of channel 1.
  odd = jax.tree.map(lambda p: np.zeros(p.shape), params)
  odd["Conv_0"]["kernel"][0, 0, 0, 1] = 1
  assert memory.training_memory(info, spec, params, odd, 2, SGD) == m


def test_bad_inputs():
  params, info, spec = _setup(_MLP(), (1, 4))
  ones = jax.tree.map(lambda p: np.ones(p.shape), params)
  with pytest.raises(TypeError, match="optimizer"):
    memory.training_memory(info, spec, params, ones, 5, "sgd")
  with pytest.raises(ValueError, match="batch_size"):
    memory.training_memory(info, spec, params, ones, 0, SGD)


def test_optimizer_slots_from_optax_state():
  params, _, spec = _setup(_MLP(), (1, 4))
  slots = lambda tx: memory.optimizer_slots(tx, params)
  assert [slots(SGD), slots(MOMENTUM), slots(ADAM)] == [0, 1, 2]
  assert slots(make_client_optimizer(0.1)) == 0
  assert slots(make_client_optimizer(0.1, momentum=0.9)) == 1
  # The spec's abstract params stand in for the real ones.
  chex.assert_trees_all_equal_shapes_and_dtypes(
      memory.abstract_params(spec), params)


def xla_ratio(model, shape, batch_size, tx):
  """Analytic full-model training memory / XLA's compiled memory."""
  params = jax.jit(model.init)(jax.random.key(0), jnp.zeros(shape))["params"]
  info = groups.analyze(model, params, shape)
  spec = groups.make_groups(info)
  ours = memory.memory_from_sizes(info, spec, spec.sizes[:, -1], batch_size,
                                  tx)["total"]
  xla = memory.xla_training_memory(model, params,
                                   (batch_size,) + tuple(shape[1:]), tx)
  return ours / xla, ours, xla


def test_full_model_memory_close_to_xla():
  ratio, ours, xla = xla_ratio(models.get_model("mlp", 10, hidden=(256, 256)),
                               (1, 784), 32, ADAM)
  print(f"analytic {ours:.0f} B, XLA {xla:.0f} B, ratio {ratio:.3f}")
  assert 0.25 < ratio < 4


class _Char(nn.Module):
  """Embed(5 -> 2), LSTM(3), Dense(5) on T=4 tokens: 10 + 72 + 20 params."""

  @nn.compact
  def __call__(self, x):
    x = nn.Embed(5, 2)(x)
    x = models.LSTM(3)(x)
    return nn.Dense(5)(x)


def _char():
  shape = jax.ShapeDtypeStruct((1, 4), jnp.int32)
  params = jax.eval_shape(_Char().init, jax.random.key(0), shape)["params"]
  info = groups.analyze(_Char(), params, jax.ShapeDtypeStruct((2, 4),
                                                              jnp.int32))
  return params, info, groups.make_groups(info)


def test_embedding_and_lstm_layers_recorded():
  _, info, spec = _char()
  assert [l.kind for l in info.layers] == ["embed", "recurrent", "linear"]
  # Embed: 4 ids -> 4x2; LSTM: 4x2 -> 4x3, MACs 4 steps x (2*12 + 3*12),
  # state 6*3*4, gate buffer 4*3*4; Dense: 4x3 -> 4x5, MACs 4 x 15.
  assert [(l.in_size, l.out_size, l.macs, l.internal, l.transient, l.steps)
          for l in info.layers] == [(4, 8, 0, 0, 0, 1),
                                    (8, 12, 240, 72, 48, 4),
                                    (12, 20, 60, 0, 0, 4)]
  assert info.num_params == 102
  # Gradients that need the layer's input: the embedding (token ids) and
  # the LSTM's input kernel; not its recurrent kernel or bias.
  needs = dict(zip(spec.paths, spec.needs_input))
  assert needs[("Embed_0", "embedding")] and needs[("LSTM_0", "kernel_i")]
  assert not needs[("LSTM_0", "kernel_h")] and not needs[("LSTM_0", "bias")]


def test_lstm_memory_hand_computed():
  # Per example: stored if layer e is the earliest = sum_{l>e} (a_l + s_l)
  # + s_e + logits 20 with a_1 = 8, s_1 = 72, a_2 = 12: e=0 112, e=1 104,
  # e=2 20. Pairs in+out(+gates): 12, 68, 32; batch 2: workspace e<=1
  # 2*68 = 136, e=2 max(68, 2*32) = 68. Weights 4*102 = 408, SGD.
  params, info, spec = _char()
  np.testing.assert_array_equal(memory.stored_after(info), [112, 104, 20])
  np.testing.assert_array_equal(memory.workspace_after(info, 2),
                                [136, 136, 68, 68])
  mem = lambda m: memory.training_memory(info, spec, params, m, 2, SGD)
  ones = jax.tree.map(lambda p: np.ones(p.shape), params)
  # All: grads 408; stored 112 + token ids 4 -> 4*2*116 = 928; 4*136.
  assert mem(ones) == {"weights": 408.0, "gradients": 408.0,
                       "optimizer_state": 0.0, "gradient_accumulator": 0.0,
                       "activations_stored": 928.0, "workspace": 544.0,
                       "activations": 1472.0, "total": 2288.0, "flash": 0.0}
  # The LSTM's bias alone still backpropagates through time: its state.
  m = mem(_mask(spec, params, LSTM_0__bias=1))
  assert (m["gradients"], m["activations_stored"], m["total"]) == (
      48.0, 832.0, 1832.0)
  # Input kernel: + the layer's input (8 per example).
  m = mem(_mask(spec, params, LSTM_0__kernel_i=1))
  assert (m["gradients"], m["activations_stored"], m["total"]) == (
      96.0, 896.0, 1944.0)
  # Recurrent kernel: its input h_{t-1} is the stored output, no more.
  m = mem(_mask(spec, params, LSTM_0__kernel_h=1))
  assert (m["gradients"], m["activations_stored"], m["total"]) == (
      144.0, 832.0, 1928.0)
  # Dense kernel only: stored 20 + its input 12; workspace 4*68.
  m = mem(_mask(spec, params, Dense_0__kernel=1))
  assert (m["gradients"], m["activations_stored"], m["workspace"],
          m["total"]) == (60.0, 256.0, 272.0, 996.0)

  flops = lambda m: memory.training_flops(info, spec, params, m)
  # Forward: LSTM 2*240 + 4 steps * 12 biases, dense 2*60 + 4*5: 668.
  assert flops(_mask(spec, params)) == 668.0
  # All: + input grads of LSTM and dense (480 + 120) + weight grads:
  # embedding 8, kernel_i 2*4*24, kernel_h 2*4*36, bias 4*12, dense
  # 2*4*15 + 4*5.
  assert flops(ones) == 668.0 + 600.0 + 8 + 192 + 288 + 48 + 120 + 20
  assert flops(_mask(spec, params, LSTM_0__bias=1)) == 668.0 + 120 + 48


def test_femnist_cnn_memory_hand_computed():
  # LEAF's FEMNIST CNN on 28x28x1, batch 10, SGD. Per example in/out:
  # conv0 784/25088, conv1 6272/12544, dense2 3136/2048, dense3 2048/62.
  # Stored if e = 0: a_1 = 25088 + 6272 (pooled input), a_2 = 12544 + 3136,
  # a_3 = 2048, logits 62: 49150, + the image 784 for conv0's kernel.
  model = models.get_model("femnist_cnn", 62)
  params, info, spec = _setup(model, (1, 28, 28, 1))
  assert [l.macs for l in info.layers] == [627_200, 10_035_200, 6_422_528,
                                           126_976]
  assert info.num_params == 6_603_710
  ones = jax.tree.map(lambda p: np.ones(p.shape), params)
  m = memory.training_memory(info, spec, params, ones, 10, SGD)
  # weights = grads = 4*6,603,710; stored 4*10*49,934; workspace
  # 4*10*(784 + 25,088).
  assert (m["weights"], m["activations_stored"], m["workspace"],
          m["total"]) == (26_414_840.0, 1_997_360.0, 1_034_880.0,
                          55_861_920.0)
  # The last layer only: 127,038 params; stored 62 + its input 2048;
  # workspace max(25,872, 10*2110).
  m = memory.training_memory(info, spec, params, _mask(
      spec, params, layer03_dense__kernel=1, layer03_dense__bias=1), 10, SGD)
  assert (m["gradients"], m["activations_stored"], m["workspace"],
          m["total"]) == (508_152.0, 84_400.0, 103_488.0, 27_110_880.0)


def test_char_lstm_memory_close_to_xla():
  model = models.get_model("char_lstm", 84, hidden=64)
  tokens = jnp.zeros((1, 80), jnp.int32)
  params = jax.jit(model.init)(jax.random.key(0), tokens)["params"]
  info = groups.analyze(model, params, jax.ShapeDtypeStruct((16, 80),
                                                            jnp.int32))
  spec = groups.make_groups(info)
  ours = memory.memory_from_sizes(info, spec, spec.sizes[:, -1], 16,
                                  SGD)["total"]
  xla = memory.xla_training_memory(model, params, (16, 80), SGD,
                                   input_dtype=np.int32, label_shape=(16, 80))
  print(f"analytic {ours:.0f} B, XLA {xla:.0f} B, ratio {ours / xla:.3f}")
  assert 0.25 < ours / xla < 4
