"""Central pretraining on the server's proxy set, and the starting parameters.

FTTE's setting is the Tiny Training Engine's: a device fine-tunes a model
that was trained elsewhere, keeping the frozen part in flash. Here the
"elsewhere" is the server's proxy set (``DataConfig.proxy_examples``: pool
examples no client holds and the test set does not contain). ``pretrain``
trains on it with SGD and momentum; ``initial_params`` chooses a run's
starting parameters (random, pretrained in-process, or a saved checkpoint)
and ``check_checkpoint`` refuses a checkpoint whose proxy set could overlap
the run's clients or test set.
"""

from __future__ import annotations

import os
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ftte_jax import checkpointing
from ftte_jax.core.client import cross_entropy
from ftte_jax.core.typing import PyTree
from ftte_jax.experiment.config import ExperimentConfig, PretrainConfig


def pretrain(apply_fn: Callable, params: PyTree,
             proxy: dict, config: PretrainConfig,
             key: jax.Array) -> tuple[PyTree, dict]:
  """``config.steps`` SGD-momentum steps on ``proxy``; one jitted scan.

  Batches walk a fresh permutation of the proxy set each epoch (every
  example once per epoch; a last partial batch wraps into the next epoch's
  order). ``proxy``: the server's set ``{"x", "y"}`` of a classification
  dataset. Returns the parameters and ``{'steps', 'final_loss',
  'proxy_accuracy'}``.
  """
  x = np.asarray(proxy["x"], np.float32)
  y = np.asarray(proxy["y"], np.int32)
  n, b = int(x.shape[0]), int(config.batch_size)
  if b > n:
    raise ValueError(f"pretrain_batch_size ({b}) exceeds the proxy set "
                     f"({n} examples)")
  run = pretrain_program(apply_fn, config, n)
  params, last, accuracy = jax.jit(run)(params, x, y, key)
  return params, {"steps": int(config.steps), "final_loss": float(last),
                  "proxy_accuracy": float(accuracy)}


def pretrain_program(apply_fn: Callable, config: PretrainConfig, n: int
                     ) -> Callable:
  """The pure pretraining program ``run(params, x, y, key) -> (params,
  last loss, proxy accuracy)`` over ``n`` proxy examples (jit it at the
  call site; ``tests/test_lowering.py`` lowers it for accelerators)."""
  b = int(config.batch_size)
  epochs = -(-config.steps * b // n)
  tx = optax.sgd(config.lr, momentum=config.momentum)

  # The data are arguments, not closed-over constants: XLA would try to
  # constant-fold the first layer over the whole proxy set. The epochs'
  # permutations are drawn inside: eagerly, each of their ops compiled and
  # ran on its own (about 0.13 s of a warm start on the 2-core CPU).
  def run(p, x, y, key):
    order = jax.vmap(lambda e: jax.random.permutation(
        jax.random.fold_in(key, e), n))(jnp.arange(epochs)).reshape(-1)
    batches = order[:config.steps * b].reshape(config.steps, b)

    def step(carry, idx):
      p, s = carry
      loss, g = jax.value_and_grad(
          lambda q: cross_entropy(apply_fn, q, x[idx], y[idx]))(p)
      u, s = tx.update(g, s, p)
      return (optax.apply_updates(p, u), s), loss

    (p, _), losses = jax.lax.scan(step, (p, tx.init(p)), batches)
    accuracy = jnp.mean(jnp.argmax(apply_fn(p, x), -1) == y)
    return p, losses[-1], accuracy

  return run


def split_of(config: ExperimentConfig) -> dict:
  """What fixes the test and proxy sets: a checkpoint's proxy set is
  disjoint from a run's clients and test set when these match."""
  d = config.data.resolved()
  return {"dataset": d.dataset, "num_test": d.num_test,
          "proxy_examples": d.proxy_examples,
          "split_seed": config.seed if d.split_seed is None else d.split_seed}


def checkpoint_meta(config: ExperimentConfig, info: dict) -> dict:
  """The description ``launch.pretrain`` stores with the parameters."""
  return {"model": config.model, "model_options": dict(config.model_options),
          "split": split_of(config), "pretrain": info,
          "pretrain_config": {"steps": config.pretrain.steps,
                              "lr": config.pretrain.lr,
                              "momentum": config.pretrain.momentum,
                              "batch_size": config.pretrain.batch_size},
          "seed": config.seed}


def check_checkpoint(config: ExperimentConfig) -> dict:
  """Reads ``config.init_checkpoint``'s description and checks it fits.

  Cheap (no arrays are read), so a launcher calls it before loading data.

  Raises:
    ValueError: naming ``init_checkpoint``: no checkpoint there, or what
      differs: the model, or (same dataset) the split that keeps the proxy
      set out of the run's clients and test set.
  """
  path = config.init_checkpoint
  if not os.path.isdir(path):
    raise ValueError(f"init_checkpoint: no such directory {path!r}")
  try:
    meta = checkpointing.read_params_meta(path)
  except (OSError, ValueError) as e:
    raise ValueError(f"init_checkpoint: {e}") from None
  # As JSON stores it (tuples become lists).
  mine = checkpointing.to_jsonable(
      {"model": config.model, "model_options": dict(config.model_options)})
  theirs = {k: meta.get(k) for k in mine}
  if theirs != mine:
    raise ValueError(f"init_checkpoint: {path} holds {theirs}, this run "
                     f"uses {mine}")
  split = meta.get("split", {})
  if split.get("dataset") == config.data.dataset and split != (
      checkpointing.to_jsonable(split_of(config))):
    raise ValueError(
        f"init_checkpoint: {path} was pretrained on the proxy set of split "
        f"{split}, this run's split is {split_of(config)}; with another "
        "split its proxy examples may be this run's client or test data. "
        "Use the same num_test, proxy_examples and split_seed (or seed)")
  return meta


def initial_params(config: ExperimentConfig, apply_fn: Callable,
                   params: PyTree, proxy, key: jax.Array,
                   checkpoint_meta: dict | None = None
                   ) -> tuple[PyTree, dict]:
  """A run's starting parameters and a report of where they came from.

  ``init_checkpoint`` if given (its hash checked), else ``params`` after
  ``pretrain.steps`` steps on ``proxy`` ({"x", "y"}; none: ``params`` as
  they are). ``config`` is resolved (``config.resolve``).
  ``checkpoint_meta``: what an earlier ``check_checkpoint`` returned (not
  checked again); None checks here.
  """
  if config.init_checkpoint:
    meta = checkpoint_meta or check_checkpoint(config)
    loaded = checkpointing.load_params(config.init_checkpoint, params)
    return loaded, {"init": "checkpoint",
                    "checkpoint": os.path.abspath(config.init_checkpoint),
                    "params_sha256": meta["params_sha256"],
                    "pretrain": meta.get("pretrain", {})}
  if config.pretrain.steps:
    trained, info = pretrain(apply_fn, params, proxy, config.pretrain, key)
    return trained, {"init": "pretrained", "pretrain": info}
  return params, {"init": "random"}
