"""Tests for ftte_jax.partition."""

import numpy as np
import pytest

from ftte_jax.data import partition as P

LABELS = np.repeat(np.arange(10), 60)  # 600 examples, 10 balanced classes.


def _all(name, **opts):
  return P.make_partition(name, LABELS, 20, seed=3, **opts)


@pytest.mark.parametrize("name,opts", [
    ("iid", {}), ("dirichlet", {"alpha": 0.05}), ("dirichlet", {"alpha": 100.}),
    ("shards", {"shards_per_client": 2}), ("shards", {"shards_per_client": 7,
                                                      "allow_uneven": True}),
    ("quantity", {"sigma": 2.0})])
def test_exact_coverage_and_nonempty(name, opts):
  parts = _all(name, **opts)
  assert len(parts) == 20
  joined = np.concatenate(parts)
  np.testing.assert_array_equal(np.sort(joined), np.arange(len(LABELS)))
  assert min(len(p) for p in parts) >= 1


@pytest.mark.parametrize("name,opts", [
    ("iid", {}), ("dirichlet", {"alpha": 0.3}), ("shards", {}),
    ("quantity", {})])
def test_same_seed_same_partition(name, opts):
  a = _all(name, **opts)
  b = _all(name, **opts)
  for pa, pb in zip(a, b):
    np.testing.assert_array_equal(pa, pb)
  c = P.make_partition(name, LABELS, 20, seed=4, **opts)
  assert any(not np.array_equal(pa, pc) for pa, pc in zip(a, c))


def test_dirichlet_small_alpha_more_skewed():
  tv = {a: np.mean([P.mean_tv_distance(
      LABELS, P.dirichlet(LABELS, 20, a, seed=s), 10) for s in range(3)])
        for a in (0.05, 1.0, 100.0)}
  assert tv[0.05] > tv[1.0] > tv[100.0]
  assert tv[0.05] > 0.6 and tv[100.0] < 0.2


def test_dirichlet_many_clients_small_alpha_still_nonempty():
  parts = P.dirichlet(LABELS[:50], 50, 0.01, seed=0)
  assert [len(p) for p in parts] == [1] * 50


def test_shards_see_few_classes():
  parts = P.shards(LABELS, 20, 2, seed=0)
  hist = P.label_histograms(LABELS, parts, 10)
  assert ((hist > 0).sum(axis=1) <= 2).all()
  assert (hist.sum(axis=1) == 30).all()


def test_iid_sizes_balanced_and_quantity_skewed():
  assert {len(p) for p in P.iid(601, 20, 0)} == {30, 31}
  sizes = [len(p) for p in P.quantity(600, 20, 1.5, 0)]
  assert sum(sizes) == 600 and max(sizes) > 3 * min(sizes)
  assert {len(p) for p in P.quantity(600, 20, 0.0, 0)} == {30}


def test_tv_distance_hand_computed():
  labels = np.array([0, 0, 1, 1])
  assert P.mean_tv_distance(labels, [np.array([0, 1]), np.array([2, 3])],
                            2) == pytest.approx(0.5)
  assert P.mean_tv_distance(labels, [np.array([0, 2]), np.array([1, 3])],
                            2) == pytest.approx(0.0)


@pytest.mark.parametrize("call,match", [
    (lambda: P.dirichlet(LABELS, 5, 0.0, 0), "alpha"),
    (lambda: P.dirichlet(LABELS, 5, -1.0, 0), "alpha"),
    (lambda: P.iid(10, 11, 0), "num_clients"),
    (lambda: P.iid(10, 0, 0), "num_clients"),
    (lambda: P.shards(LABELS, 7, 2, 0), "do not divide"),
    (lambda: P.shards(LABELS, 5, 0, 0), "shards_per_client"),
    (lambda: P.quantity(10, 2, -1.0, 0), "sigma"),
    (lambda: P.make_partition("nope", LABELS, 2, 0), "valid"),
    (lambda: P.make_partition("iid", LABELS, 2, 0, alpha=1.0), "unknown options"),
])
def test_bad_options(call, match):
  with pytest.raises(ValueError, match=match):
    call()


def test_sampled_devices_match_their_documented_distribution():
  # More devices than examples, each with exactly its examples, drawn with
  # replacement. Pooled over devices, label frequencies are uniform (the
  # Dirichlet mean) on balanced classes; per device they are skewed like a
  # Dirichlet(alpha) draw: E[sum_c p_c^2] = (alpha + 1) / (C alpha + 1).
  n, s, alpha = 3000, 16, 0.3
  parts = P.make_partition("sampled", LABELS, n, seed=1, alpha=alpha,
                           examples_per_client=s)
  assert len(parts) == n and all(len(p) == s for p in parts)
  idx = np.concatenate(parts)
  assert idx.min() >= 0 and idx.max() < len(LABELS)
  freq = np.bincount(LABELS[idx], minlength=10) / idx.size
  np.testing.assert_allclose(freq, 0.1, atol=0.01)
  hist = np.stack([np.bincount(LABELS[p], minlength=10) for p in parts]) / s
  # E[sum_c phat_c^2] = E[sum p_c^2] (1 - 1/s) + 1/s for s draws from p.
  conc = (alpha + 1) / (10 * alpha + 1)
  want = conc * (1 - 1 / s) + 1 / s
  assert (hist ** 2).sum(1).mean() == pytest.approx(want, rel=0.05)
  again = P.make_partition("sampled", LABELS, n, seed=1, alpha=alpha,
                           examples_per_client=s)
  assert all(np.array_equal(a, b) for a, b in zip(parts, again))
  with pytest.raises(ValueError, match="examples_per_client"):
    P.make_partition("sampled", LABELS, 5, seed=1, examples_per_client=0)
