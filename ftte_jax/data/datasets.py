"""Dataset loaders that verify what they read, and ``load_federated``.

Formats: MNIST / Fashion-MNIST (IDX, gzip), CIFAR-10 python batches (through a
restricted unpickler), ``.npz`` with ``x_train, y_train, x_test, y_test``,
FedProx's Synthetic(alpha, beta), scikit-learn's digits (optional) and a tiny
generated set for smoke tests. Images come back NHWC float32 in [0, 1], labels
int32.

Data directory: an explicit ``data_dir`` argument, else the ``FTTE_DATA_DIR``
environment variable, else the user cache directory ``$XDG_CACHE_HOME/ftte_jax``
(``~/.cache/ftte_jax``), where ``download`` puts verified files. Files are read
in place; nothing is copied into the repository.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import os
import pickle
import shutil
import struct as _struct
import sys
import tarfile
import tempfile
import urllib.request
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from ftte_jax.data import client_data as client_data_lib
from ftte_jax.data import config as data_config
from ftte_jax.data import natural
from ftte_jax.data import partition as partition_lib
from ftte_jax.data.config import DataConfig

DATASETS = data_config.DATASETS


class DatasetFormatError(ValueError):
  """A dataset file exists but its contents are not what the format requires."""


class DatasetNotFoundError(ValueError):
  """A dataset file is missing; the message says what to fetch and where.

  ``short`` says it in one line, for a launcher's error output; the message
  itself may span lines (every URL, size and checksum).
  """

  def __init__(self, message: str, short: str | None = None):
    super().__init__(message)
    self.short = short or " ".join(message.split())


# ----------------------------------------------------------------------------
# Locations and downloads.


def default_data_dir(data_dir: str | os.PathLike | None = None) -> Path:
  """Resolves the data directory: argument, $FTTE_DATA_DIR, then the cache.

  Args:
    data_dir: explicit directory, or None.

  Returns:
    The directory (not checked for existence).
  """
  if data_dir is not None:
    return Path(data_dir)
  env = os.environ.get("FTTE_DATA_DIR")
  if env:
    return Path(env)
  cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(
      os.path.expanduser("~"), ".cache")
  return Path(cache) / "ftte_jax"


# name -> list of (relative path in data_dir, url, size in bytes, sha256).
# Checksums as published by the maintainers and used by TFDS / Keras.
_MNIST_URL = "https://storage.googleapis.com/cvdf-datasets/mnist/"
_FASHION_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
_TFF_URL = "https://storage.googleapis.com/tff-datasets-public/"
REMOTE_FILES: dict[str, list[tuple[str, str, int | None, str]]] = {
    "mnist": [
        ("mnist/train-images-idx3-ubyte.gz", _MNIST_URL +
         "train-images-idx3-ubyte.gz", 9912422,
         "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609"),
        ("mnist/train-labels-idx1-ubyte.gz", _MNIST_URL +
         "train-labels-idx1-ubyte.gz", 28881,
         "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c"),
        ("mnist/t10k-images-idx3-ubyte.gz", _MNIST_URL +
         "t10k-images-idx3-ubyte.gz", 1648877,
         "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6"),
        ("mnist/t10k-labels-idx1-ubyte.gz", _MNIST_URL +
         "t10k-labels-idx1-ubyte.gz", 4542,
         "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6"),
    ],
    "fashion_mnist": [
        ("fashion_mnist/train-images-idx3-ubyte.gz", _FASHION_URL +
         "train-images-idx3-ubyte.gz", 26421880,
         "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84"),
        ("fashion_mnist/train-labels-idx1-ubyte.gz", _FASHION_URL +
         "train-labels-idx1-ubyte.gz", 29515,
         "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845"),
        ("fashion_mnist/t10k-images-idx3-ubyte.gz", _FASHION_URL +
         "t10k-images-idx3-ubyte.gz", 4422102,
         "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073"),
        ("fashion_mnist/t10k-labels-idx1-ubyte.gz", _FASHION_URL +
         "t10k-labels-idx1-ubyte.gz", 5148,
         "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5"),
    ],
    "cifar10": [
        ("cifar-10-python.tar.gz",
         "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz", 170498071,
         "6d958be074577803d12ecdefd02955f39262c83c16fe9348329d7fe0b5c001ce"),
    ],
    # TFF's HDF5 archives, with the SHA-256 TFF's loaders checked them
    # against (tensorflow_federated/python/simulation/datasets/emnist.py at
    # 2c3c896c, shakespeare.py at 0106781f); sizes are not published.
    "femnist": [
        ("femnist/fed_emnist.tar.bz2", _TFF_URL + "fed_emnist.tar.bz2", None,
         "fe1ed5a502cea3a952eb105920bff8cffb32836b5173cb18a57a32c3606f3ea0"),
    ],
    "shakespeare": [
        ("shakespeare/shakespeare.tar.bz2", _TFF_URL + "shakespeare.tar.bz2",
         None,
         "0285be9906cb5f268092eee4edeeacfc2af4574f2941f7cc2f08a321d7f5c707"),
    ],
}
# Archives extracted after download: name -> folder under the data dir.
_ARCHIVES = {"cifar10": "", "femnist": "femnist",
             "shakespeare": "shakespeare"}
# Datasets whose files are LEAF's JSON or TFF's HDF5 (``natural``).
NATURAL_FILES = natural.NAMES


def sha256_file(path: str | os.PathLike) -> str:
  """Returns the hex SHA-256 of a file, read in 1 MiB chunks."""
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      h.update(chunk)
  return h.hexdigest()


def verify_sha256(path: str | os.PathLike, expected: str) -> None:
  """Raises DatasetFormatError naming the file if its SHA-256 differs."""
  got = sha256_file(path)
  if got != expected.lower():
    raise DatasetFormatError(f"{path}: SHA-256 is {got}, expected {expected}; "
                             "the file is corrupt or not the published one")


def _missing(name: str, path: Path, root: Path) -> DatasetNotFoundError:
  lines = [f"dataset {name!r}: {path} not found."]
  if name in REMOTE_FILES:
    lines.append(f"Fetch with ftte_jax.datasets.download({name!r}, "
                 f"data_dir={str(root)!r}), or by hand:")
    for rel, url, size, digest in REMOTE_FILES[name]:
      lines.append(f"  {url} -> {root / rel} ({_size(size)}sha256 "
                   f"{digest})")
    if name == "cifar10":
      lines.append(f"  then extract it so that {root / 'cifar-10-batches-py'} "
                   "exists.")
  lines.append("Set the directory with data_dir=... or $FTTE_DATA_DIR.")
  return DatasetNotFoundError("\n".join(lines))


def _size(size: int | None) -> str:
  return "" if size is None else f"{size} bytes, "


def fetch_hint(name: str, data_dir: str | os.PathLike | None = None) -> str:
  """One line: which files of ``name`` to fetch, from where, into where."""
  root = default_data_dir(data_dir)
  files = REMOTE_FILES[name]
  base = os.path.commonprefix([url for _, url, _, _ in files])
  base = base[:base.rfind("/") + 1]
  dest = os.path.commonpath([str(root / rel) for rel, *_ in files])
  dest = dest if len(files) > 1 else str(Path(dest).parent)
  hint = (f"fetch {', '.join(url[len(base):] for _, url, _, _ in files)} "
          f"from {base} into {dest} (SHA-256 in ftte_jax.data.datasets."
          f"REMOTE_FILES)")
  if name in _ARCHIVES:
    hint += " and extract it there"
  if name in NATURAL_FILES:
    hint += " (TFF's HDF5 files; reading them needs h5py)"
  return hint


def missing_files(name: str, data_dir: str | os.PathLike | None = None,
                  source: str = "auto") -> list[Path]:
  """The files ``load_federated``'s default split of ``name`` reads that are
  absent ([] for datasets that are generated or not downloadable).

  MNIST's default 'pool' split reads only the t10k files; Fashion-MNIST and
  CIFAR-10 default to 'standard', which reads train and test. femnist and
  shakespeare read LEAF's folders or TFF's files (``source``; auto: LEAF's
  where present, else TFF's).
  """
  root = default_data_dir(data_dir)
  if name in NATURAL_FILES:
    return natural.missing(root, name, source)
  if name == "cifar10":
    folder = root / "cifar-10-batches-py"
    need = [folder / f"data_batch_{i}" for i in range(1, 6)]
    need.append(folder / "test_batch")
  elif name in REMOTE_FILES:
    need = [root / rel for rel, *_ in REMOTE_FILES[name]
            if name != "mnist" or "/t10k-" in rel]
  else:
    return []
  return [p for p in need if not p.exists()]


def natural_problem(name: str, root: Path, source: str,
                    mode: str) -> str | None:
  """Why femnist/shakespeare's missing files cannot be downloaded now, in
  one line naming the files and how to produce them; None when TFF's
  files can be fetched (``mode`` 'auto', h5py installed)."""
  leaf = natural.how_to_get(root, name)
  tff = fetch_hint(name, root)
  if natural.source_of(root, name, source) == "leaf":
    absent = natural.missing(root, name, "leaf")
    return f"no LEAF JSON files in {absent[0]}; {leaf}"
  try:
    natural.require_h5py()
  except ImportError:
    return (f"no LEAF JSON files in {natural.leaf_dir(root, name, 'train')} "
            f"and no TFF file {natural.tff_path(root, name, 'train')}; "
            f"{leaf}; or pip install h5py to read TFF's ({tff})")
  if mode == "never":
    return (f"{natural.tff_path(root, name, 'train')} not found and "
            f"--download=never; {leaf}; or {tff}")
  return None


def _mb(n: int) -> str:
  return f"{n / 1e6:.1f}"


def _copy_with_progress(src, dst, label: str, total: int, stream) -> None:
  """Copies ``src`` to ``dst``, reporting progress on ``stream`` (or not).

  On a terminal one line is redrawn in place (\\r); in a log, where
  redrawing would leave hundreds of lines, a line at 0, 25, 50, 75 and 100%.
  """
  tty = stream is not None and getattr(stream, "isatty", lambda: False)()
  done, shown = 0, None

  def show(final=False):
    nonlocal shown
    if not total:  # no length known: megabytes so far, at the end.
      if stream is not None and final:
        stream.write(f"{label} {_mb(done)} MB\n")
        stream.flush()
      return
    pct = min(100, 100 * done // total)
    mark = pct if tty else pct // 25 * 25
    if stream is None or (mark == shown and not (final and tty)):
      return
    shown = mark
    text = f"{label} {_mb(done)}/{_mb(total)} MB {pct}%"
    if tty:
      stream.write("\r" + text + ("\n" if final else ""))
    else:
      stream.write(text + "\n")
    stream.flush()

  show()
  for chunk in iter(lambda: src.read(1 << 16), b""):
    dst.write(chunk)
    done += len(chunk)
    show()
  show(final=True)


def _fetch(name: str, root: Path, rel: str, url: str, size: int, digest: str,
           timeout_s: float, stream) -> None:
  """Fetches one file to ``root / rel`` through a temporary file, verified
  before it takes the file's name."""
  dest = root / rel
  created = not dest.parent.exists()
  dest.parent.mkdir(parents=True, exist_ok=True)
  with tempfile.NamedTemporaryFile(dir=dest.parent, delete=False) as tmp:
    try:
      with urllib.request.urlopen(url, timeout=timeout_s) as resp:
        length = getattr(resp, "headers", {}).get("Content-Length")
        _copy_with_progress(resp, tmp, f"{name}: {dest.name}",
                            int(length) if length else (size or 0), stream)
    except OSError as e:
      os.unlink(tmp.name)
      if created and not any(dest.parent.iterdir()):
        dest.parent.rmdir()  # An offline first use leaves no empty folder.
      raise DatasetNotFoundError(
          f"download {name!r}: could not fetch {url} ({e}). Offline, fetch "
          f"it elsewhere and place it at {dest} (sha256 {digest}).",
          short=f"{name}: could not be downloaded ({e}); "
          f"{fetch_hint(name, root)}") from e
  try:
    verify_sha256(tmp.name, digest)
  except DatasetFormatError:
    os.unlink(tmp.name)  # Never left where a loader would read it.
    raise
  os.replace(tmp.name, dest)


def download(name: str, data_dir: str | os.PathLike | None = None,
             timeout_s: float = 60.0, progress: bool = True,
             split: str | None = None) -> Path:
  """Fetches a dataset into ``data_dir`` and verifies SHA-256 before use.

  Files already present with the right checksum are not fetched again. A file
  that fails verification is deleted, never used. CIFAR-10 is extracted with
  tarfile's 'data' filter (no absolute paths, links or devices).

  Args:
    name: one of the keys of REMOTE_FILES ('mnist', 'fashion_mnist',
      'cifar10', and TFF's 'femnist' and 'shakespeare' archives).
    data_dir: target directory (see default_data_dir).
    timeout_s: socket timeout per request.
    progress: report each file's progress on stderr.
    split: 'train' or 'test' fetches only that split's files of MNIST or
      Fashion-MNIST (MNIST's default 'pool' split reads only 'test'); None
      fetches everything (an archive is one file either way).

  Returns:
    The data directory.
  """
  if name not in REMOTE_FILES:
    raise ValueError(f"download: unknown dataset {name!r}; downloadable: "
                     f"{sorted(REMOTE_FILES)}")
  if split not in (None, "train", "test"):
    raise ValueError(f"split must be 'train', 'test' or None, got {split!r}")
  root = default_data_dir(data_dir)
  stem = {"train": "/train-", "test": "/t10k-"}.get(split, "")
  for rel, url, size, digest in REMOTE_FILES[name]:
    if stem not in rel and name not in _ARCHIVES:
      continue
    if (root / rel).exists() and sha256_file(root / rel) == digest:
      continue
    _fetch(name, root, rel, url, size, digest, timeout_s,
           sys.stderr if progress else None)
  if name in _ARCHIVES:
    _extract(name, root)
  return root


def _extract(name: str, root: Path) -> None:
  """Extracts ``name``'s verified archive into its folder (tarfile's 'data'
  filter: no absolute paths, links or devices) and checks that the files
  the loader reads are there."""
  archive = root / REMOTE_FILES[name][0][0]
  where = root / _ARCHIVES[name]
  try:
    with tarfile.open(archive, "r:*") as tar:
      tar.extractall(where, filter="data")
  except (tarfile.TarError, EOFError, OSError) as e:
    raise DatasetFormatError(f"{archive}: cannot extract ({e})") from e
  if name in NATURAL_FILES:
    want = [natural.tff_path(root, name, s) for s in ("train", "test")]
    absent = [p for p in want if not p.exists()]
    if absent:
      raise DatasetFormatError(f"{archive}: extracted, but {absent[0]} is not "
                               "in it")


# ----------------------------------------------------------------------------
# IDX (MNIST, Fashion-MNIST).

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"),
               0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4"),
               0x0E: np.dtype(">f8")}


def _read_bytes(path: Path) -> bytes:
  """Reads a file, gunzipping ``.gz``; corrupt gzip raises naming the file."""
  try:
    if path.suffix == ".gz":
      with gzip.open(path, "rb") as f:
        return f.read()
    return path.read_bytes()
  except (EOFError, gzip.BadGzipFile, zlib.error) as e:
    raise DatasetFormatError(f"{path}: corrupt or truncated gzip ({e})") from e


def read_idx(path: str | os.PathLike, expected_magic: int | None = None
             ) -> np.ndarray:
  """Reads an IDX file (optionally gzip) and checks header against payload.

  Args:
    path: file path; ``.gz`` files are decompressed.
    expected_magic: the 4-byte big-endian magic (2051 for images, 2049 for
      labels), or None to accept any valid IDX type.

  Returns:
    The array with the shape the header declares.
  """
  path = Path(path)
  if not path.exists():
    raise DatasetNotFoundError(f"{path}: file not found")
  raw = _read_bytes(path)
  if len(raw) < 4:
    raise DatasetFormatError(f"{path}: {len(raw)} bytes, too short for an IDX "
                             "header")
  magic = _struct.unpack(">I", raw[:4])[0]
  if expected_magic is not None and magic != expected_magic:
    raise DatasetFormatError(f"{path}: wrong magic number {magic}, expected "
                             f"{expected_magic}")
  zero, code, ndim = raw[0:2], raw[2], raw[3]
  if zero != b"\0\0" or code not in _IDX_DTYPES or ndim == 0:
    raise DatasetFormatError(f"{path}: magic {magic:#010x} is not an IDX header")
  hdr = 4 + 4 * ndim
  if len(raw) < hdr:
    raise DatasetFormatError(f"{path}: header declares {ndim} dims but the "
                             f"file has only {len(raw)} bytes")
  shape = _struct.unpack(f">{ndim}I", raw[4:hdr])
  dtype = np.dtype(_IDX_DTYPES[code])
  want = int(np.prod(shape)) * dtype.itemsize
  if len(raw) - hdr != want:
    raise DatasetFormatError(f"{path}: header shape {shape} needs {want} data "
                             f"bytes, file has {len(raw) - hdr}")
  return np.frombuffer(raw, dtype=dtype, offset=hdr).reshape(shape)


def load_idx_pair(images_path: str | os.PathLike,
                  labels_path: str | os.PathLike,
                  num_classes: int = 10) -> tuple[np.ndarray, np.ndarray]:
  """Loads an MNIST-format image/label pair and cross-checks them.

  Args:
    images_path: IDX file of [N, H, W] uint8 images (magic 2051).
    labels_path: IDX file of [N] uint8 labels (magic 2049).
    num_classes: labels must lie in [0, num_classes).

  Returns:
    (x [N, H, W, 1] float32 in [0, 1], y [N] int32).
  """
  x = read_idx(images_path, 2051)
  y = read_idx(labels_path, 2049)
  if x.ndim != 3 or x.dtype != np.uint8:
    raise DatasetFormatError(f"{images_path}: expected [N, H, W] uint8 images, "
                             f"got shape {x.shape} dtype {x.dtype}")
  if y.ndim != 1 or y.dtype != np.uint8:
    raise DatasetFormatError(f"{labels_path}: expected [N] uint8 labels, got "
                             f"shape {y.shape} dtype {y.dtype}")
  if len(x) != len(y):
    raise DatasetFormatError(f"{images_path} has {len(x)} images but "
                             f"{labels_path} has {len(y)} labels")
  _check_labels(y, num_classes, labels_path)
  return (x[..., None].astype(np.float32) / 255.0, y.astype(np.int32))


def _check_labels(y: np.ndarray, num_classes: int, where: Any) -> None:
  if y.size and (y.min() < 0 or y.max() >= num_classes):
    i = int(np.argmax((y < 0) | (y >= num_classes)))
    raise DatasetFormatError(f"{where}: label {int(y[i])} out of range [0, "
                             f"{num_classes}) at index {i}")


# float32's largest finite value: features beyond it would become inf.
_FLOAT32_MAX = float(np.finfo(np.float32).max)


def _check_features(x: np.ndarray, where: str) -> None:
  """Features must be finite and within float32's range, where they are
  stored: a float64 1e300 would become inf, and a client holding it would
  send non-finite updates (weight 0) every step.

  Raises:
    DatasetFormatError: naming ``where``, the first bad index and value.
  """
  if np.issubdtype(x.dtype, np.complexfloating):
    raise DatasetFormatError(f"{where}: complex features ({x.dtype}); "
                             "features must be real numbers")
  if not np.issubdtype(x.dtype, np.floating):
    return  # integers fit float32's range.
  bad = ~np.isfinite(x)
  if x.dtype.itemsize > 4:
    bad |= np.abs(x) > _FLOAT32_MAX
  if bad.any():
    idx = np.unravel_index(int(np.argmax(bad)), x.shape)
    at = ", ".join(str(int(i)) for i in idx)
    raise DatasetFormatError(
        f"{where}[{at}] = {float(x[idx])!r}: "
        f"features must be finite and within float32's range "
        f"(|x| <= {_FLOAT32_MAX:.4g}); {int(bad.sum())} value(s) are not")


def load_mnist(data_dir: str | os.PathLike | None = None, split: str = "test",
               name: str = "mnist") -> tuple[np.ndarray, np.ndarray]:
  """Loads one split of MNIST or Fashion-MNIST from ``<data_dir>/<name>/``.

  The shipped t10k files of MNIST are also checked against their SHA-256.

  Args:
    data_dir: see default_data_dir.
    split: 'train' or 'test' ('t10k' files).
    name: 'mnist' or 'fashion_mnist'.

  Returns:
    (x [N, 28, 28, 1] float32, y [N] int32).
  """
  if split not in ("train", "test"):
    raise ValueError(f"split must be 'train' or 'test', got {split!r}")
  if name not in ("mnist", "fashion_mnist"):
    raise ValueError(f"name must be 'mnist' or 'fashion_mnist', got {name!r}")
  root = default_data_dir(data_dir)
  stem = "train" if split == "train" else "t10k"
  paths = [root / name / f"{stem}-{k}" for k in
           ("images-idx3-ubyte.gz", "labels-idx1-ubyte.gz")]
  digests = {rel: d for rel, _, _, d in REMOTE_FILES[name]}
  for p in paths:
    if not p.exists():
      raise _missing(name, p, root)
    digest = digests.get(f"{name}/{p.name}")
    if digest is not None and name == "mnist" and split == "test":
      verify_sha256(p, digest)
  return load_idx_pair(*paths)


# ----------------------------------------------------------------------------
# CIFAR-10 python batches.

# The only globals CIFAR-10 batches need: numpy's array reconstruction.
_PICKLE_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
}


class _RestrictedUnpickler(pickle.Unpickler):
  """Admits only numpy array reconstruction; anything else raises."""

  def __init__(self, file, path):
    super().__init__(file, encoding="bytes")
    self._path = path

  def find_class(self, module, name):
    if (module, name) in _PICKLE_ALLOWED:
      return super().find_class(module, name)
    raise DatasetFormatError(
        f"{self._path}: pickle references {module}.{name}, which a CIFAR-10 "
        "batch never contains; refusing to load it (it could run code)")


def restricted_unpickle(path: str | os.PathLike) -> Any:
  """Unpickles a file admitting only plain containers and numpy arrays.

  Args:
    path: pickle file.

  Returns:
    The unpickled object (bytes keys, as CIFAR-10 batches were written by
    Python 2).
  """
  path = Path(path)
  if not path.exists():
    raise DatasetNotFoundError(f"{path}: file not found")
  try:
    with open(path, "rb") as f:
      return _RestrictedUnpickler(f, path).load()
  except DatasetFormatError:
    raise
  except Exception as e:  # Truncated or garbled pickles raise many types.
    raise DatasetFormatError(f"{path}: not a readable pickle ({type(e).__name__}"
                             f": {e})") from e


def load_cifar_batch(path: str | os.PathLike, num_classes: int = 10
                     ) -> tuple[np.ndarray, np.ndarray]:
  """Loads one CIFAR-10 python batch (dict with b'data' and b'labels').

  Args:
    path: batch file, e.g. ``data_batch_1`` or ``test_batch``.
    num_classes: labels must lie in [0, num_classes).

  Returns:
    (x [N, 32, 32, 3] float32 in [0, 1], y [N] int32).
  """
  obj = restricted_unpickle(path)
  if not isinstance(obj, dict):
    raise DatasetFormatError(f"{path}: expected a dict, got {type(obj).__name__}")
  key = lambda k: obj.get(k.encode(), obj.get(k))  # Py2 bytes or Py3 str keys.
  data, labels = key("data"), key("labels")
  if data is None or labels is None:
    raise DatasetFormatError(f"{path}: missing 'data' or 'labels' key; keys: "
                             f"{sorted(map(str, obj))}")
  data = np.asarray(data)
  if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
    raise DatasetFormatError(f"{path}: 'data' must be [N, 3072] uint8, got "
                             f"shape {data.shape} dtype {data.dtype}")
  try:
    y = np.asarray(labels, dtype=np.int64)
  except (TypeError, ValueError) as e:
    raise DatasetFormatError(f"{path}: 'labels' are not integers") from e
  if y.shape != (data.shape[0],):
    raise DatasetFormatError(f"{path}: {data.shape[0]} images but labels have "
                             f"shape {y.shape}")
  _check_labels(y, num_classes, path)
  x = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
  return x.astype(np.float32) / 255.0, y.astype(np.int32)


def load_cifar10(data_dir: str | os.PathLike | None = None, split: str = "train"
                 ) -> tuple[np.ndarray, np.ndarray]:
  """Loads CIFAR-10 from ``<data_dir>/cifar-10-batches-py``.

  Args:
    data_dir: see default_data_dir.
    split: 'train' (data_batch_1..5) or 'test' (test_batch).

  Returns:
    (x [N, 32, 32, 3] float32, y [N] int32).
  """
  if split not in ("train", "test"):
    raise ValueError(f"split must be 'train' or 'test', got {split!r}")
  root = default_data_dir(data_dir)
  folder = root / "cifar-10-batches-py"
  names = ([f"data_batch_{i}" for i in range(1, 6)] if split == "train"
           else ["test_batch"])
  for n in names:
    if not (folder / n).exists():
      raise _missing("cifar10", folder / n, root)
  xs, ys = zip(*(load_cifar_batch(folder / n) for n in names))
  return np.concatenate(xs), np.concatenate(ys)


# ----------------------------------------------------------------------------
# npz.


def load_npz(path: str | os.PathLike, num_classes: int | None = None
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """Loads ``x_train, y_train, x_test, y_test`` from an ``.npz`` (no pickles).

  Images of shape [N, H, W] get a channel axis; integer images are scaled by
  1/255 when their range fits uint8. Both sets must be non-empty, features
  finite and within float32's range, labels in ``[0, num_classes)``; an
  error names the file, the array and the first offending index.

  Args:
    path: the .npz file.
    num_classes: labels must lie in [0, num_classes); None infers max + 1.

  Returns:
    (x_train, y_train, x_test, y_test); x float32, y int32.
  """
  path = Path(path)
  if not path.exists():
    raise DatasetNotFoundError(f"{path}: file not found")
  try:
    with np.load(path, allow_pickle=False) as z:
      arrays = {k: z[k] for k in z.files}
  except ValueError as e:
    raise DatasetFormatError(f"{path}: unreadable npz or it holds object "
                             f"arrays, which are refused ({e})") from e
  except Exception as e:  # BadZipFile, OSError, EOFError, zlib.error, ...
    raise DatasetFormatError(f"{path}: not a readable npz ({e})") from e
  need = ("x_train", "y_train", "x_test", "y_test")
  missing = [k for k in need if k not in arrays]
  if missing:
    raise DatasetFormatError(f"{path}: missing arrays {missing}; an npz dataset "
                             f"needs {list(need)}, found {sorted(arrays)}")
  out = []
  for split in ("train", "test"):
    x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
    if not np.issubdtype(x.dtype, np.number) or x.ndim < 2:
      raise DatasetFormatError(f"{path}: x_{split} must be a numeric [N, ...] "
                               f"array, got shape {x.shape} dtype {x.dtype}")
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
      raise DatasetFormatError(f"{path}: y_{split} must be a 1-D integer array,"
                               f" got shape {y.shape} dtype {y.dtype}")
    if len(x) != len(y):
      raise DatasetFormatError(f"{path}: x_{split} has {len(x)} examples but "
                               f"y_{split} has {len(y)}")
    if not len(x):
      raise DatasetFormatError(f"{path}: x_{split} has no examples; an npz "
                               "dataset needs non-empty train and test sets")
    _check_features(x, f"{path}: x_{split}")
    out.append((x, y))
  (xtr, ytr), (xte, yte) = out
  if xtr.shape[1:] != xte.shape[1:]:
    raise DatasetFormatError(f"{path}: x_train examples have shape "
                             f"{xtr.shape[1:]} but x_test {xte.shape[1:]}")
  k = num_classes if num_classes is not None else int(
      max(ytr.max(initial=0), yte.max(initial=0))) + 1
  _check_labels(ytr, k, f"{path}: y_train")
  _check_labels(yte, k, f"{path}: y_test")

  def prep(x):
    if x.ndim == 3:
      x = x[..., None]
    if np.issubdtype(x.dtype, np.integer) and x.min(initial=0) >= 0 and x.max(
        initial=0) <= 255:
      return x.astype(np.float32) / 255.0
    return x.astype(np.float32)
  return prep(xtr), ytr.astype(np.int32), prep(xte), yte.astype(np.int32)


# ----------------------------------------------------------------------------
# Generated and optional datasets.


def synthetic_fedprox(alpha: float, beta: float, num_clients: int = 30,
                      seed: int = 0, dim: int = 60, num_classes: int = 10,
                      test_fraction: float = 0.1,
                      max_samples_per_client: int | None = None,
                      samples_per_client: int | None = None):
  """Synthetic(alpha, beta) of Li et al. (FedProx, 2020), natural partition.

  Follows the reference generator: client k has W_k ~ N(u_k, 1), b_k ~ N(u_k,
  1) with u_k ~ N(0, alpha); x ~ N(v_k, Sigma) with v_k ~ N(B_k, 1), B_k ~
  N(0, beta), Sigma = diag(j^-1.2); y = argmax(W_k x + b_k); the client has
  lognormal(4, 2) + 50 samples. Each client holds out ``test_fraction`` of its
  samples; the held-out parts form the global test set.

  Args:
    alpha: spread of client models (>= 0).
    beta: spread of client input means (>= 0).
    num_clients: number of clients.
    seed: RNG seed.
    dim: feature dimension (60 in the paper).
    num_classes: classes (10 in the paper).
    test_fraction: per-client held-out share, in [0, 1).
    max_samples_per_client: optional cap on the heavy-tailed sizes.
    samples_per_client: if set, every client gets exactly this many samples
      instead of lognormal sizes (scaling studies: a million clients of
      FedProx's default sizes would be 450M examples); the same model of
      client data, drawn vectorized, so the random stream differs from the
      default path's.

  Returns:
    (x_train [M, dim], y_train [M], parts (list of index arrays into x_train),
    x_test, y_test); float32 / int32.
  """
  if alpha < 0 or beta < 0:
    raise ValueError(f"synthetic: alpha and beta must be >= 0, got alpha="
                     f"{alpha}, beta={beta}")
  if num_clients < 1:
    raise ValueError(f"num_clients must be >= 1, got {num_clients}")
  if not 0 <= test_fraction < 1:
    raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction}")
  if samples_per_client is not None:
    if samples_per_client < 2:
      raise ValueError("synthetic: samples_per_client must be >= 2 (one "
                       f"trains, one may be held out), got {samples_per_client}")
    return _synthetic_equal(alpha, beta, num_clients, seed, dim, num_classes,
                            test_fraction, samples_per_client)
  return _synthetic_lognormal(alpha, beta, num_clients, seed, dim,
                              num_classes, test_fraction,
                              max_samples_per_client)


def _synthetic_lognormal(alpha, beta, num_clients, seed, dim, num_classes,
                         test_fraction, max_samples_per_client):
  """FedProx's generator, client by client (see ``synthetic_fedprox``)."""
  rng = np.random.default_rng(seed)
  sizes = rng.lognormal(4, 2, num_clients).astype(np.int64) + 50
  if max_samples_per_client is not None:
    sizes = np.minimum(sizes, max_samples_per_client)
  mean_w = rng.normal(0, alpha, num_clients)
  big_b = rng.normal(0, beta, num_clients)
  std_x = np.arange(1, dim + 1, dtype=np.float64) ** (-1.2 / 2)
  # Sizes are known up front, so every client is written straight into
  # preallocated float32 arrays (the same values as concatenating float64
  # pieces and casting; many small freed pieces would stay in the heap).
  n_test = (test_fraction * sizes).astype(np.int64)
  n_train = sizes - n_test
  tr_end, te_end = np.cumsum(n_train), np.cumsum(n_test)
  xtr = np.empty((int(tr_end[-1]), dim), np.float32)
  ytr = np.empty(int(tr_end[-1]), np.int32)
  xte = np.empty((int(te_end[-1]), dim), np.float32)
  yte = np.empty(int(te_end[-1]), np.int32)
  for k in range(num_clients):
    mean_x = rng.normal(big_b[k], 1, dim)
    w = rng.normal(mean_w[k], 1, (dim, num_classes))
    b = rng.normal(mean_w[k], 1, num_classes)
    x = mean_x + rng.standard_normal((sizes[k], dim)) * std_x
    y = np.argmax(x @ w + b, axis=1)
    tr = slice(tr_end[k] - n_train[k], tr_end[k])
    te = slice(te_end[k] - n_test[k], te_end[k])
    xtr[tr], ytr[tr] = x[:n_train[k]], y[:n_train[k]]
    xte[te], yte[te] = x[n_train[k]:], y[n_train[k]:]
  parts = [np.arange(e - n, e, dtype=np.int64) for e, n in zip(tr_end, n_train)]
  return xtr, ytr, parts, xte, yte


def _synthetic_equal(alpha, beta, num_clients, seed, dim, num_classes,
                     test_fraction, per_client, chunk=8192):
  """Synthetic(alpha, beta) with ``per_client`` samples on every client,
  drawn in vectorized chunks of clients (see ``synthetic_fedprox``). At least
  one sample per client is held out when ``test_fraction`` > 0."""
  rng = np.random.default_rng(seed)
  n_test = (max(1, int(test_fraction * per_client)) if test_fraction > 0
            else 0)
  n_train = per_client - n_test
  std_x = np.arange(1, dim + 1, dtype=np.float64) ** (-1.2 / 2)
  xtr = np.empty((num_clients * n_train, dim), np.float32)
  ytr = np.empty(num_clients * n_train, np.int32)
  xte = np.empty((num_clients * n_test, dim), np.float32)
  yte = np.empty(num_clients * n_test, np.int32)
  for lo in range(0, num_clients, chunk):
    c = min(chunk, num_clients - lo)
    mean_w = rng.normal(0, alpha, c)
    mean_x = rng.normal(rng.normal(0, beta, c)[:, None], 1, (c, dim))
    w = rng.normal(mean_w[:, None, None], 1, (c, dim, num_classes))
    b = rng.normal(mean_w[:, None], 1, (c, num_classes))
    x = mean_x[:, None] + rng.standard_normal((c, per_client, dim)) * std_x
    y = np.argmax(np.einsum("cnd,cdk->cnk", x, w) + b[:, None], axis=2)
    xtr[lo * n_train:(lo + c) * n_train] = x[:, :n_train].reshape(-1, dim)
    ytr[lo * n_train:(lo + c) * n_train] = y[:, :n_train].ravel()
    xte[lo * n_test:(lo + c) * n_test] = x[:, n_train:].reshape(-1, dim)
    yte[lo * n_test:(lo + c) * n_test] = y[:, n_train:].ravel()
  parts = np.arange(num_clients * n_train).reshape(num_clients, n_train)
  return xtr, ytr, list(parts), xte, yte


def load_digits() -> tuple[np.ndarray, np.ndarray]:
  """scikit-learn's bundled 8x8 handwritten digits (1,797 images, 10 classes).

  Returns:
    (x [1797, 8, 8, 1] float32 in [0, 1], y [1797] int32).
  """
  try:
    from sklearn import datasets as sk  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise DatasetNotFoundError(
        "dataset 'digits' needs scikit-learn, which is not a dependency of "
        "ftte_jax; install it with `pip install scikit-learn`") from e
  d = sk.load_digits()
  return (d.images[..., None].astype(np.float32) / 16.0,
          d.target.astype(np.int32))


def tiny(num_examples: int = 512, num_classes: int = 4,
         shape: tuple[int, ...] = (8, 8, 1), seed: int = 0,
         noise: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
  """A tiny, learnable generated image set for smoke tests.

  Each class has a random prototype image; examples are prototype + noise.

  Returns:
    (x [num_examples, *shape] float32, y [num_examples] int32).
  """
  rng = np.random.default_rng(seed)
  protos = rng.uniform(0, 1, (num_classes, *shape))
  y = rng.integers(0, num_classes, num_examples)
  x = protos[y] + noise * rng.standard_normal((num_examples, *shape))
  return x.astype(np.float32), y.astype(np.int32)


# ----------------------------------------------------------------------------
# Federated entry point.


def _holdout(x, y, num_test, seed):
  if not 0 < num_test < len(x):
    raise ValueError(f"num_test must be in [1, {len(x) - 1}] for {len(x)} "
                     f"examples, got {num_test}")
  perm = np.random.default_rng(seed).permutation(len(x))
  te, tr = np.sort(perm[:num_test]), np.sort(perm[num_test:])
  return x[tr], y[tr], x[te], y[te]


# Folded into the split seed so the proxy draw differs from the hold-out's.
_PROXY_SALT = 31337
# The generated 'tiny' set: examples and classes (not options: a smoke set).
TINY_EXAMPLES, TINY_CLASSES = 512, 4


def split_proxy(x, y, num_proxy: int, seed: int):
  """Splits ``num_proxy`` server-held examples off a training pool.

  Returns ``(x_rest, y_rest, x_proxy, y_proxy)``; both parts keep the pool's
  order. The proxy set is what the server holds (pretraining, proxy
  importance); the rest is partitioned across clients, so the two never
  share an example.
  """
  if not 0 <= num_proxy < len(x):
    raise ValueError(f"proxy_examples must be in [0, {len(x) - 1}] for a "
                     f"training pool of {len(x)} examples, got {num_proxy}")
  perm = np.random.default_rng(seed + _PROXY_SALT).permutation(len(x))
  px, rest = np.sort(perm[:num_proxy]), np.sort(perm[num_proxy:])
  return x[rest], y[rest], x[px], y[px]


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """Facts about a loaded dataset (JSON-safe: no arrays)."""

  name: str
  task: str  # 'classification' (y [M]) or 'sequence' (y [M, T], a mask).
  num_classes: int  # logits per example (per token for sequences).
  input_shape: tuple[int, ...]  # one example, no batch axis.
  input_dtype: str  # 'float32' (images, features) or 'int32' (tokens).
  partition: str  # how clients were formed ('natural': given by the data).
  num_train: int  # examples at clients (before any hold-out).
  num_test: int  # examples in the global test set.
  num_proxy: int  # examples the server holds.
  layout: dict  # client_data.layout_report of the training data.
  num_holdout: int = 0  # examples the clients hold out for themselves.
  source: str = ""  # where the examples came from (format and files).
  users_in_files: int = 0  # natural data: users in the training files.
  empty_users: int = 0  # natural data: users without a training example,
  #   skipped (never a client).
  oov_characters: int = 0  # shakespeare: characters mapped to OOV.
  num_samples_mismatch: int = 0  # LEAF: users whose num_samples != len(y).

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class FederatedData:
  """What ``load_federated`` returns: clients, test set, proxy, hold-out."""

  train: client_data_lib.ClientData  # the clients' examples (CSR).
  test: dict  # {"x", "y", **extras}: numpy arrays, the global test set.
  info: DatasetInfo
  proxy: dict | None = None  # {"x", "y"}: the server's set; None without.
  holdout: client_data_lib.ClientData | None = None  # the clients' own
  #   held-out slices (client i's rows as in ``train``); None without.


def _synthetic(cfg: DataConfig, seed: int):
  """Synthetic(alpha, beta) with its natural partition."""
  xtr, ytr, parts, xte, yte = synthetic_fedprox(
      cfg.synthetic_alpha, cfg.synthetic_beta, cfg.num_clients, seed,
      max_samples_per_client=cfg.max_examples_per_client,
      samples_per_client=cfg.synthetic_samples_per_client)
  return {"x": xtr, "y": ytr}, {"x": xte, "y": yte}, parts, 10


def _pooled_arrays(cfg: DataConfig, seed: int):
  """(x_train, y_train, x_test, y_test, num_classes) of a pooled dataset."""
  dataset, data_dir = cfg.dataset, cfg.data_dir
  if dataset == "npz":
    xtr, ytr, xte, yte = load_npz(cfg.npz_path)
    return xtr, ytr, xte, yte, int(max(ytr.max(initial=0),
                                       yte.max(initial=0))) + 1
  if dataset == "digits":
    return (*_holdout(*load_digits(), cfg.num_test, seed), 10)
  if dataset == "tiny":
    x, y = tiny(TINY_EXAMPLES, TINY_CLASSES, seed=seed)
    return (*_holdout(x, y, cfg.num_test, seed), TINY_CLASSES)
  load = (load_cifar10 if dataset == "cifar10" else
          lambda d, s: load_mnist(d, s, name=dataset))
  if cfg.split == "standard":
    return (*load(data_dir, "train"), *load(data_dir, "test"), 10)
  return (*_holdout(*load(data_dir, "test"), cfg.num_test, seed), 10)


def make_partition(cfg: DataConfig, labels: np.ndarray, seed: int,
                   device_class: np.ndarray | None = None
                   ) -> list[np.ndarray]:
  """``cfg.partition`` of a pool with ``labels``, with ``cfg``'s options
  (``device_class``: [N] class of each device, for device_dirichlet)."""
  p, n = cfg.partition, cfg.num_clients
  if p == "iid":
    return partition_lib.iid(len(labels), n, seed)
  if p == "dirichlet":
    return partition_lib.dirichlet(labels, n, cfg.dirichlet_alpha, seed)
  if p == "shards":
    return partition_lib.shards(labels, n, cfg.shards_per_client, seed,
                                cfg.allow_uneven)
  if p == "quantity":
    return partition_lib.quantity(len(labels), n, cfg.quantity_sigma, seed)
  if p == "sampled":
    return partition_lib.sampled(labels, n, cfg.dirichlet_alpha,
                                 cfg.examples_per_client, seed)
  if p == "device_dirichlet":
    if device_class is None or np.asarray(device_class).size != n:
      raise ValueError(
          "partition: device_dirichlet needs device_class, the class of each "
          f"of the {n} devices (planning.device_classes), got "
          f"{None if device_class is None else np.asarray(device_class).size}")
    return partition_lib.device_dirichlet(labels, device_class,
                                          cfg.dirichlet_alpha,
                                          cfg.device_correlation, seed)
  raise ValueError(f"partition: {p!r} does not split a pool; valid: "
                   f"{list(partition_lib.PARTITIONS)}")


def _natural(cfg: DataConfig, split_seed: int):
  """A natural dataset's clients and test set (``natural``)."""
  root = default_data_dir(cfg.data_dir)
  source = natural.source_of(root, cfg.dataset, cfg.source)
  absent = natural.missing(root, cfg.dataset, source)
  if absent:
    raise DatasetNotFoundError(
        f"dataset {cfg.dataset!r}: {absent[0]} not found. "
        f"{natural.how_to_get(root, cfg.dataset)}; or TFF's "
        f"{fetch_hint(cfg.dataset, root)}")
  cap = cfg.max_examples_per_client
  try:
    train = natural.read(root, cfg.dataset, "train", source, cap)
    test = natural.read(root, cfg.dataset, "test", source, cap)
  except natural.FormatError as e:
    raise DatasetFormatError(str(e)) from e
  chosen = natural.select(train, cfg.num_clients, split_seed, cfg.dataset)
  offsets = train.offsets
  parts = [np.arange(offsets[i], offsets[i] + train.counts[i]) for i in
           chosen]
  # The test set: each client's held-out examples, and those of users
  # that train nowhere (LEAF's '-t user' split holds out whole users).
  keep = {train.users[i] for i in chosen}
  outside = set(test.users) - set(train.users)
  t_off = test.offsets
  rows = [np.arange(t_off[j], t_off[j] + test.counts[j]) for j, u in
          enumerate(test.users) if u in keep or u in outside]
  rows = np.concatenate(rows) if rows else np.zeros(0, np.int64)
  if rows.size == 0:
    raise DatasetFormatError(
        f"dataset {cfg.dataset!r}: the test files {list(test.files)} hold no "
        "example of the chosen clients")
  test_set = {k: v[rows] for k, v in test.arrays.items()}
  where = (sorted({str(Path(f).parent) for f in train.files + test.files})
           if source == "leaf" else list(train.files + test.files))
  facts = dict(source=f"{source}: {', '.join(where)}",
               users_in_files=len(train.users),
               empty_users=int((train.counts == 0).sum()),
               oov_characters=train.oov + test.oov,
               num_samples_mismatch=(train.num_samples_mismatch +
                                     test.num_samples_mismatch))
  classes = (natural.FEMNIST_CLASSES if cfg.dataset == "femnist" else
             natural.VOCAB_SIZE)
  return train.arrays, test_set, parts, classes, facts


# Longer than 60 lines only by its docstring, the one list of every dataset's
# options; the loading itself is split into the helpers above.
def load_federated(config: DataConfig, seed: int = 0,
                   device_class: np.ndarray | None = None) -> FederatedData:
  """Loads a dataset, splits off a test set, and forms its clients.

  Every option comes from ``config`` (``DataConfig``: the one place data
  options are declared and given defaults; 'auto' values are resolved here
  by ``config.resolved()``). Datasets:
    'mnist': real MNIST; ``split='pool'`` (auto) splits the 10,000-image
      test file into a training pool and ``num_test`` (auto 2,000) held-out
      images, by seed; ``split='standard'`` uses the train files (needs the
      60,000-image files in data_dir) and the t10k test set.
    'fashion_mnist': as mnist, auto ``split='standard'``.
    'cifar10': python batches; auto ``split='standard'``; 'pool' also works.
    'npz': ``npz_path`` to an .npz with x_train, y_train, x_test, y_test.
    'synthetic': FedProx Synthetic(``synthetic_alpha``, ``synthetic_beta``);
      one client per generated device (natural).
    'digits': scikit-learn digits (optional dependency), pool split with
      ``num_test`` auto 360.
    'tiny': generated 8x8x1 images (512, 4 classes), pool split with
      ``num_test`` auto 128.
    'femnist': LEAF's or TFF's FEMNIST, one client per writer (natural);
      the test set is the clients' own held-out examples (``natural``).
    'shakespeare': LEAF's or TFF's Shakespeare, one client per speaking
      role (natural); next-character sequences (task 'sequence').
  Pooled datasets are split into ``num_clients`` clients by ``partition``
  with its options (``dirichlet_alpha``, ``shards_per_client``,
  ``allow_uneven``, ``quantity_sigma``, ``examples_per_client``,
  ``device_correlation``).

  Args:
    config: the data options.
    seed: seeds the partition (and generated data); the test and proxy
      splits and the sample of natural clients too unless
      ``config.split_seed`` is given.
    device_class: [num_clients] class of each device; only (and always)
      with ``partition='device_dirichlet'``.

  Returns:
    A ``FederatedData``.

  Raises:
    ValueError: an invalid option (named); DatasetNotFoundError /
      DatasetFormatError for missing or malformed files (named).
  """
  data_config.validate(config)
  cfg = config.resolved()
  split_seed = seed if cfg.split_seed is None else cfg.split_seed
  proxy, facts = None, {}
  if cfg.dataset == "synthetic":
    train, test, parts, num_classes = _synthetic(cfg, seed)
  elif cfg.natural:
    train, test, parts, num_classes, facts = _natural(cfg, split_seed)
  else:
    xtr, ytr, xte, yte, num_classes = _pooled_arrays(cfg, split_seed)
    if cfg.proxy_examples:
      xtr, ytr, px, py = split_proxy(xtr, ytr, cfg.proxy_examples,
                                     split_seed)
      proxy = {"x": px, "y": py}
    train, test = {"x": xtr, "y": ytr}, {"x": xte, "y": yte}
    # fold a constant into the seed so partition and hold-out draw differently.
    parts = make_partition(cfg, ytr, seed + 7919, device_class)
  # Natural files hold users that are not clients: count the clients'.
  num_train = (sum(len(p) for p in parts) if cfg.natural else
               len(train["x"]))
  held = None
  if cfg.holdout_fraction:
    parts, held = partition_lib.split_holdout(parts, cfg.holdout_fraction,
                                              seed + 15485863)
  extras = {k: v for k, v in train.items() if k not in ("x", "y")}
  build = lambda p: client_data_lib.from_partition(
      train["x"], train["y"], p, seed=seed + 104729, extras=extras)
  cd = build(parts)
  x = train["x"]
  info = DatasetInfo(
      name=cfg.dataset, task="sequence" if cfg.dataset == "shakespeare"
      else "classification", num_classes=int(num_classes),
      input_shape=tuple(int(s) for s in x.shape[1:]),
      input_dtype="int32" if np.issubdtype(x.dtype, np.integer) else "float32",
      partition=cfg.partition,
      num_train=int(num_train),
      num_test=int(len(test["y"])), num_proxy=int(cfg.proxy_examples),
      layout=client_data_lib.layout_report(cd),
      num_holdout=int(sum(len(h) for h in held)) if held else 0,
      source=facts.pop("source", cfg.dataset), **facts)
  return FederatedData(train=cd, test=_typed(test), info=info,
                       proxy=None if proxy is None else _typed(proxy),
                       holdout=None if held is None else build(held))


def _typed(batch: dict) -> dict:
  """A batch dict as the engine takes it: float inputs float32, integer
  inputs and labels int32, masks float32."""
  out = {}
  for k, v in batch.items():
    v = np.asarray(v)
    if k in ("x", "y") and np.issubdtype(v.dtype, np.integer):
      out[k] = v.astype(np.int32)
    else:
      out[k] = v.astype(np.float32)
  return out
