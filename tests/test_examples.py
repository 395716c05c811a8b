"""Each example of ``examples/`` against an independent host-side reference.

The references are plain Python loops over clients (jax.grad for the local
gradients, numpy for everything else). Training is full-batch (the batch is
a client's whole shard, in any order), so the engine's batch order does not
matter, and the events come from the engine's own public phase
(``take_arrivals``) where the algorithm is asynchronous.
"""

import importlib.util
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import helpers
from ftte_jax import experiment
from ftte_jax.core import engine

REPO = Path(__file__).resolve().parents[1]
LR, STEPS, ROUNDS, N = 0.1, 2, 3, 8


def example(name):
  """The module ``examples/<name>.py``."""
  spec = importlib.util.spec_from_file_location(
      f"examples_{name}", REPO / "examples" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module
  spec.loader.exec_module(module)
  return module


def _config(algorithm="fedavg", **engine_kw):
  # 8 clients of 48 examples (tiny: 512 - 128 test); a batch is a shard.
  e = dict(buffer_size=N, local_steps=STEPS, batch_size=48, client_lr=LR,
           client_batching="map")
  e.update(engine_kw)
  return helpers.tiny_config(algorithm, engine_kw=e,
                             data=dict(num_clients=N),
                             memory_tier_fractions=(2.0,), rounds=ROUNDS)


def _shards(exp):
  data = exp.env.data
  return [(np.asarray(data.x)[data.rows(i)], np.asarray(data.y)[data.rows(i)])
          for i in range(data.num_clients)]


def _ce(apply_fn):
  return lambda w, x, y: optax.softmax_cross_entropy_with_integer_labels(
      apply_fn(w, x), y).mean()


def _local_sgd(grad, w, x, y, steps=STEPS, correction=None):
  """Plain local gradient steps; ``correction`` is added to every gradient."""
  for _ in range(steps):
    g = grad(w, x, y)
    if correction is not None:
      g = jax.tree.map(jnp.add, g, correction)
    w = jax.tree.map(lambda a, b: np.asarray(a) - LR * np.asarray(b), w, g)
  return w


def _mean(trees):
  return jax.tree.map(lambda *xs: np.mean(np.stack(xs), 0), *trees)


def _engine(config, extensions, rounds=ROUNDS):
  exp = experiment.build(config, extensions)
  state = exp.init_state()
  params0 = jax.device_get(state.params)
  for _ in range(rounds):
    state, _ = exp.step_fn(exp.env, state)
  return exp, params0, jax.device_get(state.params)


def _close(got, want):
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5,
                                                       rtol=0), got, want)


def test_fedprox_matches_a_host_loop():
  mu = 0.5
  exp, w, got = _engine(_config(), example("fedprox").fedprox(mu))
  ce = _ce(exp.setup.model.apply_fn)
  for _ in range(ROUNDS):
    prox = lambda v, x, y, w=w: ce(v, x, y) + 0.5 * mu * sum(
        jnp.sum((a - b) ** 2) for a, b in zip(jax.tree.leaves(v),
                                              jax.tree.leaves(w)))
    grad = jax.grad(prox)
    local = [_local_sgd(grad, w, x, y) for x, y in _shards(exp)]
    w = jax.tree.map(lambda p, m: p + m, w, _mean(
        [jax.tree.map(np.subtract, v, w) for v in local]))
  _close(got, w)


def test_fedyogi_matches_a_host_loop():
  lr, eps, b1, b2 = 0.05, 1e-3, 0.9, 0.99
  exp, w, got = _engine(_config(), example("fedyogi").fedyogi(lr, eps))
  grad = jax.grad(_ce(exp.setup.model.apply_fn))
  # optax's Yogi: moments start at 1e-6, Adam's bias correction.
  m = jax.tree.map(lambda p: np.full_like(p, 1e-6), w)
  v = jax.tree.map(lambda p: np.full_like(p, 1e-6), w)
  for t in range(1, ROUNDS + 1):
    local = [_local_sgd(grad, w, x, y) for x, y in _shards(exp)]
    g = jax.tree.map(np.negative, _mean(
        [jax.tree.map(np.subtract, u, w) for u in local]))
    m = jax.tree.map(lambda m, g: b1 * m + (1 - b1) * g, m, g)
    v = jax.tree.map(lambda v, g: v - (1 - b2) * np.sign(v - g * g) * g * g,
                     v, g)
    w = jax.tree.map(
        lambda w, m, v: w - lr * (m / (1 - b1 ** t)) /
        (np.sqrt(v / (1 - b2 ** t)) + eps), w, m, v)
  _close(got, w)


def test_scaffold_matches_a_host_loop():
  exp, w, got = _engine(_config(), example("scaffold").scaffold)
  grad = jax.grad(_ce(exp.setup.model.apply_fn))
  zero = jax.tree.map(np.zeros_like, w)
  c_i = [zero] * N
  for _ in range(ROUNDS):
    c = _mean(c_i)
    local, new_c = [], []
    for (x, y), ci in zip(_shards(exp), c_i):
      y_i = _local_sgd(grad, w, x, y,
                       correction=jax.tree.map(np.subtract, c, ci))
      local.append(y_i)
      new_c.append(jax.tree.map(
          lambda a, b, p, q: a - b + (p - q) / (STEPS * LR), ci, c, w, y_i))
    c_i = new_c
    w = jax.tree.map(lambda p, d: p + d, w, _mean(
        [jax.tree.map(np.subtract, u, w) for u in local]))
  _close(got, w)
  # The per-device state the engine kept is each device's control variate.
  state = exp.init_state()
  for _ in range(ROUNDS):
    state, _ = exp.step_fn(exp.env, state)
  for i in range(N):
    _close(jax.tree.map(lambda t: np.asarray(t)[i], state.device_state),
           c_i[i])


def test_custom_staleness_matches_a_host_loop():
  cutoff = 1
  weight = example("staleness").log_cutoff(cutoff)
  config = _config("fedbuff", concurrency=N, buffer_size=3, refill="step")
  exp = experiment.build(config, helpers_extensions(staleness_fn=weight))
  grad = jax.grad(_ce(exp.setup.model.apply_fn))
  shards = _shards(exp)
  state = exp.init_state()
  versions = {0: jax.device_get(state.params)}
  w = versions[0]
  taus = []
  for r in range(6):
    arr = jax.device_get(engine.take_arrivals(state, 3))
    deltas, weights = [], []
    for c, tau, ok, fresh in zip(arr.clients, arr.tau, arr.ok, arr.fresh):
      taus.append(int(tau))
      if not (ok and fresh):
        continue
      pulled = versions[r - int(tau)]
      x, y = shards[int(c)]
      deltas.append(jax.tree.map(np.subtract, _local_sgd(grad, pulled, x, y),
                                 pulled))
      weights.append(float(np.where(tau <= cutoff,
                                    1 / (1 + np.log1p(float(tau))), 0.0)))
    valid = max(sum(a > 0 for a in weights), 1)  # FedBuff: mean over K.
    agg = jax.tree.map(lambda *d: sum(a * x for a, x in zip(weights, d)) /
                       valid, *deltas)
    w = jax.tree.map(np.add, w, agg)
    versions[r + 1] = w
    state, _ = exp.step_fn(exp.env, state)
  assert max(taus) > cutoff  # the cutoff dropped some updates.
  _close(jax.device_get(state.params), w)


def test_label_smoothing_matches_a_host_loop():
  alpha = 0.2
  exp, w, got = _engine(_config(),
                        example("label_smoothing").label_smoothing(alpha))
  apply = exp.setup.model.apply_fn

  def smoothed(v, x, y):
    logits = apply(v, x)
    k = logits.shape[-1]
    target = jax.nn.one_hot(y, k) * (1 - alpha) + alpha / k
    return -jnp.mean(jnp.sum(target * jax.nn.log_softmax(logits), -1))

  grad = jax.grad(smoothed)
  for _ in range(ROUNDS):
    local = [_local_sgd(grad, w, x, y) for x, y in _shards(exp)]
    w = jax.tree.map(lambda p, m: p + m, w, _mean(
        [jax.tree.map(np.subtract, u, w) for u in local]))
  _close(got, w)


def helpers_extensions(**kw):
  from ftte_jax.core.extensions import Extensions  # pylint: disable=g-import-not-at-top
  return Extensions(name="test", **kw)


@pytest.mark.parametrize("name", ["fedprox", "fedyogi", "scaffold",
                                  "staleness", "label_smoothing"])
def test_examples_are_short_and_use_the_public_api(name):
  text = (REPO / "examples" / f"{name}.py").read_text()
  assert len(text.splitlines()) <= 60
  imports = [line for line in text.splitlines()
             if line.startswith(("import ", "from "))]
  for line in imports:
    assert not any(p in line for p in ("ftte_jax.core", "ftte_jax.experiment",
                                       "ftte_jax.data", "ftte_jax.search")), line
