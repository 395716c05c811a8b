"""Shared tiny fixtures: a linearly separable dataset and a small MLP."""

import os

import flax.linen as nn
import jax
import numpy as np
import pytest

from ftte_jax.data import client_data


class TinyMLP(nn.Module):
  hidden: int = 16
  classes: int = 4

  @nn.compact
  def __call__(self, x):
    x = x.reshape(x.shape[0], -1)
    x = nn.relu(nn.Dense(self.hidden, name="layer0")(x))
    return nn.Dense(self.classes, name="layer1")(x)


def make_dataset(num_clients=8, per_client=24, dim=6, classes=4, seed=0,
                 equal=True):
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


@pytest.fixture
def tiny_model():
  model = TinyMLP()
  params = model.init(jax.random.PRNGKey(0), np.zeros((1, 6), np.float32))
  apply = lambda p, x: model.apply({"params": p}, x)
  return apply, params["params"]


@pytest.fixture
def mnist_available():
  """Whether the real MNIST split is in the data directory.

  CI sets FTTE_DATA_DIR to the real data; there a missing file is an error,
  not a reason to skip the tests that need it.
  """
  from ftte_jax.data import datasets  # pylint: disable=g-import-not-at-top
  found = (datasets.default_data_dir() / "mnist" /
           "t10k-images-idx3-ubyte.gz").exists()
  if not found and os.environ.get("CI"):
    pytest.fail(f"CI: no MNIST under {datasets.default_data_dir()}; set "
                "FTTE_DATA_DIR")
  return found
