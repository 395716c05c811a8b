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

import functools
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
from ftte_jax.data import partition as partition_lib

DATASETS = ("mnist", "fashion_mnist", "cifar10", "npz", "synthetic", "digits",
            "tiny")


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
REMOTE_FILES: dict[str, list[tuple[str, str, int, str]]] = {
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
}


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
      lines.append(f"  {url} -> {root / rel} ({size} bytes, sha256 {digest})")
    if name == "cifar10":
      lines.append(f"  then extract it so that {root / 'cifar-10-batches-py'} "
                   "exists.")
  lines.append("Set the directory with data_dir=... or $FTTE_DATA_DIR.")
  return DatasetNotFoundError("\n".join(lines))


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
  if name == "cifar10":
    hint += " and extract it there"
  return hint


def missing_files(name: str, data_dir: str | os.PathLike | None = None
                  ) -> list[Path]:
  """The files ``load_federated``'s default split of ``name`` reads that are
  absent ([] for datasets that are generated or not downloadable).

  MNIST's default 'pool' split reads only the t10k files; Fashion-MNIST and
  CIFAR-10 default to 'standard', which reads train and test.
  """
  root = default_data_dir(data_dir)
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
    pct = min(100, 100 * done // total) if total else 100
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
                            int(length) if length else size, stream)
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
      'cifar10').
    data_dir: target directory (see default_data_dir).
    timeout_s: socket timeout per request.
    progress: report each file's progress on stderr.
    split: 'train' or 'test' fetches only that split's files of MNIST or
      Fashion-MNIST (MNIST's default 'pool' split reads only 'test'); None
      fetches everything (CIFAR-10 is one archive either way).

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
    if stem not in rel and name != "cifar10":
      continue
    if (root / rel).exists() and sha256_file(root / rel) == digest:
      continue
    _fetch(name, root, rel, url, size, digest, timeout_s,
           sys.stderr if progress else None)
  if name == "cifar10":
    with tarfile.open(root / REMOTE_FILES[name][0][0], "r:gz") as tar:
      tar.extractall(root, filter="data")
  return root


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


_PARTITION_KEYS = ("alpha", "shards_per_client", "allow_uneven", "sigma",
                   "examples_per_client")
# Folded into the split seed so the proxy draw differs from the hold-out's.
_PROXY_SALT = 31337


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


def _take_options(dataset: str, opts: dict, defaults: dict) -> dict:
  """``defaults`` overridden by ``opts``; unknown options are an error."""
  unknown = set(opts) - set(defaults)
  if unknown:
    raise ValueError(f"dataset {dataset!r}: unknown options "
                     f"{sorted(unknown)}; valid: {sorted(defaults)} and "
                     f"partition options {sorted(_PARTITION_KEYS)}")
  return {**defaults, **opts}


def _load_synthetic(num_clients, seed, take, part_opts):
  """Synthetic(alpha, beta) with its natural partition."""
  o = take({"alpha": 1.0, "beta": 1.0, "max_samples_per_client": None,
            "samples_per_client": None})
  # 'alpha' is the dataset's here, not Dirichlet's.
  o["alpha"] = part_opts.pop("alpha", o["alpha"])
  if part_opts:
    raise ValueError(f"synthetic: partition options {sorted(part_opts)} do "
                     "not apply to the natural partition")
  xtr, ytr, parts, xte, yte = synthetic_fedprox(
      o["alpha"], o["beta"], num_clients, seed,
      max_samples_per_client=o["max_samples_per_client"],
      samples_per_client=o["samples_per_client"])
  return xtr, ytr, xte, yte, parts


def _load_arrays(dataset, seed, data_dir, take):
  """(x_train, y_train, x_test, y_test, num_classes) of a pooled dataset."""
  if dataset == "npz":
    o = take({"path": None, "num_classes": None})
    if o["path"] is None:
      raise ValueError("dataset 'npz' needs path=<file.npz> holding x_train, "
                       "y_train, x_test, y_test")
    xtr, ytr, xte, yte = load_npz(o["path"], o["num_classes"])
    return xtr, ytr, xte, yte, (o["num_classes"] or
                                int(max(ytr.max(), yte.max())) + 1)
  if dataset == "digits":
    o = take({"num_test": 360})
    return (*_holdout(*load_digits(), o["num_test"], seed), 10)
  if dataset == "tiny":
    o = take({"num_examples": 512, "num_classes": 4, "num_test": 128})
    x, y = tiny(o["num_examples"], o["num_classes"], seed=seed)
    return (*_holdout(x, y, o["num_test"], seed), o["num_classes"])
  o = take({"split": "pool" if dataset == "mnist" else "standard",
            "num_test": 2000})
  if o["split"] not in ("pool", "standard"):
    raise ValueError(f"split must be 'pool' or 'standard', got "
                     f"{o['split']!r}")
  load = (load_cifar10 if dataset == "cifar10" else
          lambda d, s: load_mnist(d, s, name=dataset))
  if o["split"] == "standard":
    return (*load(data_dir, "train"), *load(data_dir, "test"), 10)
  return (*_holdout(*load(data_dir, "test"), o["num_test"], seed), 10)


# Longer than 60 lines only by its docstring, the one list of every dataset's
# options; the loading itself is split into the helpers above.
def load_federated(dataset: str, num_clients: int,
                   partition: str | None = None,
                   seed: int = 0, data_dir: str | os.PathLike | None = None,
                   num_proxy: int = 0, split_seed: int | None = None,
                   holdout_fraction: float = 0.0, **opts):
  """Loads a dataset, splits off a test set, and partitions it across clients.

  Datasets and their options:
    'mnist': real MNIST; ``split='pool'`` (default) splits the 10,000-image
      test file into a training pool and ``num_test`` (default 2,000) held-out
      images, by seed; ``split='standard'`` uses the train files (needs the
      60,000-image files in data_dir) and the t10k test set.
    'fashion_mnist': as mnist, default ``split='standard'``.
    'cifar10': python batches; default ``split='standard'``; 'pool' also works.
    'npz': ``path=`` to an .npz with x_train, y_train, x_test, y_test;
      ``num_classes`` optional.
    'synthetic': FedProx Synthetic(``alpha``=1, ``beta``=1); one client per
      generated device, so ``partition`` must be 'natural'
      (``max_samples_per_client`` optional).
    'digits': scikit-learn digits (optional dependency), pool split with
      ``num_test`` default 360.
    'tiny': generated 8x8x1 images (``num_examples``=512, ``num_classes``=4),
      pool split with ``num_test`` default 128.
  Partition options ('alpha', 'shards_per_client', 'allow_uneven', 'sigma')
  are passed to ftte_jax.partition.make_partition.

  Args:
    dataset: one of DATASETS.
    num_clients: number of clients.
    partition: 'iid', 'dirichlet', 'shards', 'quantity', or 'natural' (the
      only choice for synthetic); None means 'natural' for synthetic and
      'iid' otherwise.
    seed: seeds the partition (and generated data); the test and proxy
      splits too unless ``split_seed`` is given.
    data_dir: data directory (see default_data_dir).
    num_proxy: training-pool examples held by the server instead of any
      client (``split_proxy``); not for synthetic, whose devices have no
      common pool.
    split_seed: seeds the test and proxy splits (None: ``seed``), so runs of
      several seeds can share one split and one pretrained model.
    holdout_fraction: if > 0, each client keeps this share of its examples
      for its own evaluation, never for training
      (``partition.split_holdout``).
    **opts: dataset and partition options above.

  Returns:
    (ClientData, (x_test, y_test), info) where info has 'name',
    'num_classes', 'input_shape' (one example, no batch axis), 'partition',
    'num_train', 'num_test', 'num_proxy', 'layout' (see
    client_data.layout_report) and, when ``num_proxy > 0``, 'proxy': the
    server's ``(x, y)`` numpy arrays; with a hold-out, 'holdout': the
    clients' held-out slices as a ClientData (client i's rows, as in the
    training data) and 'num_holdout'.
  """
  if dataset not in DATASETS:
    raise ValueError(f"dataset: unknown {dataset!r}; valid: {list(DATASETS)}")
  part_opts = {k: opts.pop(k) for k in list(opts) if k in _PARTITION_KEYS}
  if partition is None:
    partition = "natural" if dataset == "synthetic" else "iid"
  valid_parts = ("natural",) if dataset == "synthetic" else partition_lib.PARTITIONS
  if partition not in valid_parts:
    raise ValueError(f"partition: {partition!r} is not valid for dataset "
                     f"{dataset!r}; valid: {list(valid_parts)}")
  take = functools.partial(_take_options, dataset, opts)
  split_seed = seed if split_seed is None else split_seed
  if dataset == "synthetic" and num_proxy:
    raise ValueError("proxy_examples: synthetic devices have no common pool "
                     "to hold a proxy set out of; use 0")
  proxy = None
  if dataset == "synthetic":
    xtr, ytr, xte, yte, parts = _load_synthetic(num_clients, seed, take,
                                                part_opts)
    num_classes = 10
  else:
    xtr, ytr, xte, yte, num_classes = _load_arrays(dataset, split_seed,
                                                   data_dir, take)
    if num_proxy:
      xtr, ytr, *proxy = split_proxy(xtr, ytr, num_proxy, split_seed)
    # fold a constant into the seed so partition and hold-out draw differently.
    parts = partition_lib.make_partition(partition, ytr, num_clients,
                                         seed + 7919, **part_opts)
  held = None
  if holdout_fraction:
    parts, held = partition_lib.split_holdout(parts, holdout_fraction,
                                              seed + 15485863)
  cd = client_data_lib.from_partition(xtr, ytr, parts, seed=seed + 104729)
  info = {"name": dataset, "num_classes": int(num_classes),
          "input_shape": tuple(int(s) for s in xtr.shape[1:]),
          "partition": partition, "num_train": int(len(xtr)),
          "num_test": int(len(xte)), "num_proxy": int(num_proxy),
          "layout": client_data_lib.layout_report(cd)}
  if proxy is not None:
    info["proxy"] = tuple(proxy)
  if held is not None:
    info["holdout"] = client_data_lib.from_partition(xtr, ytr, held,
                                                     seed=seed + 104729)
    info["num_holdout"] = int(sum(len(h) for h in held))
  return cd, (xte, yte), info
