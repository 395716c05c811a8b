"""Tests for ftte_jax.core.losses: hand-computed losses and metrics, padding
rows and padded tokens, and agreement with the engine's classification."""

import math
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ftte_jax import models
from ftte_jax.core import client
from ftte_jax.core import engine
from ftte_jax.core import losses
from ftte_jax.data import datasets
from ftte_jax.data.config import DataConfig

sys.path.insert(0, str(Path(__file__).parent))
import natural_files  # noqa: E402  (tests/ on the path)

IDENTITY = lambda params, x: x  # x are the logits.
LN2, LN3 = math.log(2), math.log(3)


def test_classification_hand_computed_with_a_padding_row():
  task = losses.classification(IDENTITY)
  # Row 0: logits (0, 0), label 0: ln 2, a hit (argmax takes the first).
  # Row 1: logits (ln 3, 0), label 1: -ln(1/4) = ln 4, a miss.
  x = jnp.array([[0.0, 0.0], [LN3, 0.0]])
  loss, aux = task.loss(None, {"x": x, "y": jnp.array([0, 1])})
  np.testing.assert_allclose(loss, 1.5 * LN2, rtol=1e-6)
  assert aux == {}
  # A padding row (weight 0) with non-finite logits changes nothing.
  batch = {"x": jnp.array([[0.0, 0.0], [LN3, 0.0], [jnp.nan, 0.0]]),
           "y": jnp.array([0, 1, 0]), "weight": jnp.array([1.0, 1.0, 0.0])}
  m = jax.tree.map(float, task.metrics(None, batch))
  assert m["accuracy"] == (1.0, 2.0)
  np.testing.assert_allclose(m["loss"], (3 * LN2, 2.0), rtol=1e-6)


def test_sequence_hand_computed_with_padded_tokens_and_rows():
  task = losses.sequence(IDENTITY)
  x = jnp.array([
      # Row 0, every token real: (0,0)|0 ln 2 hit; (ln3,0)|0 ln 4/3 hit;
      # (0,ln3)|1 ln 4/3 hit.
      [[0.0, 0.0], [LN3, 0.0], [0.0, LN3]],
      # Row 1, last token padded: (ln3,0)|1 ln 4 miss; (0,0)|1 ln 2 miss.
      [[LN3, 0.0], [0.0, 0.0], [jnp.nan, 5.0]],
      # Row 2: a padding row (weight 0), garbage.
      [[jnp.nan, 0.0], [jnp.inf, 0.0], [0.0, 0.0]]])
  y = jnp.array([[0, 0, 1], [1, 1, 0], [0, 0, 0]])
  mask = jnp.array([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
  # Training batches hold real rows only: rows 0 and 1, 5 real tokens.
  loss, aux = task.loss(None, {"x": x[:2], "y": y[:2], "mask": mask[:2]})
  total = LN2 + 2 * math.log(4 / 3) + math.log(4) + LN2  # = 8 ln 2 - 2 ln 3
  np.testing.assert_allclose(loss, total / 5, rtol=1e-6)
  assert float(aux["tokens"]) == 5.0
  m = jax.tree.map(float, task.metrics(None, {
      "x": x, "y": y, "mask": mask, "weight": jnp.array([1.0, 1.0, 0.0])}))
  np.testing.assert_allclose(m["loss"], (8 * LN2 - 2 * LN3, 5.0), rtol=1e-6)
  assert m["accuracy"] == (3.0, 5.0)
  # Last real token: row 0's (position 2) hits, row 1's (position 1) not.
  assert m["last_token_accuracy"] == (1.0, 2.0)


def test_sequence_without_a_mask_counts_every_token():
  task = losses.sequence(IDENTITY)
  x = jnp.array([[[0.0, 0.0], [LN3, 0.0]]])
  loss, aux = task.loss(None, {"x": x, "y": jnp.array([[1, 1]])})
  np.testing.assert_allclose(loss, (LN2 + math.log(4)) / 2, rtol=1e-6)
  assert float(aux["tokens"]) == 2.0


def test_classification_equals_the_engines_loss_and_evaluation():
  model = models.get_model("mlp", 4, hidden=(8,))
  x = np.random.default_rng(0).normal(size=(10, 6)).astype(np.float32)
  y = np.arange(10, dtype=np.int32) % 4
  params = model.init(jax.random.key(0), x[:1])["params"]
  apply = lambda p, x: model.apply({"params": p}, x)
  task = losses.classification(apply)
  batch = {"x": jnp.asarray(x), "y": jnp.asarray(y)}
  ours, _ = jax.jit(task.loss)(params, batch)
  theirs = jax.jit(lambda p: client.cross_entropy(apply, p, batch["x"],
                                                  batch["y"]))(params)
  assert float(ours) == float(theirs)  # the same operations, the same bits.
  # Evaluation in batches of 4 (the last padded by 2 rows): the engine's
  # jitted evaluation against the host-side reference over batches padded
  # by hand.
  want = jax.jit(lambda p: engine.evaluate(task.metrics, 4, p, batch))(
      params)
  pad = lambda a: np.concatenate([a, np.zeros((2,) + a.shape[1:], a.dtype)])
  w = np.r_[np.ones(10), np.zeros(2)].astype(np.float32)
  padded = {"x": pad(x), "y": pad(y), "weight": w}
  batches = [{k: v[i:i + 4] for k, v in padded.items()} for i in (0, 4, 8)]
  got = losses.evaluate(jax.jit(task.metrics), params, batches)
  np.testing.assert_allclose(float(got["loss"]), float(want["test_loss"]),
                             rtol=1e-6)
  assert float(got["accuracy"]) == float(want["test_accuracy"])


def test_for_task_names():
  assert losses.for_task("sequence", IDENTITY).loss is not None
  with pytest.raises(ValueError, match="task: unknown 'ranking'"):
    losses.for_task("ranking", IDENTITY)


def test_char_lstm_learns_a_generated_corpus(tmp_path):
  """Shakespeare's path without the engine: LEAF files -> load_federated ->
  char_lstm trained with losses.sequence and optax. The test token loss
  falls and beats the unigram baseline (the entropy of the training
  characters' frequencies, measured on the test tokens)."""
  users = natural_files.shakespeare_users(6, 120, seed=0)
  natural_files.write_leaf_dataset(tmp_path, "shakespeare", users)
  fed = datasets.load_federated(DataConfig(
      dataset="shakespeare", data_dir=str(tmp_path), num_clients=6), seed=0)
  train = {k: np.asarray(v) for k, v in
           {"x": fed.train.x, "y": fed.train.y, **fed.train.extras}.items()}
  test = {**fed.test, "weight": np.ones(len(fed.test["y"]), np.float32)}
  model = models.get_model("char_lstm", fed.info.num_classes, hidden=32,
                           layers=1)
  params = model.init(jax.random.key(0), train["x"][:1])["params"]
  task = losses.sequence(lambda p, x: model.apply({"params": p}, x))
  tx = optax.adam(0.02)

  @jax.jit
  def fit(params, key):
    def step(carry, k):
      p, s = carry
      idx = jax.random.choice(k, len(train["y"]), (16,), replace=False)
      batch = {name: jnp.asarray(v)[idx] for name, v in train.items()}
      (loss, _), g = jax.value_and_grad(task.loss, has_aux=True)(p, batch)
      u, s = tx.update(g, s, p)
      return (optax.apply_updates(p, u), s), loss
    (p, _), curve = jax.lax.scan(step, (params, tx.init(params)),
                                 jax.random.split(key, 150))
    return p, curve

  metrics = jax.jit(task.metrics)
  before = losses.evaluate(metrics, params, [test])
  trained, curve = fit(params, jax.random.key(1))
  after = losses.evaluate(metrics, trained, [test])
  counts = np.bincount(train["y"][train["mask"] > 0],
                       minlength=fed.info.num_classes) + 1e-9
  unigram = -np.log(counts / counts.sum())[test["y"]].mean()
  print(f"test loss {float(before['loss']):.3f} -> {float(after['loss']):.3f}"
        f", unigram {unigram:.3f}, accuracy {float(after['accuracy']):.3f}")
  assert float(curve[-10:].mean()) < float(curve[:10].mean())
  assert float(after["loss"]) < float(before["loss"])
  assert float(after["loss"]) < unigram - 0.3
