"""The data options of a run: one declaration, one default each.

``DataConfig`` is the only place a data option is given a default;
``datasets.load_federated`` and the partitioners receive its values typed
(``resolved``), never defaults of their own. Options whose best value
depends on the dataset take ``'auto'`` (or None for ``partition``) and are
resolved by ``resolved``:

  proxy_examples  300 for the pooled real datasets (mnist, fashion_mnist,
                  cifar10, digits: a server-held set of pool examples); 0
                  where there is no common pool (synthetic, femnist,
                  shakespeare), for the generated ``tiny`` set and for an
                  ``npz`` of unknown size.
  num_test        the pool split's held-out size: 2,000 (mnist,
                  fashion_mnist, cifar10), 360 (digits), 128 (tiny); 0 where
                  the test set comes with the data.
  split           'pool' for mnist, 'standard' for fashion_mnist and cifar10
                  (the other datasets have one split of their own: auto).
  partition       'natural' for datasets whose clients are given (synthetic,
                  femnist, shakespeare), 'dirichlet' for pooled data.
"""

from __future__ import annotations

import dataclasses

from ftte_jax.core import options
from ftte_jax.core.options import option
from ftte_jax.data import partition as partition_lib

AUTO = options.AUTO
# Pooled datasets: one pool of examples that a partitioner splits.
POOLED = ("mnist", "fashion_mnist", "cifar10", "npz", "digits", "tiny")
# Datasets whose clients are given by the data: no partitioner.
NATURAL = ("synthetic", "femnist", "shakespeare")
DATASETS = POOLED + NATURAL
# Datasets that hold a test set out of their pool by ``num_test``.
POOL_SPLIT = ("mnist", "fashion_mnist", "cifar10", "digits", "tiny")
PARTITIONS = tuple(partition_lib.PARTITIONS) + ("natural",)
# What a natural dataset's clients are.
CLIENTS_ARE = {"synthetic": "generated devices", "femnist": "writers",
               "shakespeare": "speaking roles"}
SPLITS = ("pool", "standard")
# Datasets with a choice of split (the others have their own: 'auto').
SPLIT_CHOICE = ("mnist", "fashion_mnist", "cifar10")
SOURCES = ("auto", "leaf", "tff")
# The pooled-data default of the proxy set (the server's own examples), and
# the datasets it applies to (real pools of known, ample size).
POOLED_PROXY_EXAMPLES = 300
PROXY_POOLS = ("mnist", "fashion_mnist", "cifar10", "digits")
_NUM_TEST = {"digits": 360, "tiny": 128}
_POOLED_NUM_TEST = 2000


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """Dataset and partition (see ``datasets.load_federated``)."""

  dataset: str = option(
      "mnist", choices=DATASETS,
      help="dataset: mnist, fashion_mnist, cifar10 (downloaded on first "
      "use, SHA-256 checked), npz (your .npz, --npz_path), digits "
      "(scikit-learn's), tiny and synthetic (generated, FedProx's "
      "Synthetic(alpha, beta)), femnist (62 classes, one client per writer) "
      "and shakespeare (next character, one client per speaking role), "
      "these two from LEAF's JSON or TFF's HDF5 (--source)")
  data_dir: str | None = option(
      None, help="directory holding the dataset files; None: "
      "$FTTE_DATA_DIR, else ~/.cache/ftte_jax")
  npz_path: str | None = option(
      None,
      help="the .npz file (x_train, y_train, x_test, y_test) of "
      "dataset=npz; only with it")
  source: str = option(
      "auto", choices=SOURCES,
      help="file format of femnist and shakespeare: leaf (LEAF's JSON in "
      "<data_dir>/<dataset>/train and test), tff (TFF's HDF5 files, "
      "downloaded and SHA-256 checked on first use; needs h5py), or auto "
      "(leaf where its files are present, else tff)")
  num_clients: int = option(
      100, low=1,
      help="number of simulated clients (devices), N; for femnist and "
      "shakespeare this many of the dataset's writers/roles are taken, a "
      "seeded sample (split_seed) unless it is all of them")
  partition: str | None = option(
      None, choices=PARTITIONS,
      help="how the training pool is split across clients; None: the "
      "dataset's own (natural for synthetic, femnist and shakespeare, "
      "whose clients are given and which refuse any other; dirichlet for "
      "pooled data)")
  dirichlet_alpha: float = option(
      0.5, low=0, low_inclusive=False,
      help="Dirichlet label-skew concentration (smaller = more skew), for "
      "partition=dirichlet and sampled")
  shards_per_client: int = option(
      2, low=1, help="label shards per client, for partition=shards")
  allow_uneven: bool = option(
      False,
      help="partition=shards: allow shards that differ by one example when "
      "their number does not divide the pool")
  examples_per_client: int = option(
      32, low=1,
      help="examples each device draws from the pool, with replacement, "
      "for partition=sampled (label proportions Dirichlet(dirichlet_alpha) "
      "per device; any number of devices, same per-device distribution)")
  quantity_sigma: float = option(
      1.0, low=0,
      help="lognormal sigma of client sizes, for partition=quantity")
  device_correlation: float = option(
      1.0, low=0, high=1,
      help="partition=device_dirichlet: how much the data depends on the "
      "device class (fleet_profile's class, or the memory tier). Each label "
      "lives on a home class (labels dealt in proportion to the classes' "
      "device shares); this share of its examples is split among the home "
      "class's devices only, the rest Dirichlet(dirichlet_alpha) over all "
      "devices. 1: a label exists only on its class (leaving a class out "
      "loses its labels); 0: the dirichlet partition")
  split: str = option(
      AUTO, choices=SPLITS + (AUTO,),
      help="mnist, fashion_mnist, cifar10: 'pool' holds num_test examples "
      "of the test file out and pools the rest (MNIST's t10k file alone), "
      "'standard' trains on the train files and tests on the test file; "
      "auto: pool for mnist, standard otherwise")
  num_test: int | str = option(
      AUTO, low=0, auto=True,
      help="held-out test examples of a pool split (mnist, fashion_mnist, "
      "cifar10 with split=pool; digits; tiny); auto: 2000, digits 360, "
      "tiny 128, and 0 for datasets whose test set comes with their files")
  proxy_examples: int | str = option(
      AUTO, low=0, auto=True,
      help="training-pool examples the server holds instead of any client "
      "(the proxy set: central pretraining, launch.pretrain, and "
      "importance=proxy); disjoint from every client's data and from the "
      "test set. 0: none; auto: 300 for mnist, fashion_mnist, cifar10 and "
      "digits, 0 for tiny, npz and where there is no common pool "
      "(synthetic, femnist, shakespeare)")
  holdout_fraction: float = option(
      0.0, low=0, high=1, high_inclusive=False,
      help="share of each client's examples it holds out for its own "
      "(personalized) evaluation and never trains on; 0: no per-device "
      "evaluation")
  split_seed: int | None = option(
      None, low=0,
      help="seed of the test and proxy splits and of the sample of natural "
      "clients (None: the run's seed), so runs of several seeds can share "
      "one split and one pretrained checkpoint")
  max_examples_per_client: int | None = option(
      None, low=1,
      help="femnist and shakespeare: each client keeps at most this many "
      "of its training examples, and at most this many test examples "
      "(the first ones in file order); synthetic: caps FedProx's lognormal "
      "sizes. None: all")
  synthetic_alpha: float = option(
      1.0, low=0,
      help="alpha of FedProx's Synthetic(alpha, beta): spread of the "
      "devices' models (dataset=synthetic only)")
  synthetic_beta: float = option(
      1.0, low=0,
      help="beta of FedProx's Synthetic(alpha, beta): spread of the devices' "
      "inputs (dataset=synthetic only)")
  synthetic_samples_per_client: int | None = option(
      None, low=2,
      help="if set, every synthetic device holds exactly this many samples "
      "instead of FedProx's lognormal sizes (scaling studies: a million "
      "devices of the default sizes would be 450M examples); "
      "dataset=synthetic only")

  @property
  def natural(self) -> bool:
    """Whether the dataset's clients are given (no partitioner)."""
    return self.dataset in NATURAL

  def resolved(self) -> DataConfig:
    """This config with every 'auto' (and a None partition) replaced by
    the dataset's value (module docstring); idempotent."""
    d = self.dataset
    split = self.split
    if split == AUTO and d in SPLIT_CHOICE:
      split = "pool" if d == "mnist" else "standard"
    num_test = self.num_test
    if options.is_auto(_option("num_test"), num_test):
      num_test = (_NUM_TEST.get(d, _POOLED_NUM_TEST) if has_pool_split(
          d, split) else 0)
    proxy = self.proxy_examples
    if options.is_auto(_option("proxy_examples"), proxy):
      proxy = POOLED_PROXY_EXAMPLES if d in PROXY_POOLS else 0
    partition = self.partition
    if partition is None:
      partition = "natural" if d in NATURAL else "dirichlet"
    return dataclasses.replace(self, split=split, num_test=num_test,
                               proxy_examples=proxy, partition=partition)


def has_pool_split(dataset: str, split: str) -> bool:
  """Whether ``dataset`` with ``split`` holds its test set out of its pool."""
  if dataset in SPLIT_CHOICE:
    return split == "pool"
  return dataset in POOL_SPLIT


def _option(field: str) -> options.Option:
  return next(o for o in options.options(DataConfig) if o.field == field)


def validate(config: DataConfig) -> None:
  """Checks the data options, each alone and together (nothing is read).

  Raises:
    ValueError: naming the option (the launcher writes it as --option).
  """
  options.check_fields(config)
  d = config.dataset
  if (d == "npz") != (config.npz_path is not None):
    raise ValueError("npz_path: dataset=npz needs --npz_path=<file.npz> "
                     "and no other dataset takes one (got dataset="
                     f"{d!r}, npz_path={config.npz_path!r})")
  r = config.resolved()
  if d in NATURAL and r.partition != "natural":
    raise ValueError(
        f"partition: {d}'s clients are given by the data (its "
        f"{CLIENTS_ARE[d]}), so it takes no partitioner; drop "
        f"--partition={r.partition} (or give natural)")
  if d not in NATURAL and r.partition == "natural":
    raise ValueError(f"partition: 'natural' needs a dataset whose clients "
                     f"are given ({', '.join(NATURAL)}); {d} is one pool: "
                     f"choose one of {list(partition_lib.PARTITIONS)}")
  if config.split != AUTO and d not in SPLIT_CHOICE:
    raise ValueError(f"split: only mnist, fashion_mnist and cifar10 have a "
                     f"choice of split; {d} has its own")
  if not options.is_auto(_option("num_test"), config.num_test):
    pool = has_pool_split(d, r.split)
    if pool and config.num_test < 1:
      raise ValueError(f"num_test: {d}'s pool split holds out at least 1 "
                       "test example")
    if not pool and config.num_test:
      raise ValueError(f"num_test: {d}"
                       f"{' with split=standard' if d in POOL_SPLIT else ''}"
                       " takes its test set from its files, not out of a "
                       "pool; drop --num_test")
  if d in NATURAL and r.proxy_examples:
    raise ValueError(f"proxy_examples: {d}'s clients have no common pool to "
                     "hold a proxy set out of; use 0 (or auto)")
  if config.source != "auto" and d not in ("femnist", "shakespeare"):
    raise ValueError(f"source: only femnist and shakespeare come in several "
                     f"file formats; {d} has one")
