"""Small natural-client datasets written in the published formats.

LEAF's JSON (``users``, ``num_samples``, ``user_data``, optional
``hierarchies``; ``<root>/<name>/{train,test}/*.json``) and TFF's HDF5
(``examples/<client id>/<feature>``), generated so that a model can learn
from them: FEMNIST writers draw noisy class prototypes in a writer's own
stroke offset; Shakespeare roles speak lines of a small grammar.
"""

import json
import os

import numpy as np

SEQ = 80
WORDS = ("the", "king", "queen", "doth", "speak", "thee", "my", "lord",
         "good", "night", "sweet", "prince", "and", "love", "not")


def femnist_writer(rng, n, num_classes=10, protos=None, noise=0.1):
  """``n`` examples of one writer: 784 floats in [0, 1] and labels."""
  if protos is None:
    protos = np.random.default_rng(123).uniform(0, 1, (num_classes, 784))
  y = rng.integers(0, num_classes, n)
  shift = rng.normal(0, 0.05)
  x = np.clip(protos[y] + shift + rng.normal(0, noise, (n, 784)), 0, 1)
  return np.round(x, 3).tolist(), y.tolist()


def femnist_users(num_users, per_user, seed=0, num_classes=10):
  """{writer id: (x, y)} with ``per_user`` examples each (int or list)."""
  rng = np.random.default_rng(seed)
  sizes = (per_user if isinstance(per_user, (list, tuple)) else
           [per_user] * num_users)
  return {f"f{k:04d}_{k % 7:02d}": femnist_writer(rng, n, num_classes)
          for k, n in enumerate(sizes)}


def role_text(rng, chars):
  """About ``chars`` characters of a role's lines."""
  words = []
  while sum(len(w) + 1 for w in words) < chars:
    words.append(WORDS[int(rng.integers(len(WORDS)))])
    if rng.random() < 0.15:
      words[-1] += "."
  return " ".join(words)


def windows(text, seq=SEQ):
  """LEAF's examples of a text: every ``seq``-character window and the
  character after it (shake_utils.__txt_to_data)."""
  xs = [text[i:i + seq] for i in range(len(text) - seq)]
  ys = [text[i + seq] for i in range(len(text) - seq)]
  return xs, ys


def shakespeare_users(num_users, per_user, seed=0):
  """{role id: (x, y)}: ``per_user`` LEAF windows of a generated role."""
  rng = np.random.default_rng(seed)
  sizes = (per_user if isinstance(per_user, (list, tuple)) else
           [per_user] * num_users)
  out = {}
  for k, n in enumerate(sizes):
    xs, ys = windows(role_text(rng, n + SEQ + 1))
    out[f"THE_PLAY_ROLE{k}"] = (xs[:n], ys[:n])
  return out


def split_users(users, train_fraction=0.8):
  """LEAF's '-t sample' split: each user's first share trains, the rest
  tests (users with fewer than 2 examples train only)."""
  train, test = {}, {}
  for u, (x, y) in users.items():
    k = max(1, int(train_fraction * len(y))) if len(y) >= 2 else len(y)
    train[u] = (x[:k], y[:k])
    test[u] = (x[k:], y[k:])
  return train, test


def leaf_object(users, hierarchies=False):
  obj = {"users": list(users),
         "num_samples": [len(y) for _, y in users.values()],
         "user_data": {u: {"x": x, "y": y} for u, (x, y) in users.items()}}
  if hierarchies:
    obj["hierarchies"] = ["THE_PLAY"] * len(users)
  return obj


def write_leaf(root, name, split, users, files=1, hierarchies=False):
  """Writes ``users`` as LEAF JSON files of one split; returns the paths."""
  folder = os.path.join(root, name, split)
  os.makedirs(folder, exist_ok=True)
  ids = list(users)
  chunks = np.array_split(np.arange(len(ids)), files)
  paths = []
  for j, chunk in enumerate(chunks):
    part = {ids[i]: users[ids[i]] for i in chunk}
    path = os.path.join(folder, f"all_data_{j}_niid_1_keep_0_{split}_9.json")
    with open(path, "w", encoding="utf-8") as f:
      json.dump(leaf_object(part, hierarchies), f, ensure_ascii=False)
    paths.append(path)
  return paths


def write_leaf_dataset(root, name, users, train_fraction=0.8, files=1):
  """Both splits of ``users`` (LEAF's sample split)."""
  train, test = split_users(users, train_fraction)
  return (write_leaf(root, name, "train", train, files,
                     hierarchies=name == "shakespeare"),
          write_leaf(root, name, "test", test, files,
                     hierarchies=name == "shakespeare"))


def write_tff(path, clients, feature_fn):
  """TFF's HDF5 layout: examples/<client id>/<feature> datasets."""
  import h5py  # pylint: disable=import-outside-toplevel
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with h5py.File(path, "w") as f:
    group = f.create_group("examples")
    for cid, value in clients.items():
      g = group.create_group(cid)
      for feature, array in feature_fn(value).items():
        g.create_dataset(feature, data=array)
