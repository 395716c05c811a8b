"""Per-device evaluation: held-out slices, the vmapped evaluation against a
plain loop, the summary statistics, and fairness across tiers."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ftte_jax import experiment
from ftte_jax.core import client as client_lib
from ftte_jax.core import losses
from ftte_jax.core import personal
from ftte_jax.data import client_data
from ftte_jax.data import datasets
from ftte_jax.data import partition
from helpers import tiny_config, tiny_model


def test_held_out_slices_never_train_even_with_repeated_examples():
  parts = [np.array([0, 1, 2, 3, 4, 5, 6, 7]), np.array([8, 8, 9, 9, 10, 11]),
           np.array([12, 13])]
  train, held = partition.split_holdout(parts, 0.25, seed=0)
  assert [len(h) for h in held] == [2, 1, 1]  # round(0.25 * 8), of 4, of 2
  for p, t, h in zip(parts, train, held):
    assert not set(t) & set(h)
    assert set(t) | set(h) == set(p)
    # Every occurrence of a held example left training.
    assert len(t) == sum(1 for i in p if i not in set(h))
  with pytest.raises(ValueError, match="holdout_fraction: client 0"):
    partition.split_holdout([np.array([3, 3])], 0.5, seed=0)


def test_loaded_holdout_shares_no_example_with_training():
  fed = datasets.load_federated(experiment.DataConfig(
      dataset="tiny", num_clients=8, partition="sampled",
      dirichlet_alpha=0.5, examples_per_client=24, holdout_fraction=0.2),
                                seed=0)
  cd, held, info = fed.train, fed.holdout, fed.info
  x, hx = np.asarray(cd.x), np.asarray(held.x)
  for i in range(8):
    train_rows = {x[r].tobytes() for r in cd.rows(i)}
    held_rows = {hx[r].tobytes() for r in held.rows(i)}
    assert held_rows and not train_rows & held_rows
  assert info.num_holdout == int(np.asarray(held.counts).sum())


def _two_devices():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(20, 6)).astype(np.float32)
  y = rng.integers(0, 4, 20).astype(np.int32)
  data = client_data.from_partition(x, y, [np.arange(0, 8), np.arange(8, 14)])
  holdout = client_data.from_partition(x, y, [np.arange(14, 17),
                                              np.arange(17, 20)])
  return data, holdout


def test_vmapped_evaluation_equals_a_plain_loop():
  apply, params = tiny_model()
  data, holdout = _two_devices()
  masks = jax.tree.map(lambda p: jnp.stack([jnp.ones_like(p),
                                            jnp.zeros_like(p)]), params)
  masks["layer1"] = jax.tree.map(lambda p: jnp.ones((2,) + p.shape),
                                 params["layer1"])
  tier = jnp.asarray([0, 1])
  task = losses.classification(apply)
  update = client_lib.sgd(task.loss, 4, optax.sgd(0.5), 3)
  evaluate = jax.jit(personal.make_personal_eval(task.metrics, update, 3,
                                                 0.25, max_holdout=3, chunk=2))
  key = jax.random.PRNGKey(7)
  scores = evaluate(key, params, masks, tier, data, holdout,
                    jnp.asarray([0, 1], jnp.int32))

  def acc(p, i):
    rows = holdout.rows(i)
    pred = np.argmax(np.asarray(apply(p, holdout.x[rows])), -1)
    return float(np.mean(pred == np.asarray(holdout.y[rows])))

  for i in range(2):
    mask = jax.tree.map(lambda m: m[i], masks)
    local = client_lib.LocalData(source=data, offset=data.offsets[i],
                                 count=data.counts[i], num_steps=jnp.int32(3))
    tuned = update(jax.random.fold_in(key, i), params, mask, local).params
    mixed = jax.tree.map(lambda t, p: 0.25 * t + 0.75 * p, tuned, params)
    want = [acc(params, i), acc(tuned, i), acc(mixed, i)]
    np.testing.assert_allclose(np.asarray(scores.accuracy[:, i]), want,
                               atol=1e-6)
    if i == 1:  # tier 1 trains only layer1: layer0 untouched.
      np.testing.assert_array_equal(tuned["layer0"]["kernel"],
                                    params["layer0"]["kernel"])


def test_zero_steps_scores_the_global_model_three_times():
  apply, params = tiny_model()
  data, holdout = _two_devices()
  masks = jax.tree.map(lambda p: jnp.ones((1,) + p.shape), params)
  task = losses.classification(apply)
  update = client_lib.sgd(task.loss, 4, optax.sgd(0.5), 1)
  scores = personal.make_personal_eval(task.metrics, update, 0, 0.5, 3)(
      jax.random.PRNGKey(0), params, masks, jnp.zeros(2, jnp.int32), data,
      holdout, jnp.asarray([0, 1], jnp.int32))
  a = np.asarray(scores.accuracy)
  np.testing.assert_array_equal(a[0], a[1])
  np.testing.assert_array_equal(a[0], a[2])


def test_summary_statistics_by_hand():
  acc = np.array([[0.1, 0.5, 0.9, 0.3, 0.7],
                  [0.2, 0.6, 1.0, 0.4, 0.8],
                  [0.0, 0.0, 0.0, 0.0, 0.0]], np.float32)
  scores = personal.PersonalScores(clients=jnp.asarray([0, 2, 3, 5, 6]),
                                   accuracy=jnp.asarray(acc))
  tier = np.array([1, 9, 0, 0, 9, 1, 1])  # evaluated: tiers 1, 0, 0, 1, 1
  out = personal.summarize(scores, tier)
  assert out["personal_devices"] == 5
  assert out["personal_global_mean"] == pytest.approx(0.5)
  assert out["personal_global_p10"] == pytest.approx(np.percentile(acc[0], 10))
  # tier 0: (0.5 + 0.9) / 2 = 0.7; tier 1: (0.1 + 0.3 + 0.7) / 3 = 0.3667.
  assert out["personal_global_worst_tier"] == 1
  assert out["personal_global_worst_tier_mean"] == pytest.approx(1.1 / 3)
  assert out["personal_tiers"][0] == pytest.approx(
      {"tier": 0, "devices": 2, "global": 0.7, "tuned": 0.8, "mixed": 0.0})


def test_sampled_devices_are_fixed_by_the_seed():
  a = personal.sample_clients(1000, 50, seed=3)
  np.testing.assert_array_equal(a, personal.sample_clients(1000, 50, seed=3))
  assert len(set(a.tolist())) == 50 and np.all(np.diff(a) > 0)
  np.testing.assert_array_equal(personal.sample_clients(7, 0, 0),
                                np.arange(7))


def test_run_reports_personal_and_tier_fairness():
  config = tiny_config("fedavg", rounds=4, eval_every=2,
                       data={"holdout_fraction": 0.25},
                       personal_eval_clients=10, personal_steps=2)
  exp = experiment.build(config)
  state, history, timing = exp.run()
  s = exp.summary(state, history, timing)
  assert all("personal_tuned_mean" in r for r in history)
  assert s["personal_devices"] == 10
  fair = s["tier_fairness"]
  assert sum(r["devices"] for r in fair) == 16
  assert sum(r["update_share"] for r in fair) == pytest.approx(1.0)
  # FedAvg trains the full model: the small tier (0.6 of full-training
  # memory) is excluded and contributes nothing.
  assert fair[0]["eligible_devices"] == 0 and fair[0]["update_share"] == 0
  assert int(np.asarray(state.client_applied).sum()) == s["client_updates"]


def test_personal_options_are_checked():
  with pytest.raises(ValueError, match="needs holdout_fraction"):
    experiment.validate(dataclasses.replace(tiny_config(),
                                            personal_eval_clients=4))
  with pytest.raises(ValueError, match="exceeds num_clients"):
    experiment.validate(tiny_config(data={"holdout_fraction": 0.2},
                                    personal_eval_clients=17))
