"""Natural-client datasets: FEMNIST by writer, Shakespeare by speaking role.

Two published layouts are read, each split into the benchmark's own train
and test files (per-writer / per-role held-out examples):

* LEAF's JSON (github.com/TalwalkarLab/leaf, ``preprocess.sh``): every
  ``*.json`` file under ``<data_dir>/<name>/train/`` and ``.../test/`` is an
  object with ``users`` (ids), ``num_samples`` and ``user_data`` (id ->
  ``{"x": [...], "y": [...]}``), ``hierarchies`` optional. FEMNIST: x is 784
  numbers in [0, 1] per image (a 28x28 image, background 1), y in 0..61.
  Shakespeare: x is an 80-character string, y the next character.
* TFF's HDF5 (``tff.simulation.datasets`` before its SQLite files): a group
  ``examples/<client id>/`` per client. ``fed_emnist_{train,test}.h5``:
  ``pixels`` [n, 28, 28] float32 (background 1) and ``label`` [n] int32;
  ``shakespeare_{train,test}.h5``: ``snippets`` [n] byte strings. Needs
  h5py (an optional dependency).

Shakespeare's characters map to LEAF's ids (``LETTERS.find(c)`` in LEAF's
``models/utils/language_utils.py``) for the 80 letters it knows. LEAF has no
id for other characters (``find`` returns -1: an invalid embedding index,
and the last class in its one-hot labels); here every other character
(non-ASCII included) maps to ``OOV`` and is counted. Examples become
sequences: a LEAF example ``(x, y)`` gives inputs ``x`` and targets
``x[1:] + y`` (every position predicts the next character; the last target
is LEAF's label), with a mask of real tokens; TFF's snippets are joined
per client with BOS/EOS marks and cut into ``SEQ_LEN`` chunks, as FedJAX's
``shakespeare.preprocess_client`` does, with PAD (mask 0) after the end.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import numpy as np

# LEAF's 80 letters (models/utils/language_utils.py ALL_LETTERS): id = index.
LETTERS = ("\n !\"&'(),-.0123456789:;>?ABCDEFGHIJKLMNOPQRSTUVWXYZ[]"
           "abcdefghijklmnopqrstuvwxyz}")
OOV, BOS, EOS, PAD = 80, 81, 82, 83  # ids after LEAF's letters.
VOCAB_SIZE = 84
SEQ_LEN = 80  # LEAF's and FedJAX's sequence length.
FEMNIST_CLASSES = 62
IMAGE_SIZE = 28
NAMES = ("femnist", "shakespeare")
TFF_FILES = {"femnist": "fed_emnist_{}.h5", "shakespeare": "shakespeare_{}.h5"}

# Code point -> id; built once (1.1 MB), applied to whole users at a time.
_LUT = np.full(0x110000, OOV, np.int8)
_LUT[[ord(c) for c in LETTERS]] = np.arange(len(LETTERS), dtype=np.int8)


class FormatError(ValueError):
  """A natural dataset's file is not in its published format (datasets
  re-raises it as ``DatasetFormatError``)."""


@dataclasses.dataclass(frozen=True)
class Split:
  """One split (train or test) of a natural dataset, examples by user."""

  users: tuple[str, ...]  # [U] ids in file order.
  arrays: dict  # name -> [M, ...]: x, y (and mask), user after user.
  counts: np.ndarray  # [U] int64: examples of each user (0 allowed).
  files: tuple[str, ...]  # the files read.
  oov: int = 0  # characters mapped to OOV (shakespeare).
  num_samples_mismatch: int = 0  # users whose num_samples != len(y).

  @property
  def offsets(self) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(self.counts)[:-1]]).astype(np.int64)


def leaf_dir(root: Path, name: str, split: str) -> Path:
  return Path(root) / name / split


def leaf_files(root: Path, name: str, split: str) -> list[Path]:
  """LEAF's ``*.json`` files of one split, sorted by name."""
  folder = leaf_dir(root, name, split)
  return sorted(folder.glob("*.json")) if folder.is_dir() else []


def tff_path(root: Path, name: str, split: str) -> Path:
  return Path(root) / name / TFF_FILES[name].format(split)


def encode(text: str) -> np.ndarray:
  """Character ids of ``text`` (LEAF's letters, else OOV), int32."""
  # surrogatepass: JSON may hold a lone surrogate (\ud800), an OOV id too.
  codes = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), np.uint32)
  return _LUT[codes].astype(np.int32)


def _read_json(path: Path) -> dict:
  try:
    with open(path, "rb") as f:
      obj = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise FormatError(f"{path}: not valid JSON, corrupt or truncated "
                      f"({type(e).__name__}: {e})") from e
  if not isinstance(obj, dict) or not {"users", "user_data"} <= set(obj):
    keys = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
    raise FormatError(f"{path}: a LEAF file is an object with 'users', "
                      f"'num_samples' and 'user_data'; found {keys}")
  users, data = obj["users"], obj["user_data"]
  if not isinstance(users, list) or not isinstance(data, dict):
    raise FormatError(f"{path}: 'users' must be a list and 'user_data' an "
                      "object")
  return obj


def _femnist_user(path, user, ux, uy, cap):
  n = len(uy)
  take = n if cap is None else min(n, cap)
  try:
    x = np.asarray(ux[:take], np.float32)
    y = np.asarray(uy[:take])
  except (TypeError, ValueError) as e:
    raise FormatError(f"{path}: user {user!r}: x must be lists of "
                      f"{IMAGE_SIZE * IMAGE_SIZE} numbers and y integers "
                      f"({e})") from e
  if take and x.shape != (take, IMAGE_SIZE * IMAGE_SIZE):
    raise FormatError(f"{path}: user {user!r}: each x must be "
                      f"{IMAGE_SIZE * IMAGE_SIZE} numbers, got shape "
                      f"{x.shape[1:]}")
  if take and not np.isfinite(x).all():
    raise FormatError(f"{path}: user {user!r}: x holds a non-finite value")
  if take and (y.dtype.kind not in "iu" or y.min() < 0 or
               y.max() >= FEMNIST_CLASSES):
    raise FormatError(f"{path}: user {user!r}: labels must be integers in "
                      f"[0, {FEMNIST_CLASSES}), got {y[:5].tolist()}...")
  x = x.reshape(take, IMAGE_SIZE, IMAGE_SIZE, 1)
  return {"x": x, "y": y.astype(np.int32)}


def _shakespeare_user(path, user, ux, uy, cap):
  n = len(uy)
  take = n if cap is None else min(n, cap)
  xs, ys = ux[:take], uy[:take]
  if not all(isinstance(s, str) and 1 <= len(s) <= SEQ_LEN for s in xs):
    raise FormatError(f"{path}: user {user!r}: each x must be a string of 1 "
                      f"to {SEQ_LEN} characters")
  if not all(isinstance(c, str) and len(c) == 1 for c in ys):
    raise FormatError(f"{path}: user {user!r}: each y must be one character")
  lengths = np.fromiter((len(s) for s in xs), np.int64, take)
  ids = encode("".join(xs))
  nxt = encode("".join(ys))
  x = np.full((take, SEQ_LEN), PAD, np.int32)
  y = np.full((take, SEQ_LEN), PAD, np.int32)
  mask = np.zeros((take, SEQ_LEN), np.float32)
  if take and (lengths == SEQ_LEN).all():  # LEAF's windows: all full.
    x[:] = ids.reshape(take, SEQ_LEN)
    y[:, :-1] = x[:, 1:]
    y[:, -1] = nxt
    mask[:] = 1
  else:
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    for i, (s, n_i) in enumerate(zip(starts, lengths)):
      x[i, :n_i] = ids[s:s + n_i]
      y[i, :n_i - 1] = ids[s + 1:s + n_i]
      y[i, n_i - 1] = nxt[i]
      mask[i, :n_i] = 1
  oov = int((ids == OOV).sum() + (nxt == OOV).sum())
  return {"x": x, "y": y, "mask": mask}, oov


def read_leaf(root: Path, name: str, split: str,
              cap: int | None = None) -> Split:
  """Reads every LEAF JSON file of one split, capping each user at ``cap``
  examples (the first ones).

  Raises:
    FormatError: naming the file, when a file is not valid JSON or not in
      LEAF's layout, or a user appears in two files.
  """
  files = leaf_files(root, name, split)
  users, counts, parts, seen = [], [], [], {}
  oov = mismatch = 0
  for path in files:
    obj = _read_json(path)
    declared = obj.get("num_samples")
    for j, user in enumerate(obj["users"]):
      if not isinstance(user, str):
        raise FormatError(f"{path}: user ids must be strings, got {user!r}")
      if user in seen:
        raise FormatError(f"{path}: user {user!r} is also in {seen[user]}")
      seen[user] = path
      entry = obj["user_data"].get(user)
      if not isinstance(entry, dict) or not {"x", "y"} <= set(entry):
        raise FormatError(f"{path}: user {user!r} has no 'x' and 'y' in "
                          "'user_data'")
      ux, uy = entry["x"], entry["y"]
      if not isinstance(ux, list) or not isinstance(uy, list) or len(
          ux) != len(uy):
        raise FormatError(f"{path}: user {user!r}: 'x' and 'y' must be lists "
                          "of the same length")
      # LEAF's own Shakespeare test files declare more samples than they
      # hold (split_data.py skips 79 windows), so len(y) is what counts.
      if isinstance(declared, list) and (j >= len(declared) or
                                         declared[j] != len(uy)):
        mismatch += 1
      if name == "femnist":
        arrays = _femnist_user(path, user, ux, uy, cap)
      else:
        arrays, bad = _shakespeare_user(path, user, ux, uy, cap)
        oov += bad
      users.append(user)
      counts.append(len(arrays["y"]))
      parts.append(arrays)
  return _assemble(name, users, counts, parts, files, oov, mismatch)


def _empty(name: str) -> dict:
  if name == "femnist":
    return {"x": np.zeros((0, IMAGE_SIZE, IMAGE_SIZE, 1), np.float32),
            "y": np.zeros((0,), np.int32)}
  return {"x": np.zeros((0, SEQ_LEN), np.int32),
          "y": np.zeros((0, SEQ_LEN), np.int32),
          "mask": np.zeros((0, SEQ_LEN), np.float32)}


def _assemble(name, users, counts, parts, files, oov, mismatch) -> Split:
  base = _empty(name)
  arrays = {k: np.concatenate([v] + [p[k] for p in parts]) for k, v in
            base.items()}
  return Split(tuple(users), arrays, np.asarray(counts, np.int64),
               tuple(str(f) for f in files), oov, mismatch)


def require_h5py():
  try:
    import h5py  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ImportError("TFF's HDF5 files need h5py, an optional dependency: "
                      "pip install h5py (or ftte_jax[tff])") from e
  return h5py


def snippets_to_sequences(snippets, seq_len: int = SEQ_LEN) -> dict:
  """One client's snippets as next-character sequences (FedJAX's scheme).

  The snippets are joined, each between BOS and EOS, and cut into inputs
  ``joined[:-1]`` and targets ``joined[1:]`` of ``seq_len``, the last
  chunk padded with PAD (mask 0).

  Returns:
    ``{"x", "y": [m, seq_len] int32, "mask": [m, seq_len] float32}``.
  """
  pieces = []
  for s in snippets:
    text = s.decode("utf-8", errors="replace") if isinstance(
        s, bytes) else str(s)
    pieces += [np.asarray([BOS], np.int32), encode(text),
               np.asarray([EOS], np.int32)]
  joined = np.concatenate(pieces) if pieces else np.zeros(0, np.int32)
  n = max(len(joined) - 1, 0)
  m = -(-n // seq_len)
  x = np.full(m * seq_len, PAD, np.int32)
  y = np.full(m * seq_len, PAD, np.int32)
  mask = np.zeros(m * seq_len, np.float32)
  x[:n], y[:n], mask[:n] = joined[:-1], joined[1:], 1
  shape = (m, seq_len)
  return {"x": x.reshape(shape), "y": y.reshape(shape),
          "mask": mask.reshape(shape)}


def read_tff(root: Path, name: str, split: str,
             cap: int | None = None) -> Split:
  """Reads TFF's HDF5 file of one split (clients sorted by id, as TFF's
  ``HDF5ClientData`` lists them), capping each client at ``cap`` examples.

  Raises:
    FormatError: naming the file, when it is not HDF5 or not TFF's layout.
  """
  h5py = require_h5py()
  path = tff_path(root, name, split)
  users, counts, parts, oov = [], [], [], 0
  try:
    with h5py.File(path, "r") as f:
      if "examples" not in f:
        raise FormatError(f"{path}: no 'examples' group; TFF's files hold "
                          "examples/<client id>/<feature>")
      group = f["examples"]
      for user in sorted(group.keys()):
        g = group[user]
        if name == "femnist":
          arrays = _tff_femnist(path, user, g, cap)
        else:
          if "snippets" not in g:
            raise FormatError(f"{path}: client {user!r} has no 'snippets'")
          arrays = snippets_to_sequences(list(g["snippets"][()]))
          if cap is not None:
            arrays = {k: v[:cap] for k, v in arrays.items()}
          oov += int((arrays["x"] == OOV).sum())
        users.append(user)
        counts.append(len(arrays["y"]))
        parts.append(arrays)
  except OSError as e:  # h5py's error for a file that is not HDF5.
    raise FormatError(f"{path}: not a readable HDF5 file ({e})") from e
  return _assemble(name, users, counts, parts, (path,), oov, 0)


def _tff_femnist(path, user, g, cap) -> dict:
  if "pixels" not in g or "label" not in g:
    raise FormatError(f"{path}: client {user!r} needs 'pixels' and 'label'")
  x = np.asarray(g["pixels"][()], np.float32)
  y = np.asarray(g["label"][()]).reshape(-1)
  if x.ndim != 3 or x.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE) or len(x) != len(
      y):
    raise FormatError(f"{path}: client {user!r}: pixels must be [n, 28, 28] "
                      f"with n labels, got {x.shape} and {y.shape}")
  if y.size and (y.dtype.kind not in "iu" or y.min() < 0 or
                 y.max() >= FEMNIST_CLASSES):
    raise FormatError(f"{path}: client {user!r}: labels must be integers in "
                      f"[0, {FEMNIST_CLASSES})")
  take = len(y) if cap is None else min(len(y), cap)
  return {"x": x[:take, ..., None], "y": y[:take].astype(np.int32)}


def source_of(root: Path, name: str, source: str = "auto") -> str:
  """'leaf' or 'tff': ``source`` resolved by which files are present
  (auto: LEAF's where its train folder holds JSON files, else TFF's)."""
  if source != "auto":
    return source
  return "leaf" if leaf_files(root, name, "train") else "tff"


def missing(root: Path, name: str, source: str = "auto") -> list[Path]:
  """The files (or LEAF folders) of ``name`` absent from ``root``."""
  source = source_of(root, name, source)
  if source == "leaf":
    return [leaf_dir(root, name, s) for s in ("train", "test")
            if not leaf_files(root, name, s)]
  return [p for p in (tff_path(root, name, s) for s in ("train", "test"))
          if not p.exists()]


def how_to_get(root: Path, name: str) -> str:
  """Where a natural dataset's files go and how to produce them (LEAF)."""
  leaf = {"femnist": "./preprocess.sh -s niid --sf 1.0 -k 0 -t sample",
          "shakespeare": "./preprocess.sh -s niid --sf 1.0 -k 0 -t sample "
                         "-tf 0.8"}[name]
  return (f"LEAF's JSON goes in {leaf_dir(root, name, 'train')}"
          f"{os.sep} and {leaf_dir(root, name, 'test')}{os.sep}: git clone "
          f"https://github.com/TalwalkarLab/leaf && cd leaf/data/{name} && "
          f"{leaf} (add --sf 0.05 for a small subset), then copy its "
          f"data/train and data/test there")


def read(root: Path, name: str, split: str, source: str,
         cap: int | None) -> Split:
  """One split of ``name`` from its ``source`` ('leaf' or 'tff')."""
  if source == "leaf":
    return read_leaf(root, name, split, cap)
  return read_tff(root, name, split, cap)


def select(split: Split, num_clients: int, seed: int,
           name: str) -> np.ndarray:
  """Indices (file order) of the users that become clients.

  Users with no training example are skipped. All of them when
  ``num_clients`` is their number, else a seeded uniform sample.

  Raises:
    ValueError: naming num_clients, when the files hold fewer users.
  """
  available = np.flatnonzero(split.counts > 0)
  if num_clients > available.size:
    empty = split.counts.size - available.size
    raise ValueError(
        f"num_clients: {name} has {available.size} "
        f"{'writers' if name == 'femnist' else 'roles'} with training "
        f"examples in {len(split.files)} file(s)"
        f"{f' ({empty} empty, skipped)' if empty else ''}; use "
        f"--num_clients <= {available.size}")
  if num_clients == available.size:
    return available
  rng = np.random.default_rng(seed)
  return np.sort(rng.choice(available, num_clients, replace=False))
