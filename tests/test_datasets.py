"""Tests for ftte_jax.datasets: good and bad files, real MNIST, load_federated."""

import gzip
import os
import pickle
import struct
import warnings

import numpy as np
import pytest

from ftte_jax.data import client_data as cdl
from ftte_jax.data.config import DataConfig
from ftte_jax.data import datasets as D

MNIST_DIR = D.default_data_dir()
HAVE_MNIST = (MNIST_DIR / "mnist" / "t10k-images-idx3-ubyte.gz").exists()


def write_idx(path, arr, magic=None, truncate=None):
  arr = np.asarray(arr, np.uint8)
  magic = magic if magic is not None else (0x0800 | arr.ndim)
  raw = struct.pack(">I", magic) + struct.pack(f">{arr.ndim}I", *arr.shape)
  raw += arr.tobytes()
  data = gzip.compress(raw)
  if truncate:
    data = data[:truncate]
  path.write_bytes(data)
  return path


def mnist_files(tmp_path, n=6, images=None, labels=None, prefix="t10k"):
  root = tmp_path / "mnist"
  root.mkdir(exist_ok=True)
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (n, 28, 28)) if images is None else images
  labels = np.arange(n) % 10 if labels is None else labels
  ip = write_idx(root / f"{prefix}-images-idx3-ubyte.gz", images)
  lp = write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", labels)
  return ip, lp


# ------------------------------------------------------------------ IDX


def test_idx_roundtrip(tmp_path):
  ip, lp = mnist_files(tmp_path, n=6)
  x, y = D.load_idx_pair(ip, lp)
  assert x.shape == (6, 28, 28, 1) and x.dtype == np.float32
  assert 0.0 <= x.min() and x.max() <= 1.0
  np.testing.assert_array_equal(y, np.arange(6))
  raw = np.random.default_rng(0).integers(0, 256, (6, 28, 28))
  np.testing.assert_allclose(x[..., 0] * 255, raw, atol=1e-3)


def test_idx_wrong_magic(tmp_path):
  ip, lp = mnist_files(tmp_path)
  write_idx(lp, np.arange(6), magic=2051)  # image magic on a label file.
  with pytest.raises(D.DatasetFormatError, match=r"labels.*wrong magic number "
                     r"2051, expected 2049"):
    D.load_idx_pair(ip, lp)


def test_idx_truncated_gzip(tmp_path):
  ip, lp = mnist_files(tmp_path)
  write_idx(ip, np.zeros((6, 28, 28)), truncate=40)
  with pytest.raises(D.DatasetFormatError, match=r"images-idx3.*truncated gzip"):
    D.load_idx_pair(ip, lp)


def test_idx_wrong_sizes(tmp_path):
  ip, lp = mnist_files(tmp_path)
  raw = struct.pack(">IIII", 2051, 7, 28, 28) + bytes(6 * 28 * 28)
  ip.write_bytes(gzip.compress(raw))
  with pytest.raises(D.DatasetFormatError, match=r"images.*header shape "
                     r"\(7, 28, 28\) needs 5488 data bytes, file has 4704"):
    D.load_idx_pair(ip, lp)


def test_idx_count_mismatch(tmp_path):
  ip, lp = mnist_files(tmp_path, n=6, labels=np.arange(5))
  with pytest.raises(D.DatasetFormatError, match="6 images but .* 5 labels"):
    D.load_idx_pair(ip, lp)


def test_idx_labels_out_of_range(tmp_path):
  ip, lp = mnist_files(tmp_path, labels=np.array([0, 1, 2, 12, 3, 4]))
  with pytest.raises(D.DatasetFormatError, match=r"labels-idx1.*label 12 out "
                     r"of range \[0, 10\)"):
    D.load_idx_pair(ip, lp)


def test_load_mnist_from_dir_and_missing_message(tmp_path):
  mnist_files(tmp_path, n=4, prefix="train")
  x, y = D.load_mnist(tmp_path, split="train")
  assert x.shape == (4, 28, 28, 1)
  with pytest.raises(D.DatasetNotFoundError) as e:
    D.load_mnist(tmp_path / "empty", split="test")
  msg = str(e.value)
  assert "t10k-images-idx3-ubyte.gz" in msg and "storage.googleapis.com" in msg
  assert str(tmp_path / "empty" / "mnist") in msg and "sha256" in msg


def test_data_dir_resolution(tmp_path, monkeypatch):
  monkeypatch.setenv("FTTE_DATA_DIR", str(tmp_path))
  assert D.default_data_dir() == tmp_path
  assert D.default_data_dir("/x") == D.default_data_dir("/x")
  assert str(D.default_data_dir("/x")) == "/x"
  monkeypatch.delenv("FTTE_DATA_DIR")
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
  assert D.default_data_dir() == tmp_path / "cache" / "ftte_jax"


@pytest.mark.skipif(not HAVE_MNIST, reason="MNIST test split absent from FTTE_DATA_DIR")
def test_real_mnist_test_split():
  x, y = D.load_mnist(split="test")
  assert x.shape == (10000, 28, 28, 1) and y.shape == (10000,)
  np.testing.assert_array_equal(
      np.bincount(y, minlength=10),
      [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009])
  assert x.min() == 0.0 and x.max() == 1.0


def test_sha256_verification(tmp_path):
  p = tmp_path / "f.bin"
  p.write_bytes(b"abc")
  D.verify_sha256(p, "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad")
  with pytest.raises(D.DatasetFormatError, match="f.bin: SHA-256"):
    D.verify_sha256(p, "0" * 64)


def test_download_offline_error_says_what_and_where(tmp_path, monkeypatch):
  def offline(*a, **k):
    raise OSError("network unreachable")
  monkeypatch.setattr(D.urllib.request, "urlopen", offline)
  with pytest.raises(D.DatasetNotFoundError) as e:
    D.download("fashion_mnist", tmp_path)
  msg = str(e.value)
  assert "train-images-idx3-ubyte.gz" in msg
  assert str(tmp_path / "fashion_mnist") in msg
  short = e.value.short  # what a launcher prints: one line, what and where.
  assert "\n" not in short and short.startswith(
      "fashion_mnist: could not be downloaded (network unreachable)")
  assert f"into {tmp_path / 'fashion_mnist'}" in short
  assert not (tmp_path / "fashion_mnist").exists()  # No partials, no folder.
  with pytest.raises(ValueError, match="downloadable"):
    D.download("imagenet", tmp_path)


def test_download_rejects_bad_checksum(tmp_path, monkeypatch):
  import io
  monkeypatch.setattr(D.urllib.request, "urlopen",
                      lambda *a, **k: io.BytesIO(b"not mnist"))
  with pytest.raises(D.DatasetFormatError, match="SHA-256"):
    D.download("mnist", tmp_path)
  assert list((tmp_path / "mnist").iterdir()) == []


@pytest.fixture
def served_mnist(tmp_path, monkeypatch):
  """REMOTE_FILES['mnist'] pointed at small generated files that a patched
  urlopen serves (no network); returns the list of URLs fetched."""
  import io
  src = tmp_path / "served"
  src.mkdir()
  paths = [*mnist_files(src, prefix="train"), *mnist_files(src)]
  monkeypatch.setitem(D.REMOTE_FILES, "mnist", [
      (f"mnist/{p.name}", f"https://example.invalid/{p.name}",
       p.stat().st_size, D.sha256_file(p)) for p in paths])
  fetched = []

  def urlopen(url, timeout):
    fetched.append(url)
    return io.BytesIO((src / "mnist" / url.rsplit("/", 1)[1]).read_bytes())
  monkeypatch.setattr(D.urllib.request, "urlopen", urlopen)
  return fetched


def test_download_verifies_reports_progress_and_fetches_once(
    tmp_path, served_mnist, capsys):
  root = tmp_path / "data"
  assert len(D.missing_files("mnist", root)) == 2  # the pool split: t10k.
  assert D.download("mnist", root) == root
  assert D.missing_files("mnist", root) == []
  x, y = D.load_mnist(root, split="train")
  assert x.shape == (6, 28, 28, 1) and len(served_mnist) == 4
  err = capsys.readouterr().err  # not a terminal: a few plain lines.
  assert "\r" not in err
  lines = err.splitlines()
  assert all(l.startswith("mnist: ") for l in lines) and len(lines) <= 4 * 5
  assert any(l.startswith("mnist: t10k-images-idx3-ubyte.gz ") and
             l.endswith(" MB 100%") for l in lines), err
  D.download("mnist", root)  # verified files are not fetched again.
  assert len(served_mnist) == 4


def test_download_refuses_and_deletes_bad_bytes(tmp_path, served_mnist,
                                                monkeypatch):
  rel, url, size, _ = D.REMOTE_FILES["mnist"][2]
  D.REMOTE_FILES["mnist"][2] = (rel, url, size, "0" * 64)
  with pytest.raises(D.DatasetFormatError, match="SHA-256"):
    D.download("mnist", tmp_path / "data", progress=False)
  # The train files passed; the bad test file is gone, never loadable.
  assert sorted(p.name for p in (tmp_path / "data" / "mnist").iterdir()) == [
      "train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"]
  with pytest.raises(D.DatasetNotFoundError):
    D.load_mnist(tmp_path / "data", split="test")


def test_progress_redraws_one_line_on_a_terminal():
  import io

  class Tty(io.StringIO):
    def isatty(self):
      return True
  out, stream = io.BytesIO(), Tty()
  D._copy_with_progress(io.BytesIO(b"x" * 4_200_000), out, "mnist: f.gz",
                        10_000_000, stream)
  text = stream.getvalue()
  assert text.startswith("\rmnist: f.gz 0.0/10.0 MB 0%")
  assert text.endswith("\rmnist: f.gz 4.2/10.0 MB 42%\n")
  assert text.count("\n") == 1 and out.getvalue() == b"x" * 4_200_000


# ------------------------------------------------------------------ CIFAR


# Python 3's protocol 2 spells bytes as _codecs.encode calls, which the real
# (Python 2 written) batches never contain and the loader refuses; protocol 3
# writes bytes natively like Python 2's strings.
def write_cifar(path, n=5, labels=None, protocol=3, data=None):
  rng = np.random.default_rng(1)
  batch = {b"batch_label": b"testing batch 1 of 1",
           b"labels": list(labels if labels is not None else range(n)),
           b"data": (data if data is not None else
                     rng.integers(0, 256, (n, 3072)).astype(np.uint8)),
           b"filenames": [b"f%d.png" % i for i in range(n)]}
  with open(path, "wb") as f:
    pickle.dump(batch, f, protocol=protocol)
  return batch


@pytest.mark.parametrize("protocol", [3, pickle.HIGHEST_PROTOCOL])
def test_cifar_batch_roundtrip(tmp_path, protocol):
  batch = write_cifar(tmp_path / "data_batch_1", protocol=protocol)
  x, y = D.load_cifar_batch(tmp_path / "data_batch_1")
  assert x.shape == (5, 32, 32, 3) and x.dtype == np.float32
  np.testing.assert_array_equal(y, np.arange(5))
  # Channel-major rows: the first 1024 bytes are the red plane.
  np.testing.assert_allclose(x[2, 0, 1, 0] * 255, batch[b"data"][2, 1], atol=1e-3)
  np.testing.assert_allclose(x[2, 0, 0, 1] * 255, batch[b"data"][2, 1024],
                             atol=1e-3)


def test_load_cifar10_dir(tmp_path):
  folder = tmp_path / "cifar-10-batches-py"
  folder.mkdir()
  for i in range(1, 6):
    write_cifar(folder / f"data_batch_{i}", n=3, labels=[i, 0, 9])
  write_cifar(folder / "test_batch", n=2, labels=[1, 2])
  x, y = D.load_cifar10(tmp_path, "train")
  assert x.shape == (15, 32, 32, 3) and list(y[:3]) == [1, 0, 9]
  assert D.load_cifar10(tmp_path, "test")[0].shape == (2, 32, 32, 3)


class _Evil:

  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (os.system, (f"touch {self.marker}",))


def test_cifar_malicious_pickle_raises_without_executing(tmp_path):
  marker = tmp_path / "pwned"
  path = tmp_path / "data_batch_1"
  with open(path, "wb") as f:
    pickle.dump({b"data": _Evil(marker), b"labels": [0]}, f, protocol=3)
  with pytest.raises(D.DatasetFormatError, match=r"data_batch_1.*(posix|os|nt)"
                     r"\.system.*refusing"):
    D.load_cifar_batch(path)
  assert not marker.exists()


def test_cifar_other_globals_refused(tmp_path):
  path = tmp_path / "b"
  with open(path, "wb") as f:
    pickle.dump({b"data": np.zeros((1, 3072), np.uint8), b"labels": [0],
                 b"extra": warnings.warn}, f, protocol=3)
  with pytest.raises(D.DatasetFormatError, match="warnings.warn"):
    D.load_cifar_batch(path)


@pytest.mark.parametrize("kind,match", [
    ("labels", r"label 10 out of range \[0, 10\)"),
    ("shape", r"'data' must be \[N, 3072\] uint8"),
    ("count", "5 images but labels have shape"),
    ("truncated", "not a readable pickle"),
    ("notdict", "expected a dict"),
])
def test_cifar_bad_files(tmp_path, kind, match):
  path = tmp_path / "test_batch"
  if kind == "labels":
    write_cifar(path, labels=[0, 1, 2, 3, 10])
  elif kind == "shape":
    write_cifar(path, data=np.zeros((5, 3000), np.uint8))
  elif kind == "count":
    write_cifar(path, labels=[0, 1, 2])
  elif kind == "truncated":
    write_cifar(path)
    path.write_bytes(path.read_bytes()[:100])
  else:
    path.write_bytes(pickle.dumps([1, 2, 3], protocol=3))
  with pytest.raises(D.DatasetFormatError, match="test_batch: " + match):
    D.load_cifar_batch(path)


# ------------------------------------------------------------------ npz


def test_npz_roundtrip_and_errors(tmp_path):
  rng = np.random.default_rng(0)
  good = dict(x_train=rng.integers(0, 256, (8, 5, 5), dtype=np.uint8),
              y_train=np.arange(8) % 3, x_test=rng.integers(
                  0, 256, (4, 5, 5), dtype=np.uint8), y_test=np.arange(4) % 3)
  np.savez(tmp_path / "good.npz", **good)
  xtr, ytr, xte, yte = D.load_npz(tmp_path / "good.npz")
  assert xtr.shape == (8, 5, 5, 1) and xtr.max() <= 1.0 and yte.dtype == np.int32

  np.savez(tmp_path / "missing.npz", x_train=good["x_train"],
           y_train=good["y_train"])
  with pytest.raises(D.DatasetFormatError, match=r"missing.npz: missing arrays "
                     r"\['x_test', 'y_test'\]"):
    D.load_npz(tmp_path / "missing.npz")
  np.savez(tmp_path / "sizes.npz", **{**good, "y_train": np.arange(7) % 3})
  with pytest.raises(D.DatasetFormatError, match="sizes.npz: x_train has 8 "
                     "examples but y_train has 7"):
    D.load_npz(tmp_path / "sizes.npz")
  with pytest.raises(D.DatasetFormatError, match=r"good.npz: y_train: label 2 "
                     r"out of range \[0, 2\)"):
    D.load_npz(tmp_path / "good.npz", num_classes=2)
  np.savez(tmp_path / "obj.npz", **{**good, "y_test": np.array(
      [{"a": 1}] * 4, dtype=object)})
  with pytest.raises(D.DatasetFormatError, match="obj.npz"):
    D.load_npz(tmp_path / "obj.npz")
  (tmp_path / "junk.npz").write_bytes(b"PK\x03\x04garbage")
  with pytest.raises(D.DatasetFormatError, match="junk.npz"):
    D.load_npz(tmp_path / "junk.npz")


# ------------------------------------------------------------------ generated


def test_synthetic_natural_partition():
  xtr, ytr, parts, xte, yte = D.synthetic_fedprox(1.0, 1.0, num_clients=5,
                                                  seed=0)
  assert xtr.shape[1] == 60 and len(parts) == 5
  assert min(len(p) for p in parts) >= 45  # lognormal + 50, minus 10% test.
  np.testing.assert_array_equal(np.concatenate(parts), np.arange(len(xtr)))
  assert ytr.max() <= 9 and len(xte) == len(yte) > 0
  again = D.synthetic_fedprox(1.0, 1.0, num_clients=5, seed=0)
  np.testing.assert_array_equal(again[0], xtr)
  capped = D.synthetic_fedprox(1.0, 1.0, 5, seed=0, max_samples_per_client=60)
  assert max(len(p) for p in capped[2]) <= 54
  with pytest.raises(ValueError, match="alpha and beta must be >= 0"):
    D.synthetic_fedprox(-1.0, 1.0)


def test_digits_optional_dependency():
  try:
    import sklearn  # noqa: F401
  except ImportError:
    with pytest.raises(D.DatasetNotFoundError, match="pip install scikit-learn"):
      D.load_digits()
  else:
    x, y = D.load_digits()
    assert x.shape == (1797, 8, 8, 1) and y.max() == 9


# ------------------------------------------------------------------ federated


def _load(dataset, num_clients, partition=None, seed=0, **kw):
  return D.load_federated(DataConfig(dataset=dataset, num_clients=num_clients,
                                     partition=partition, **kw), seed=seed)


def test_load_federated_tiny_and_synthetic():
  fed = _load("tiny", 6, "dirichlet", seed=1, dirichlet_alpha=0.5)
  cd, info = fed.train, fed.info
  assert isinstance(cd, cdl.ClientData) and cd.num_clients == 6
  assert isinstance(info, D.DatasetInfo) and fed.proxy is None
  assert info.input_shape == (8, 8, 1) and info.num_classes == 4
  assert info.task == "classification" and info.input_dtype == "float32"
  assert info.num_train == int(cd.counts.sum()) == 384
  assert len(fed.test["x"]) == 128 and set(fed.test) == {"x", "y"}
  fed2 = _load("synthetic", 4, synthetic_alpha=0.5, synthetic_beta=0.5,
               max_examples_per_client=200)
  assert fed2.info.input_shape == (60,) and fed2.info.partition == "natural"
  assert fed2.train.num_clients == 4


@pytest.mark.skipif(not HAVE_MNIST, reason="MNIST test split absent from FTTE_DATA_DIR")
def test_load_federated_mnist_pool_deterministic():
  fed = _load("mnist", 10, "iid", proxy_examples=0)
  xte = fed.test["x"]
  assert fed.info.num_train == 8000 and xte.shape == (2000, 28, 28, 1)
  again = _load("mnist", 10, "iid", proxy_examples=0)
  np.testing.assert_array_equal(fed.train.offsets, again.train.offsets)
  np.testing.assert_array_equal(fed.train.x, again.train.x)
  np.testing.assert_array_equal(xte, again.test["x"])


def test_load_federated_npz(tmp_path):
  rng = np.random.default_rng(0)
  np.savez(tmp_path / "d.npz", x_train=rng.normal(size=(31, 3)).astype(
      np.float32), y_train=np.arange(31) % 2, x_test=np.zeros((4, 3)),
           y_test=np.arange(4) % 2)
  fed = _load("npz", 3, "shards", npz_path=str(tmp_path / "d.npz"),
              shards_per_client=2, allow_uneven=True)
  # proxy_examples=auto holds none out of an npz (its size is the user's).
  assert fed.info.num_classes == 2 and fed.train.num_clients == 3
  assert fed.info.num_proxy == 0 and fed.info.num_train == 31


@pytest.mark.parametrize("kw,match", [
    (dict(dataset="imagenet"), r"dataset must be one of \('mnist'"),
    (dict(dataset="tiny", partition="dirichlet", dirichlet_alpha=0.0),
     "dirichlet_alpha must be"),
    (dict(dataset="tiny", partition="iid", num_test=600), "num_test"),
    (dict(dataset="tiny", num_clients=400, partition="iid"),
     r"num_clients=400 .* \[1, 384\]"),
    (dict(dataset="tiny", partition="bogus"), r"partition must be one of"),
    (dict(dataset="tiny", num_clients=5, partition="shards",
          shards_per_client=5), "do not divide"),
    (dict(dataset="synthetic", partition="iid"), r"partition: synthetic's"),
    (dict(dataset="tiny", partition="natural"), r"partition: 'natural'"),
    (dict(dataset="npz"), "npz_path"),
    (dict(dataset="femnist", num_test=10), "num_test: femnist takes"),
    (dict(dataset="tiny", split="pool"), "split: only mnist"),
    (dict(dataset="mnist", split="standard", num_test=10),
     "num_test: mnist with split=standard"),
    (dict(dataset="shakespeare", proxy_examples=3), "proxy_examples: "),
    (dict(dataset="tiny", source="leaf"), "source: only femnist"),
])
def test_load_federated_bad_options(kw, match):
  kw.setdefault("num_clients", 4)
  with pytest.raises(ValueError, match=match):
    D.load_federated(DataConfig(**kw))


def test_synthetic_samples_per_client_gives_equal_clients():
  fed = _load("synthetic", 50, seed=3, synthetic_samples_per_client=10)
  cd, xte = fed.train, fed.test["x"]
  np.testing.assert_array_equal(cd.counts, np.full(50, 9))  # one held out
  assert xte.shape == (50, 60) and fed.info.layout["num_examples"] == 450
  assert len(np.unique(np.asarray(cd.y))) > 5  # every class can occur
  again = _load("synthetic", 50, seed=3, synthetic_samples_per_client=10)
  np.testing.assert_array_equal(cd.x, again.train.x)
  with pytest.raises(ValueError, match="samples_per_client must be >= 2"):
    D.synthetic_fedprox(1.0, 1.0, 4, samples_per_client=1)
