"""Partitioners: split a pool of examples across federated clients.

Every partitioner is deterministic given ``seed``, puts each example on exactly
one client and gives every client at least one example. They return a list of
1-D int64 index arrays (one per client, sorted), the input ``from_partition``
in ``client_data`` expects. Partitioning is host-side numpy: it runs once per
experiment, never under jit.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

PARTITIONS = ("iid", "dirichlet", "shards", "quantity", "sampled",
              "device_dirichlet")


def _check_counts(num_examples: int, num_clients: int) -> None:
  if not isinstance(num_clients, (int, np.integer)) or num_clients < 1:
    raise ValueError(f"num_clients must be an integer >= 1, got {num_clients!r}")
  if num_clients > num_examples:
    raise ValueError(
        f"num_clients={num_clients} exceeds the {num_examples} examples: every "
        f"client needs >= 1 example, so num_clients must be in [1, "
        f"{num_examples}]")


def _finish(parts: Sequence[np.ndarray]) -> list[np.ndarray]:
  return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]


def _fill_empty(parts: list[list[int]] | list[np.ndarray],
                rng: np.random.Generator) -> list[np.ndarray]:
  """Moves one example from the largest client to each empty one.

  Label-skew sampling can leave a client empty when alpha is small; moving
  single examples keeps coverage exact and changes the skew minimally.
  """
  parts = [np.asarray(p, dtype=np.int64) for p in parts]
  sizes = np.array([len(p) for p in parts])
  for i in np.flatnonzero(sizes == 0):
    donor = int(np.argmax(sizes))
    take = int(rng.integers(sizes[donor]))
    parts[i] = parts[donor][take:take + 1]
    parts[donor] = np.delete(parts[donor], take)
    sizes[i], sizes[donor] = 1, sizes[donor] - 1
  return parts


def iid(num_examples: int, num_clients: int, seed: int) -> list[np.ndarray]:
  """Uniformly random, near-equal split (sizes differ by at most one).

  Args:
    num_examples: size of the pool.
    num_clients: number of clients, in [1, num_examples].
    seed: RNG seed.

  Returns:
    One sorted index array per client.
  """
  _check_counts(num_examples, num_clients)
  perm = np.random.default_rng(seed).permutation(num_examples)
  return _finish(np.array_split(perm, num_clients))


def dirichlet(labels: np.ndarray, num_clients: int, alpha: float,
              seed: int) -> list[np.ndarray]:
  """Label skew: each class is split across clients by a Dirichlet(alpha) draw.

  Small alpha concentrates each class on few clients (strong non-IID); large
  alpha approaches IID. This is the scheme of Hsu et al. (2019).

  Args:
    labels: [M] integer labels of the pool.
    num_clients: number of clients, in [1, M].
    alpha: Dirichlet concentration, > 0.
    seed: RNG seed.

  Returns:
    One sorted index array per client.
  """
  labels = np.asarray(labels)
  _check_counts(len(labels), num_clients)
  if not np.isfinite(alpha) or alpha <= 0:
    raise ValueError(f"alpha must be a finite number > 0 (small = more label "
                     f"skew), got {alpha!r}")
  rng = np.random.default_rng(seed)
  parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
  for c in np.unique(labels):
    idx = rng.permutation(np.flatnonzero(labels == c))
    props = rng.dirichlet(np.full(num_clients, float(alpha)))
    cuts = (np.cumsum(props)[:-1] * len(idx)).astype(np.int64)
    for i, chunk in enumerate(np.split(idx, cuts)):
      parts[i].append(chunk)
  merged = [np.concatenate(p) if p else np.zeros(0, np.int64) for p in parts]
  return _finish(_fill_empty(merged, rng))


def home_classes(num_labels: int, class_shares: Sequence[float],
                 seed: int) -> np.ndarray:
  """[num_labels] int: the device class each label lives on.

  Labels are dealt to classes in proportion to the classes' shares of the
  devices (largest remainder), every class with a share getting at least
  one label while there are labels to give, in a seeded random label
  order: the weak majority of a fleet holds the majority of the label
  kinds.
  """
  shares = np.asarray(class_shares, np.float64)
  if shares.ndim != 1 or not shares.size or (shares < 0).any() or not (
      shares.sum() > 0):
    raise ValueError(f"class_shares must be non-negative with a positive "
                     f"sum, got {list(class_shares)}")
  shares = shares / shares.sum()
  raw = shares * num_labels
  counts = np.floor(raw).astype(np.int64)
  counts[np.argsort(-(raw - counts), kind="stable")[:num_labels -
                                                    counts.sum()]] += 1
  # A present class without a label takes one from the class with most.
  for c in np.flatnonzero((shares > 0) & (counts == 0)):
    donor = int(np.argmax(counts))
    if counts[donor] <= 1:
      break
    counts[donor] -= 1
    counts[c] += 1
  order = np.random.default_rng(seed).permutation(num_labels)
  home = np.empty(num_labels, np.int64)
  home[order] = np.repeat(np.arange(shares.size), counts)
  return home


# Long for its docstring (the mixture law) and the within-class refill,
# which must stay beside the split it repairs.
def device_dirichlet(labels: np.ndarray, device_class: np.ndarray,
                     alpha: float, correlation: float, seed: int
                     ) -> list[np.ndarray]:
  """Label skew whose labels live on device classes.

  Every label has a home class (``home_classes``, from the classes' shares
  of the devices). Label ``c``'s examples are split across devices by
  ``p = (1 - correlation) * D + correlation * D_home``, with ``D`` a
  Dirichlet(alpha) draw over all devices (the ``dirichlet`` partition) and
  ``D_home`` one over the devices of ``c``'s home class only. So a share
  ``correlation + (1 - correlation) * share(home)`` of each label sits on
  its home class in expectation; at 1 a label exists only there, and a
  class left out of training (e.g. devices too small to train the full
  model) takes its labels with it; at 0 this is the ``dirichlet``
  partition's law.

  Args:
    labels: [M] integer labels of the pool.
    device_class: [N] int class of each device (``fleet.device_classes``).
    alpha: Dirichlet concentration, > 0.
    correlation: in [0, 1].
    seed: RNG seed.

  Returns:
    One sorted index array per device; every example on exactly one.
  """
  labels = np.asarray(labels)
  device_class = np.asarray(device_class).reshape(-1)
  num_clients = device_class.size
  _check_counts(len(labels), num_clients)
  if not np.isfinite(alpha) or alpha <= 0:
    raise ValueError(f"alpha must be a finite number > 0 (small = more label "
                     f"skew), got {alpha!r}")
  if not 0 <= correlation <= 1:
    raise ValueError(f"device_correlation must be in [0, 1], got "
                     f"{correlation!r}")
  if (device_class < 0).any():
    raise ValueError("device_class must be >= 0 everywhere")
  rng = np.random.default_rng(seed)
  classes = np.unique(labels)
  shares = np.bincount(device_class) / num_clients
  home = home_classes(len(classes), shares, int(rng.integers(2**31)))
  parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
  for c, h in zip(classes, home):
    idx = rng.permutation(np.flatnonzero(labels == c))
    on = np.flatnonzero(device_class == h)
    props = (1.0 - correlation) * rng.dirichlet(
        np.full(num_clients, float(alpha)))
    props[on] += correlation * rng.dirichlet(np.full(on.size, float(alpha)))
    # Normalized so the devices after the last with a share get exactly
    # none (a cumulative sum a rounding below 1 would hand the last one an
    # example of a label not on its class).
    total = np.cumsum(props)
    cuts = (total[:-1] / total[-1] * len(idx)).astype(np.int64)
    for i, chunk in enumerate(np.split(idx, cuts)):
      parts[i].append(chunk)
  merged = [np.concatenate(p) if p else np.zeros(0, np.int64) for p in parts]
  # An empty device borrows from the largest device of its own class, so a
  # label never leaves its class to fill one.
  for c in np.unique(device_class):
    on = np.flatnonzero(device_class == c)
    filled = _fill_empty([merged[i] for i in on], rng)
    for i, p in zip(on, filled):
      merged[i] = p
  return _finish(_fill_empty(merged, rng))


def sampled(labels: np.ndarray, num_clients: int, alpha: float,
            examples_per_client: int, seed: int) -> list[np.ndarray]:
  """Every device draws its own data from the pool, with replacement.

  Device ``i`` draws label proportions ``p_i ~ Dirichlet(alpha)`` and then
  ``examples_per_client`` examples: a label from ``p_i``, then a pool
  example of that label uniformly. Devices are i.i.d. draws of one
  distribution, so any number of them (more than the pool holds) sees the
  same per-device distribution; devices may share examples. For scaling
  studies over the number of devices.

  Returns:
    One sorted index array per client (repeats allowed).
  """
  labels = np.asarray(labels)
  if not np.isfinite(alpha) or alpha <= 0:
    raise ValueError(f"alpha must be a finite number > 0 (small = more label "
                     f"skew), got {alpha!r}")
  if int(examples_per_client) < 1 or int(num_clients) < 1:
    raise ValueError("examples_per_client and num_clients must be >= 1, got "
                     f"{examples_per_client} and {num_clients}")
  rng = np.random.default_rng(seed)
  classes, size = np.unique(labels, return_counts=True)
  by_class = np.argsort(labels, kind="stable")
  start = np.concatenate([[0], np.cumsum(size)[:-1]])
  p = rng.dirichlet(np.full(len(classes), float(alpha)), size=num_clients)
  u = rng.random((num_clients, int(examples_per_client)))
  cls = (u[..., None] > np.cumsum(p, 1)[:, None, :]).sum(-1)
  cls = np.minimum(cls, len(classes) - 1)  # u == 1 - eps rounding.
  pick = (rng.random(cls.shape) * size[cls]).astype(np.int64)
  idx = by_class[start[cls] + np.minimum(pick, size[cls] - 1)]
  return [np.sort(row) for row in idx]


def shards(labels: np.ndarray, num_clients: int, shards_per_client: int,
           seed: int, allow_uneven: bool = False) -> list[np.ndarray]:
  """Pathological non-IID (McMahan et al. 2017): label-sorted shards per client.

  The pool is sorted by label, cut into ``num_clients * shards_per_client``
  equal shards, and each client gets ``shards_per_client`` random shards, so
  it sees only a few classes.

  Args:
    labels: [M] integer labels of the pool.
    num_clients: number of clients.
    shards_per_client: shards each client receives, >= 1.
    seed: RNG seed.
    allow_uneven: if False (default), the shard count must divide M exactly;
      if True, shards differ in size by at most one example.

  Returns:
    One sorted index array per client.
  """
  labels = np.asarray(labels)
  m = len(labels)
  if not isinstance(shards_per_client, (int, np.integer)) or shards_per_client < 1:
    raise ValueError(f"shards_per_client must be an integer >= 1, got "
                     f"{shards_per_client!r}")
  _check_counts(m, num_clients)
  num_shards = num_clients * shards_per_client
  if num_shards > m:
    raise ValueError(f"num_clients * shards_per_client = {num_shards} shards "
                     f"exceeds the {m} examples; need <= {m} shards")
  if m % num_shards and not allow_uneven:
    raise ValueError(
        f"shards: {num_shards} shards (num_clients={num_clients} x "
        f"shards_per_client={shards_per_client}) do not divide the {m} "
        f"examples; choose a shard count that divides {m}, or pass "
        f"allow_uneven=True")
  rng = np.random.default_rng(seed)
  # Stable sort after a shuffle: same-label order is random but reproducible.
  perm = rng.permutation(m)
  order = perm[np.argsort(labels[perm], kind="stable")]
  pieces = np.array_split(order, num_shards)
  assign = rng.permutation(num_shards).reshape(num_clients, shards_per_client)
  return _finish([np.concatenate([pieces[s] for s in row]) for row in assign])


def quantity(num_examples: int, num_clients: int, sigma: float,
             seed: int) -> list[np.ndarray]:
  """Quantity skew: IID labels, lognormal(0, sigma) client sizes.

  Args:
    num_examples: size of the pool.
    num_clients: number of clients, in [1, num_examples].
    sigma: lognormal shape, >= 0 (0 gives equal sizes).
    seed: RNG seed.

  Returns:
    One sorted index array per client.
  """
  _check_counts(num_examples, num_clients)
  if not np.isfinite(sigma) or sigma < 0:
    raise ValueError(f"sigma must be a finite number >= 0, got {sigma!r}")
  rng = np.random.default_rng(seed)
  w = rng.lognormal(0.0, float(sigma), num_clients)
  # One example reserved per client, the rest by largest remainder.
  spare = num_examples - num_clients
  raw = w / w.sum() * spare
  sizes = np.floor(raw).astype(np.int64)
  rest = spare - sizes.sum()
  sizes[np.argsort(-(raw - sizes), kind="stable")[:rest]] += 1
  sizes += 1
  perm = rng.permutation(num_examples)
  return _finish(np.split(perm, np.cumsum(sizes)[:-1]))


def make_partition(name: str, labels: np.ndarray, num_clients: int, seed: int,
                   **opts) -> list[np.ndarray]:
  """Partitions a labelled pool by name.

  Args:
    name: one of 'iid', 'dirichlet' (opt ``alpha``, default 0.5), 'shards'
      (opts ``shards_per_client``, default 2, ``allow_uneven``), 'quantity'
      (opt ``sigma``, default 1.0), 'sampled' (opts ``alpha`` and
      ``examples_per_client``, default 32; with replacement),
      'device_dirichlet' (opts ``device_class`` [N], required, ``alpha``,
      default 0.5, ``correlation``, default 1).
    labels: [M] integer labels.
    num_clients: number of clients.
    seed: RNG seed.
    **opts: options of the chosen partitioner.

  Returns:
    One sorted index array per client.
  """
  labels = np.asarray(labels)
  table: dict[str, tuple[Callable[..., list[np.ndarray]], set[str]]] = {
      "iid": (lambda: iid(len(labels), num_clients, seed), set()),
      "dirichlet": (lambda alpha=0.5: dirichlet(labels, num_clients, alpha,
                                                seed), {"alpha"}),
      "shards": (lambda shards_per_client=2, allow_uneven=False: shards(
          labels, num_clients, shards_per_client, seed, allow_uneven),
                 {"shards_per_client", "allow_uneven"}),
      "quantity": (lambda sigma=1.0: quantity(len(labels), num_clients, sigma,
                                              seed), {"sigma"}),
      "sampled": (lambda alpha=0.5, examples_per_client=32: sampled(
          labels, num_clients, alpha, examples_per_client, seed),
                  {"alpha", "examples_per_client"}),
      "device_dirichlet": (lambda device_class=None, alpha=0.5,
                           correlation=1.0:
                           _device_dirichlet(labels, num_clients,
                                             device_class, alpha,
                                             correlation, seed),
                           {"alpha", "device_class", "correlation"}),
  }
  if name not in table:
    raise ValueError(f"partition: unknown {name!r}; valid: {sorted(table)}")
  fn, allowed = table[name]
  unknown = set(opts) - allowed
  if unknown:
    raise ValueError(f"partition {name!r}: unknown options {sorted(unknown)}; "
                     f"valid: {sorted(allowed)}")
  return fn(**opts)


def _device_dirichlet(labels, num_clients, device_class, alpha, correlation,
                      seed):
  if device_class is None:
    raise ValueError("partition 'device_dirichlet' needs device_class, the "
                     "class of each device (fleet.device_classes)")
  if np.asarray(device_class).size != num_clients:
    raise ValueError(f"partition 'device_dirichlet': device_class has "
                     f"{np.asarray(device_class).size} entries for "
                     f"{num_clients} clients")
  return device_dirichlet(labels, device_class, alpha, correlation, seed)


def label_histograms(labels: np.ndarray, parts: Sequence[np.ndarray],
                     num_classes: int) -> np.ndarray:
  """Returns [N, num_classes] int64 label counts per client."""
  labels = np.asarray(labels)
  return np.stack([np.bincount(labels[p], minlength=num_classes)
                   for p in parts])


def mean_tv_distance(labels: np.ndarray, parts: Sequence[np.ndarray],
                     num_classes: int) -> float:
  """Mean total-variation distance of client label mixes from the global one.

  0 means every client has the global mix; values near 1 mean clients see
  disjoint classes.

  Args:
    labels: [M] integer labels.
    parts: per-client index arrays.
    num_classes: number of classes.

  Returns:
    The mean over clients of 0.5 * ||p_client - p_global||_1.
  """
  hist = label_histograms(labels, parts, num_classes).astype(np.float64)
  glob = np.bincount(np.asarray(labels), minlength=num_classes) / len(labels)
  p = hist / hist.sum(axis=1, keepdims=True)
  return float(np.mean(0.5 * np.abs(p - glob).sum(axis=1)))


def split_holdout(parts: Sequence[np.ndarray], fraction: float, seed: int
                  ) -> tuple[list[np.ndarray], list[np.ndarray]]:
  """Each client's held-out slice: examples it keeps for its own evaluation.

  Client i holds out ``round(fraction * u_i)`` of its ``u_i`` distinct
  examples, at least 1 and at most ``u_i - 1``, chosen by ``seed``. Every
  occurrence of a held-out example leaves training (a ``sampled`` partition
  may list one example twice), so the two slices never share an example.

  Args:
    parts: the partition, one index array per client.
    fraction: in (0, 1).
    seed: seeds the choice.

  Returns:
    ``(train_parts, held_parts)``.

  Raises:
    ValueError: a client has fewer than 2 distinct examples.
  """
  if not 0 < fraction < 1:
    raise ValueError(f"holdout_fraction must be in (0, 1), got {fraction!r}")
  rng = np.random.default_rng(seed)
  train, held = [], []
  for i, p in enumerate(parts):
    p = np.asarray(p)
    distinct = np.unique(p)
    if distinct.size < 2:
      raise ValueError(f"holdout_fraction: client {i} has {distinct.size} "
                       "distinct example(s); a held-out slice needs at least "
                       "2 (one to train, one to evaluate)")
    n_held = int(np.clip(round(fraction * distinct.size), 1,
                         distinct.size - 1))
    out = rng.choice(distinct, n_held, replace=False)
    held.append(np.sort(out))
    train.append(p[~np.isin(p, out)])
  return train, held
