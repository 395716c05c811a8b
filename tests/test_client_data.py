"""Tests for ftte_jax.client_data."""

import numpy as np
import pytest

from ftte_jax.data import client_data as cdl

X = np.arange(20, dtype=np.float32)[:, None]
Y = np.arange(20) % 3


def test_from_partition_layout():
  parts = [np.array([0, 5]), np.array([7]), np.array([1, 2, 3])]
  cd = cdl.from_partition(X, Y, parts)
  np.testing.assert_array_equal(cd.counts, [2, 1, 3])
  np.testing.assert_array_equal(cd.indices, [[0, 5, 0], [7, 0, 0], [1, 2, 3]])
  assert cd.num_clients == 3 and cd.max_examples == 3
  assert cd.x.dtype == np.float32 and cd.y.dtype == np.int32


@pytest.mark.parametrize("parts,match", [
    ([], "at least one"), ([np.array([0]), np.array([], int)], "no examples"),
    ([np.array([20])], "outside")])
def test_from_partition_errors(parts, match):
  with pytest.raises(ValueError, match=match):
    cdl.from_partition(X, Y, parts)


def test_padding_report():
  skewed = [np.arange(15)] + [np.array([i]) for i in range(15, 20)]
  rep = cdl.padding_report(cdl.from_partition(X, Y, skewed))
  assert rep["padded_slots"] == 6 * 15 and rep["num_examples"] == 20
  assert rep["overhead"] == pytest.approx(90 / 20)
  assert rep["max_n"] == 15 and rep["min_n"] == 1
  balanced = cdl.from_partition(X, Y, np.array_split(np.arange(20), 4))
  assert cdl.padding_report(balanced)["overhead"] == 1.0
