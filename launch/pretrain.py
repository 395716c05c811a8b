r"""Central pretraining on the server's proxy set, saved for ``--init_checkpoint``.

  python -m launch.pretrain --out=/tmp/lenet5_pretrained \
      --proxy_examples=300 --pretrain_steps=100
  python -m launch.main --init_checkpoint=/tmp/lenet5_pretrained \
      --proxy_examples=300 --algorithm=fedbuff

Takes the same config flags as ``launch.main`` (dataset, split, model and
the ``--pretrain_*`` options; the engine's are ignored). The proxy set is
``--proxy_examples`` pool examples that no client holds and the test set
does not contain (``datasets.split_proxy``); a run that loads the
checkpoint must use the same split (``num_test``, ``proxy_examples``,
``split_seed`` or ``seed``) on the same dataset, which ``launch.main``
checks before it loads anything. ``--out`` gets the parameters (orbax),
``params.json`` (model, split, pretraining options and results, shapes,
SHA-256) and ``config.json``. Bad input exits 2 with one line.
"""

from __future__ import annotations

import os
import time

from absl import flags
from absl import logging

from launch import flags as flags_lib

FLAGS = flags.FLAGS


def _define() -> None:
  flags_lib.define_config_flags()
  flags_lib.define_download_flag()
  flags.DEFINE_string("out", None, "directory to create for the checkpoint "
                      "(must not exist)", required=True)


def _check(fv: flags.FlagValues):
  config = flags_lib.resolve(fv).config
  if os.path.exists(fv.out):
    raise ValueError(f"out: {fv.out} exists; choose a new directory")
  if config.init_checkpoint:
    raise ValueError("init_checkpoint: launch.pretrain starts from the "
                     "seeded random initialization; drop the flag")
  if not config.data.proxy_examples or not config.pretrain.steps:
    raise ValueError("proxy_examples and pretrain_steps must both be > 0 "
                     f"(got {config.data.proxy_examples} and "
                     f"{config.pretrain.steps} for --dataset="
                     f"{config.data.dataset})")
  return config


def _run(fv: flags.FlagValues) -> None:
  config = _check(fv)
  flags_lib.ensure_data(config, fv.download)  # before --out is created.
  t0 = time.perf_counter()
  # pylint: disable=g-import-not-at-top
  import jax
  import jax.numpy as jnp
  from ftte_jax import checkpointing
  from ftte_jax.core import keys
  from ftte_jax.experiment import planning
  from ftte_jax.experiment import pretrain as pretrain_lib
  # pylint: enable=g-import-not-at-top
  fed = planning.load_data(config)
  root = keys.root(config.seed)
  model = planning.make_model(config, fed.info,
                              keys.fold_in(root, planning.KEY_PARAMS))
  params, init = pretrain_lib.initial_params(
      config, model.apply_fn, model.params, fed.proxy,
      keys.fold_in(root, planning.KEY_PRETRAIN))
  logits = jax.jit(model.apply_fn)(params, jnp.asarray(fed.test["x"]))
  result = dict(init["pretrain"], test_accuracy=float(
      jnp.mean(jnp.argmax(logits, -1) == jnp.asarray(fed.test["y"]))),
                wall_s=time.perf_counter() - t0)
  digest = checkpointing.save_params(
      fv.out, params, pretrain_lib.checkpoint_meta(config, result))
  checkpointing.write_json(os.path.join(fv.out, "config.json"),
                           {"experiment": config.to_dict(),
                            "flags": flags_lib.given_args(fv)})
  logging.info("pretrained %s on %d proxy examples: %s", config.model,
               config.data.proxy_examples, result)
  print(f"pretrained checkpoint {os.path.abspath(fv.out)}\n"
        f"  proxy_accuracy  {result['proxy_accuracy']:.4f}\n"
        f"  test_accuracy   {result['test_accuracy']:.4f}\n"
        f"  params_sha256   {digest}", flush=True)


def run() -> None:
  flags_lib.run_app(_define, flags_lib.checked_main(_check, _run))


if __name__ == "__main__":
  run()
