"""Dataset-aware defaults: 'auto' options and every documented dataset-model
pair run with no flag beyond --dataset and --model (issue 27).

The pairs are built in-process (``experiment.build``: data, model, memory
analysis, pretraining where there is a proxy set, probe round and search).
The quick tier traces the server step of the two generated-data pairs; the
slow tier builds every pair and takes two server steps (traces the step of
the large models). The files of fashion_mnist,
cifar10, femnist and shakespeare are small ones written here in their
formats, MNIST's the real split when present.
"""

import gzip
import os
import pickle
import struct
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from ftte_jax import experiment
from ftte_jax.core import algorithms
from ftte_jax.data import datasets
from launch import flags as flags_lib

sys.path.insert(0, str(Path(__file__).parent))
import natural_files as nf  # noqa: E402  (tests/ on the path)

# The dataset-model pairs the README documents.
PAIRS = [("synthetic", "mlp"), ("tiny", "mlp"), ("tiny", "lenet5"),
         ("mnist", "mlp"), ("mnist", "lenet5"), ("fashion_mnist", "mlp"),
         ("fashion_mnist", "lenet5"), ("cifar10", "resnet8"),
         ("cifar10", "resnet20"), ("cifar10", "mobilenetv2"),
         ("femnist", "femnist_cnn"), ("shakespeare", "char_lstm")]
QUICK_PAIRS = [("synthetic", "mlp"), ("tiny", "mlp")]
# Pairs whose server step takes minutes to compile on a 2-core CPU (the
# step of 10 clients x 5 local steps): built and their step traced; the
# others take two steps. (femnist and shakespeare train end to end in
# tests/test_natural_e2e.py.)
TRACED_ONLY = [("cifar10", "resnet8"), ("cifar10", "resnet20"),
               ("cifar10", "mobilenetv2"), ("femnist", "femnist_cnn"),
               ("shakespeare", "char_lstm")]


def resolved(*args):
  return flags_lib.resolve_args(list(args)).config


@pytest.mark.parametrize("args, want", [
    # (proxy_examples, pretrain_steps, num_test, split, partition)
    ([], (300, 100, 2000, "pool", "dirichlet")),
    (["--dataset=fashion_mnist"], (300, 100, 0, "standard", "dirichlet")),
    (["--dataset=cifar10", "--split=pool"], (300, 100, 2000, "pool",
                                             "dirichlet")),
    (["--dataset=tiny"], (0, 0, 128, "auto", "dirichlet")),
    (["--dataset=synthetic"], (0, 0, 0, "auto", "natural")),
    (["--dataset=femnist"], (0, 0, 0, "auto", "natural")),
    (["--dataset=shakespeare"], (0, 0, 0, "auto", "natural")),
    # A proxy set turned off turns pretraining off (before: exit 2).
    (["--proxy_examples=0"], (0, 0, 2000, "pool", "dirichlet")),
    (["--dataset=tiny", "--proxy_examples=64"], (64, 100, 128, "auto",
                                                 "dirichlet")),
    (["--pretrain_steps=7"], (300, 7, 2000, "pool", "dirichlet")),
    (["--num_test=500", "--partition=iid"], (300, 100, 500, "pool", "iid")),
])
def test_auto_resolves_per_dataset(args, want):
  c = resolved(*args)
  d = c.data
  assert (d.proxy_examples, c.pretrain.steps, d.num_test, d.split,
          d.partition) == want


def test_auto_on_the_command_line_and_bad_values():
  assert resolved("--proxy_examples=auto", "--pretrain_steps=auto") == \
      resolved()
  with pytest.raises(ValueError, match="^proxy_examples must be an integer "
                     ">= 0 or 'auto', got 'many'"):
    resolved("--proxy_examples=many")
  with pytest.raises(ValueError, match="^pretrain_steps must be an integer "
                     ">= 0 or 'auto', got -3"):
    resolved("--pretrain_steps=-3")


@pytest.mark.parametrize("args, match", [
    (["--dataset=femnist", "--partition=iid"],
     r"^partition: femnist's clients are given by the data \(its writers\),"
     r" so it takes no partitioner; drop --partition=iid"),
    (["--dataset=shakespeare", "--partition=dirichlet"],
     r"^partition: shakespeare's .* drop --partition=dirichlet"),
    (["--dataset=synthetic", "--partition=shards"], "^partition: synthetic"),
    (["--dataset=mnist", "--partition=natural"], "^partition: 'natural'"),
    (["--dataset=femnist", "--proxy_examples=10"], "^proxy_examples: femnist"),
    (["--dataset=synthetic", "--pretrain_steps=5"], "^pretrain_steps needs"),
])
def test_natural_datasets_refuse_a_partitioner(args, match):
  with pytest.raises(ValueError, match=match):
    resolved(*args)
  # The launcher writes the option as its flag.
  try:
    resolved(*args)
  except ValueError as e:
    assert flags_lib.one_line(e).startswith("--")


def test_library_config_resolves_in_build():
  # A config made in Python keeps 'auto' until make_setup resolves it.
  config = experiment.ExperimentConfig(
      data=experiment.DataConfig(dataset="tiny", num_clients=8),
      engine=algorithms.preset("ftte", concurrency=8, buffer_size=4,
                               batch_size=8, local_steps=2),
      model="mlp", rounds=1)
  assert config.data.proxy_examples == "auto"
  exp = experiment.build(config)
  assert exp.config.data.proxy_examples == 0
  assert exp.config.pretrain.steps == 0 and exp.config.data.num_test == 128


def _idx(path, arr):
  arr = np.asarray(arr, np.uint8)
  raw = struct.pack(">I", 0x0800 | arr.ndim) + struct.pack(
      f">{arr.ndim}I", *arr.shape) + arr.tobytes()
  path.write_bytes(gzip.compress(raw))


def _write_files(root: Path) -> None:
  """Small files of every dataset that needs files, in their formats."""
  rng = np.random.default_rng(0)
  fm = root / "fashion_mnist"
  fm.mkdir(parents=True)
  for prefix, n in (("train", 600), ("t10k", 100)):
    _idx(fm / f"{prefix}-images-idx3-ubyte.gz",
         rng.integers(0, 256, (n, 28, 28)))
    _idx(fm / f"{prefix}-labels-idx1-ubyte.gz", np.arange(n) % 10)
  cifar = root / "cifar-10-batches-py"
  cifar.mkdir()
  for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
    with open(cifar / name, "wb") as f:
      pickle.dump({b"labels": [int(v) for v in np.arange(120) % 10],
                   b"data": rng.integers(0, 256, (120, 3072)).astype(
                       np.uint8)}, f, protocol=3)
  nf.write_leaf_dataset(root, "femnist", nf.femnist_users(100, 6, seed=0))
  nf.write_leaf_dataset(root, "shakespeare",
                        nf.shakespeare_users(100, 6, seed=0))
  real = datasets.default_data_dir() / "mnist"
  if real.exists():
    os.symlink(real, root / "mnist")


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
  root = tmp_path_factory.mktemp("data")
  _write_files(root)
  return root


def _build_pair(dataset, model, data_root, monkeypatch):
  monkeypatch.setenv("FTTE_DATA_DIR", str(data_root))
  if dataset == "mnist" and not (data_root / "mnist").exists():
    pytest.skip("the real MNIST split is absent")
  config = resolved(f"--dataset={dataset}", f"--model={model}")
  assert not datasets.missing_files(dataset, None, config.data.source)
  exp = experiment.build(config)
  # FTTE's default: a memory-budgeted subset for the smallest tier.
  tier = exp.plan_report["tiers"][0]
  assert tier["memory"]["total"] <= tier["budget_bytes"]
  return exp


@pytest.mark.parametrize("dataset, model", QUICK_PAIRS)
def test_pair_builds_with_no_other_flag(dataset, model, data_root,
                                        monkeypatch):
  exp = _build_pair(dataset, model, data_root, monkeypatch)
  exp.step_fn.lower(exp.env, exp.init_state())  # traces the server step.


@pytest.mark.slow
@pytest.mark.parametrize("dataset, model", PAIRS)
def test_pair_runs_with_no_other_flag(dataset, model, data_root,
                                      monkeypatch):
  exp = _build_pair(dataset, model, data_root, monkeypatch)
  state = exp.init_state()
  if (dataset, model) in TRACED_ONLY:
    exp.step_fn.lower(exp.env, state)
    return
  for _ in range(2):
    state, _ = exp.step_fn(exp.env, state)
  assert int(state.version) == 2
  assert all(bool(np.isfinite(np.asarray(p)).all())
             for p in jax.tree.leaves(state.params))


REPO = Path(__file__).resolve().parents[1]
FEMNIST_FLAGS = f"--flagfile={REPO / 'experiments' / 'femnist_paper.flags'}"


@pytest.mark.parametrize("flagfile", sorted(
    p.name for p in (REPO / "experiments").glob("*.flags")))
def test_every_flagfile_resolves(flagfile):
  config = resolved(f"--flagfile={REPO / 'experiments' / flagfile}")
  assert config.data.proxy_examples != "auto"
  assert config.pretrain.steps != "auto" and config.data.partition


def test_femnist_flagfile_is_ftte_on_writers():
  config = resolved(FEMNIST_FLAGS)
  assert (config.data.dataset, config.model, config.data.partition,
          config.data.num_clients, config.data.proxy_examples,
          config.pretrain.steps, config.engine.mask) == (
              "femnist", "femnist_cnn", "natural", 1000, 0, 0, "search")


@pytest.mark.slow
def test_femnist_flagfile_builds_on_generated_writers(tmp_path):
  nf.write_leaf_dataset(tmp_path, "femnist", nf.femnist_users(20, 8, seed=1))
  config = resolved(FEMNIST_FLAGS, f"--data_dir={tmp_path}", "--num_clients=20",
                    "--concurrency=10", '--model_options={"dense": 64}')
  exp = experiment.build(config)
  assert exp.setup.data.num_clients == 20
  assert exp.setup.data_info.users_in_files == 20
  exp.step_fn.lower(exp.env, exp.init_state())
