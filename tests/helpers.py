"""Shared test helpers: a tiny model and dataset, a constant fleet, builders.

Every test module takes its small models and configs from here, so a change
to the engine's or the experiment's API is mended in one place.
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from ftte_jax import experiment
from ftte_jax.core import algorithms
from ftte_jax.core import engine
from ftte_jax.core import extensions
from ftte_jax.core import masks
from ftte_jax.core import transforms
from ftte_jax.core.fleet import Fleet
from ftte_jax.data import client_data


class TinyMLP(nn.Module):
  hidden: int = 16
  classes: int = 4

  @nn.compact
  def __call__(self, x):
    x = x.reshape(x.shape[0], -1)
    x = nn.relu(nn.Dense(self.hidden, name="layer0")(x))
    return nn.Dense(self.classes, name="layer1")(x)


def tiny_model(seed=0, dim=6):
  """(apply_fn, params) of a TinyMLP on ``dim`` features."""
  model = TinyMLP()
  params = model.init(jax.random.PRNGKey(seed), np.zeros((1, dim), np.float32))
  return (lambda p, x: model.apply({"params": p}, x)), params["params"]


def make_dataset(num_clients=8, per_client=24, dim=6, classes=4, seed=0,
                 equal=True):
  """A linearly separable dataset split into clients (equal or not)."""
  rng = np.random.default_rng(seed)
  m = num_clients * per_client
  w = rng.normal(size=(dim, classes))
  x = rng.normal(size=(m, dim)).astype(np.float32)
  y = np.argmax(x @ w, 1).astype(np.int32)
  perm = rng.permutation(m)
  if equal:
    parts = np.array_split(perm, num_clients)
  else:
    cuts = np.sort(rng.choice(np.arange(1, m), num_clients - 1, replace=False))
    parts = np.split(perm, cuts)
  return x, y, client_data.from_partition(x, y, parts)


def const_fleet(n, speed=1e6, memory=1e12, dropout=0.0, sigma=0.0,
                j_per_flop=0.0, j_per_byte_up=0.0, j_per_byte_down=0.0,
                idle_w=0.0):
  """A fleet with fast links and the given speed/memory/dropout per device
  (energy constants: zero unless given)."""
  speed = np.broadcast_to(np.asarray(speed, np.float32), (n,))
  full = lambda v: jnp.broadcast_to(jnp.asarray(v, jnp.float32), (n,))
  return Fleet(speed=jnp.asarray(speed), bw_up=jnp.full(n, 1e9, jnp.float32),
               bw_down=jnp.full(n, 1e9, jnp.float32),
               memory=jnp.full(n, memory, jnp.float32),
               dropout=full(dropout), tier=jnp.zeros(n, jnp.int32),
               task_sigma=jnp.asarray(sigma, jnp.float32),
               j_per_flop=full(j_per_flop),
               j_per_byte_up=full(j_per_byte_up),
               j_per_byte_down=full(j_per_byte_down), idle_w=full(idle_w))


def build_engine(config, apply, params, data, fleet, plan=None, seed=1):
  """(simulator, environment, initial state) of one engine config."""
  plan = plan or masks.full_plan(params, data.num_clients)
  env = engine.make_environment(config, data, fleet, plan)
  sim = engine.make_simulator(config, apply, int(env.num_steps.max()))
  state = jax.jit(sim.init)(jax.random.PRNGKey(seed), env, params, plan)
  return sim, env, state


def run_steps(sim, env, state, rounds):
  step = jax.jit(sim.step)
  for _ in range(rounds):
    state, _ = step(env, state)
  return state


def tiny_config(algorithm="ftte", engine_kw=None, **kw):
  """A seconds-long ExperimentConfig: generated 8x8 images, an MLP.

  Args:
    algorithm: preset name.
    engine_kw: engine overrides on top of C=8, K=4, 2 local steps, batch 8.
    **kw: ExperimentConfig fields (``data``/``search`` may be dicts of
      overrides for DataConfig/SearchConfig).
  """
  e = dict(concurrency=8, buffer_size=4, local_steps=2, batch_size=8)
  if algorithm == "fedavg":
    e.pop("concurrency")
  if algorithm == "fedasync":
    e["buffer_size"] = 1
  e.update(engine_kw or {})
  data = dict(dataset="tiny", num_clients=16, partition="iid",
              **SCRATCH_DATA)
  data.update(kw.pop("data", {}))
  search = dict(importance="proxy", **SCRATCH_SEARCH)
  search.update(kw.pop("search", {}))
  base = dict(memory_tier_fractions=(0.6, 2.0), model="mlp", rounds=6,
              eval_every=3, **SCRATCH_TOP)
  base.update(kw)
  return experiment.ExperimentConfig(
      engine=algorithms.preset(algorithm, **e),
      data=experiment.DataConfig(**data),
      search=experiment.SearchConfig(**search), **base)


# The first version's setting (launch.flags.SCRATCH_ARGS) as config fields:
# tests of the engine and the search on generated data start from random
# parameters with every example at a client.
SCRATCH_DATA = dict(proxy_examples=0)
SCRATCH_SEARCH = dict(max_micro_batches=1, max_upload_fraction=1.0)
SCRATCH_TOP = dict(pretrain=experiment.PretrainConfig(steps=0),
                   frozen_weights="ram")


def assert_bit_identical(a, b):
  """Same tree structure, dtypes, shapes and bytes, leaf by leaf."""
  la, ta = jax.tree.flatten(a)
  lb, tb = jax.tree.flatten(b)
  assert ta == tb
  for x, y in zip(la, lb):
    x, y = np.asarray(x), np.asarray(y)
    assert x.dtype == y.dtype and x.shape == y.shape
    assert x.tobytes() == y.tobytes()


def replace_engine(config, **kw):
  """``config`` with engine fields replaced (no preset re-applied)."""
  return dataclasses.replace(config, engine=dataclasses.replace(config.engine,
                                                                **kw))


def components(config, client_update=None, apply_fn=None, batching=None,
               max_steps=None, mesh=None):
  """``extensions.bind`` for phase tests: ``client_update`` (a fake, in the
  ``client.ClientUpdate`` contract) or ``apply_fn``'s default SGD update;
  ``batching`` overrides the resolved one."""
  dummy_metrics = lambda p, b: {"loss": (0.0, 1.0), "accuracy": (0.0, 1.0)}
  ext = extensions.Extensions(
      client_update=client_update,
      metrics_fn=dummy_metrics if apply_fn is None else None)
  comp = extensions.bind(
      config, apply_fn, max_steps or config.local_steps,
      optax.sgd(config.client_lr), None, mesh, ext)
  return comp if batching is None else dataclasses.replace(comp,
                                                           batching=batching)


def weigh(config, deltas, plan, tier, counts, arrivals, finite,
          staleness_fn=None):
  """The buffer after the config's aggregator transforms (what the engine
  weighs a step's updates with on its buffered path)."""
  buf = transforms.Buffer.start(arrivals.ok & arrivals.fresh, arrivals.tau,
                                jnp.asarray(counts), jnp.asarray(tier),
                                arrivals.clients)
  buf = buf.invalidate(~jnp.asarray(finite)).replace(deltas=deltas)
  agg = algorithms.aggregator_from_config(config, staleness_fn)
  ctx = transforms.Context(masks=plan.masks, key=jax.random.PRNGKey(0),
                           params=jax.tree.map(lambda d: d[0], deltas))
  return agg.transform.update(buf, agg.init(ctx.params), ctx)[0]
