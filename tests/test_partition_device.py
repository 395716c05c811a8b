"""The device-correlated partition: labels that live on device classes."""

import numpy as np
import pytest

from ftte_jax.data import partition
from ftte_jax.experiment import planning
from launch import flags as flags_lib


def _pool(num_labels=10, per_label=200, seed=0):
  return np.random.default_rng(seed).permutation(
      np.repeat(np.arange(num_labels), per_label))


def test_home_classes_follow_device_shares():
  home = partition.home_classes(10, [0.6, 0.2, 0.2], seed=0)
  assert np.bincount(home, minlength=3).tolist() == [6, 2, 2]
  # A small class still gets a label; an absent one gets none.
  home = partition.home_classes(10, [0.97, 0.0, 0.03], seed=1)
  assert np.bincount(home, minlength=3).tolist() == [9, 0, 1]
  assert not np.array_equal(partition.home_classes(10, [0.5, 0.5], 0),
                            partition.home_classes(10, [0.5, 0.5], 5))


def test_full_correlation_puts_each_label_on_its_class_only():
  labels = _pool()
  cls = np.random.default_rng(1).permutation(np.repeat([0, 1, 2],
                                                       [60, 20, 20]))
  parts = partition.device_dirichlet(labels, cls, alpha=0.5, correlation=1.0,
                                     seed=3)
  everything = np.sort(np.concatenate(parts))
  np.testing.assert_array_equal(everything, np.arange(len(labels)))
  assert min(len(p) for p in parts) >= 1
  home = {}
  for i, p in enumerate(parts):
    for c in np.unique(labels[p]):
      home.setdefault(int(c), set()).add(int(cls[i]))
  # Every label lives on one class only (an emptied device's borrowed
  # example aside, which _fill_empty may move: none here).
  assert all(len(v) == 1 for v in home.values())
  counts = np.bincount([next(iter(v)) for v in home.values()], minlength=3)
  assert counts.tolist() == [6, 2, 2]
  again = partition.device_dirichlet(labels, cls, 0.5, 1.0, seed=3)
  assert all(np.array_equal(a, b) for a, b in zip(parts, again))


@pytest.mark.parametrize("rho", [0.0, 0.5])
def test_partial_correlation_shares_in_expectation(rho):
  # Share of label c on its home class: rho + (1 - rho) * share(home).
  labels = _pool(num_labels=20, per_label=300)
  cls = np.repeat([0, 1], [150, 50])  # class 1: a quarter of the devices.
  shares = []  # per label and seed: the share of its examples on class 1.
  for seed in range(6):
    parts = partition.device_dirichlet(labels, cls, 1.0, rho, seed)
    owner = np.empty(len(labels), np.int64)
    for i, p in enumerate(parts):
      owner[p] = cls[i]
    shares += [(owner[labels == c] == 1).mean() for c in range(20)]
  shares = np.asarray(shares)
  if rho == 0:
    # Independent of the class: every label ~25% on class 1 (its share).
    assert abs(shares.mean() - 0.25) < 0.02 and shares.max() < 0.45
  else:
    # 5 of 20 labels live on class 1: 0.5 + 0.5 * 0.25 = 0.625 of each is
    # there; of the others 0.5 * 0.25 = 0.125.
    hi, lo = shares[shares > 0.375], shares[shares <= 0.375]
    assert len(hi) == 5 * 6
    assert abs(hi.mean() - 0.625) < 0.03 and abs(lo.mean() - 0.125) < 0.03


def test_bad_options():
  labels = _pool(num_labels=2, per_label=10)
  with pytest.raises(ValueError, match="device_correlation"):
    partition.device_dirichlet(labels, np.zeros(4, int), 0.5, 1.5, 0)
  with pytest.raises(ValueError, match="needs device_class"):
    partition.make_partition("device_dirichlet", labels, 4, 0)
  with pytest.raises(ValueError, match="3 entries for 4 clients"):
    partition.make_partition("device_dirichlet", labels, 4, 0,
                             device_class=np.zeros(3, int))


def test_run_setup_ties_the_data_to_the_fleet():
  # End to end through the config: tiny data, a 50/50 mcu/phone fleet,
  # every label on its class; the partition sees the fleet's classes.
  cfg = flags_lib.resolve_args([
      "--dataset=tiny", "--model=mlp", "--num_clients=16",
      "--partition=device_dirichlet", "--device_correlation=1",
      "--fleet_profile=mcu:0.5,phone_high:0.5", "--proxy_examples=0",
      "--pretrain_steps=0", "--concurrency=8", "--buffer_size=4",
      "--seed=2"]).config
  data = planning.load_data(cfg).train
  fleet, tiers = planning.make_fleet(cfg, full_memory_bytes=1e6)
  tier = np.asarray(fleet.tier)
  np.testing.assert_array_equal(planning.device_classes(cfg), tier)
  assert len(tiers) == 2 and tiers[0] < 1e6 < tiers[1]
  y, off, cnt = (np.asarray(a) for a in (data.y, data.offsets, data.counts))
  seen = [set(), set()]
  for i in range(16):
    seen[tier[i]] |= set(y[off[i]:off[i] + cnt[i]].tolist())
  assert not seen[0] & seen[1] and seen[0] | seen[1] == {0, 1, 2, 3}
