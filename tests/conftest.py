"""Shared fixtures; helpers live in tests/helpers.py."""

import os

import pytest

import helpers


@pytest.fixture
def tiny_model():
  return helpers.tiny_model()


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
