"""Pretraining on the server's proxy set and the pretrained checkpoint."""

import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import cli
from helpers import tiny_model
from ftte_jax import checkpointing
from ftte_jax import experiment
from ftte_jax.core import algorithms
from ftte_jax.core.client import cross_entropy
from ftte_jax.data import datasets
from ftte_jax.experiment import pretrain as pretrain_lib

REPO = Path(__file__).resolve().parents[1]


def _rows(x):
  return {np.asarray(r).tobytes() for r in x}


def test_proxy_set_is_disjoint_from_clients_and_test():
  load = lambda seed=3, **kw: datasets.load_federated(experiment.DataConfig(
      dataset="tiny", num_clients=8, partition="iid", **kw), seed=seed)
  fed = load(proxy_examples=64)
  cd, xte, info = fed.train, fed.test["x"], fed.info
  px, py = fed.proxy["x"], fed.proxy["y"]
  assert info.num_proxy == 64 and px.shape[0] == py.shape[0] == 64
  # 512 generated examples: 128 test, 64 proxy, 320 for the clients.
  assert info.num_train == 320 and int(np.asarray(cd.counts).sum()) == 320
  clients, test, proxy = _rows(cd.x), _rows(xte), _rows(px)
  assert len(proxy) == 64
  assert not proxy & clients and not proxy & test and not clients & test
  # Another run seed with the same split seed: same test and proxy sets.
  fed2 = load(seed=4, proxy_examples=64, split_seed=3)
  assert _rows(fed2.proxy["x"]) == proxy and _rows(fed2.test["x"]) == test
  with pytest.raises(ValueError, match="proxy_examples"):
    load(proxy_examples=384)
  with pytest.raises(ValueError, match="proxy_examples"):
    datasets.load_federated(experiment.DataConfig(
        dataset="synthetic", num_clients=8, proxy_examples=4))


def test_pretrain_equals_a_python_loop_reference():
  apply, params = tiny_model(dim=6)
  rng = np.random.default_rng(0)
  x = rng.normal(size=(40, 6)).astype(np.float32)
  y = rng.integers(0, 4, 40).astype(np.int32)
  cfg = experiment.PretrainConfig(steps=7, lr=0.1, momentum=0.9,
                                  batch_size=16)
  key = jax.random.PRNGKey(5)
  got, info = pretrain_lib.pretrain(apply, params, {"x": x, "y": y}, cfg, key)
  # Reference: epochs of fresh permutations, batches read in order across
  # epoch boundaries, optax SGD with momentum step by step.
  order = np.concatenate([np.asarray(jax.random.permutation(
      jax.random.fold_in(key, e), 40)) for e in range(3)])
  tx = optax.sgd(0.1, momentum=0.9)
  p, s = params, tx.init(params)
  for i in range(7):
    idx = order[16 * i:16 * (i + 1)]
    g = jax.grad(lambda q: cross_entropy(apply, q, x[idx], y[idx]))(p)
    u, s = tx.update(g, s, p)
    p = optax.apply_updates(p, u)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6),
               got, p)
  assert info["steps"] == 7 and 0 <= info["proxy_accuracy"] <= 1
  with pytest.raises(ValueError, match="pretrain_batch_size"):
    pretrain_lib.pretrain(apply, params, {"x": x, "y": y},
                          dataclasses.replace(cfg, batch_size=41), key)


def test_params_checkpoint_round_trip_and_damage(tmp_path):
  _, params = tiny_model()
  path = tmp_path / "ckpt"
  digest = checkpointing.save_params(path, params, {"model": "tiny"})
  back = checkpointing.load_params(path, params)
  jax.tree.map(np.testing.assert_array_equal, back, params)
  assert checkpointing.params_sha256(back) == digest
  with pytest.raises(FileExistsError):
    checkpointing.save_params(path, params, {})
  wrong = jax.tree.map(lambda a: jnp.zeros(a.shape + (1,)), params)
  with pytest.raises(ValueError, match="shapes"):
    checkpointing.load_params(path, wrong)
  meta = json.loads((path / "params.json").read_text())
  meta["params_sha256"] = "0" * 64
  (path / "params.json").write_text(json.dumps(meta))
  with pytest.raises(ValueError, match="damaged"):
    checkpointing.load_params(path, params)
  with pytest.raises(FileNotFoundError, match="launch.pretrain"):
    checkpointing.read_params_meta(tmp_path)


def _config(**top):
  top = {"pretrain": experiment.PretrainConfig(steps=0), **top}
  return experiment.ExperimentConfig(
      engine=algorithms.preset("ftte", concurrency=8, buffer_size=4,
                               local_steps=2, batch_size=16),
      data=experiment.DataConfig(dataset="tiny", num_clients=16,
                                 partition="iid", proxy_examples=64),
      search=experiment.SearchConfig(importance="proxy"),
      memory_tier_fractions=(0.6, 2.0), model="mlp",
      model_options={"hidden": (32,)}, rounds=6, eval_every=3, **top)


@pytest.mark.slow
def test_run_from_checkpoint_equals_in_process_pretraining(tmp_path):
  pre = experiment.PretrainConfig(steps=30, batch_size=16)
  inline = experiment.build(_config(pretrain=pre))
  assert inline.info["init"]["init"] == "pretrained"
  s_inline, h_inline, _ = inline.run()
  # What launch.pretrain saves: the same pretraining, written to disk.
  path = tmp_path / "pretrained"
  checkpointing.save_params(path, inline.setup.model.params,
                            pretrain_lib.checkpoint_meta(
                                _config(pretrain=pre),
                                inline.info["init"]["pretrain"]))
  loaded = experiment.build(_config(init_checkpoint=str(path)))
  assert loaded.info["init"]["init"] == "checkpoint"
  s_loaded, h_loaded, _ = loaded.run()
  assert h_loaded[0]["test_accuracy"] == h_inline[0]["test_accuracy"]
  assert (experiment.params_sha256(s_loaded.params) ==
          experiment.params_sha256(s_inline.params))
  # Pretraining helped: round 0 beats the random start.
  scratch = experiment.build(_config())
  _, h_scratch, _ = scratch.run()
  assert h_inline[0]["test_accuracy"] > h_scratch[0]["test_accuracy"] + 0.2
  # Another split on the same dataset could leak the proxy set: refused
  # before anything is loaded.
  other = _config(init_checkpoint=str(path))
  other = dataclasses.replace(other, data=dataclasses.replace(
      other.data, num_test=100))
  with pytest.raises(ValueError, match="init_checkpoint: .* split"):
    experiment.check_checkpoint(other)
  with pytest.raises(ValueError, match="init_checkpoint: .*lenet5"):
    experiment.check_checkpoint(dataclasses.replace(
        _config(init_checkpoint=str(path)), model="lenet5", model_options={}))
  with pytest.raises(ValueError, match="init_checkpoint: no such"):
    experiment.check_checkpoint(_config(init_checkpoint=str(tmp_path / "x")))


@pytest.mark.parametrize("kwargs,option", [
    ({"pretrain": experiment.PretrainConfig(steps=5),
      "data": experiment.DataConfig(proxy_examples=0)}, "pretrain_steps"),
    ({"pretrain": experiment.PretrainConfig(steps=5, lr=-1.0),
      "data": experiment.DataConfig(proxy_examples=10)}, "pretrain_lr"),
    ({"pretrain": experiment.PretrainConfig(steps=5),
      "data": experiment.DataConfig(proxy_examples=10),
      "init_checkpoint": "/x"}, "pretrain_steps and init_checkpoint"),
    ({"frozen_weights": "disk"}, "frozen_weights"),
])
def test_bad_pretrain_options(kwargs, option):
  with pytest.raises(ValueError, match="^" + option):
    experiment.validate(experiment.ExperimentConfig(**kwargs))


@pytest.mark.slow
def test_launch_pretrain_then_main(tmp_path):
  smoke = f"--flagfile={REPO / 'experiments' / 'smoke.flags'}"
  # smoke.flags trains from scratch; these runs hold a proxy set.
  split = ["--proxy_examples=64", "--pretrain_steps=0"]
  out = tmp_path / "pre"

  def run(module, *args):
    return cli.run([smoke, *args], module=module)

  rc, stdout, err = run("launch.pretrain", "--proxy_examples=64",
                        "--pretrain_steps=20",
                        "--pretrain_batch_size=16", f"--out={out}")
  assert rc == 0, err
  assert "test_accuracy" in stdout
  meta = json.loads((out / "params.json").read_text())
  assert meta["split"]["proxy_examples"] == 64
  rc, _, err = run("launch.main", *split, f"--init_checkpoint={out}",
                   "--rounds=4", f"--workdir={tmp_path / 'run'}")
  assert rc == 0, err
  summary = json.loads((tmp_path / "run" / "summary.json").read_text())
  assert summary["init"]["params_sha256"] == meta["params_sha256"]
  # config.json names the reconstruction's choices with their values.
  recon = json.loads((tmp_path / "run" / "config.json").read_text())[
      "reconstruction"]["options"]
  assert recon["init_checkpoint"] == str(out)
  assert recon["frozen_weights"] == "ram"  # smoke.flags: the first setting.
  assert recon["proxy_examples"] == 64
  # Refused before any loading, in one line naming the flag.
  rc, _, err = run("launch.main", "--proxy_examples=32", "--pretrain_steps=0",
                   f"--init_checkpoint={out}", f"--workdir={tmp_path / 'b'}")
  assert rc == 2 and "init_checkpoint" in err and len(err.splitlines()) == 1
  rc, _, err = run("launch.pretrain", "--proxy_examples=64",
                   "--pretrain_steps=5", f"--out={out}")
  assert rc == 2 and "out:" in err
