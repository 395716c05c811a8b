"""Tests for ftte_jax.client_data."""

import warnings

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


def test_padding_report_and_warning():
  skewed = [np.arange(15)] + [np.array([i]) for i in range(15, 20)]
  with pytest.warns(cdl.PaddingWarning, match="bucket_by_size"):
    cd = cdl.from_partition(X, Y, skewed)
  rep = cdl.padding_report(cd)
  assert rep["padded_slots"] == 6 * 15 and rep["num_examples"] == 20
  assert rep["overhead"] == pytest.approx(90 / 20)
  assert rep["max_n"] == 15 and rep["min_n"] == 1
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    balanced = cdl.from_partition(X, Y, np.array_split(np.arange(20), 4))
  assert cdl.padding_report(balanced)["overhead"] == 1.0


def test_bucket_by_size_minimizes_padding_and_covers_clients():
  sizes = [1, 1, 2, 9, 10, 1, 2, 40, 38, 3]
  rng = np.random.default_rng(0)
  perm = rng.permutation(sum(sizes))
  parts = np.split(perm, np.cumsum(sizes)[:-1])
  x = np.zeros((sum(sizes), 2), np.float32)
  y = np.zeros(sum(sizes), np.int32)
  buckets = cdl.bucket_by_size(x, y, parts, num_buckets=3)
  assert len(buckets) == 3
  ids = np.concatenate([b[1] for b in buckets])
  np.testing.assert_array_equal(np.sort(ids), np.arange(10))
  # Hand-computed optimum: {1,1,1,2,2,3} -> 6*3, {9,10} -> 2*10, {38,40} -> 2*40.
  assert sum(b[0].indices.size for b in buckets) == 18 + 20 + 80
  for cd, cid in buckets:
    assert cd.x is buckets[0][0].x  # One shared copy of the examples.
    for row, c in enumerate(cid):
      n = int(cd.counts[row])
      np.testing.assert_array_equal(cd.indices[row, :n], parts[c])
  one = cdl.bucket_by_size(x, y, parts, num_buckets=1)
  assert len(one) == 1 and one[0][0].indices.shape == (10, 40)
  with pytest.raises(ValueError, match="num_buckets"):
    cdl.bucket_by_size(x, y, parts, num_buckets=0)
