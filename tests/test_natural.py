"""Natural-client datasets (FEMNIST by writer, Shakespeare by role) read
from small files written here in LEAF's and TFF's published layouts."""

import hashlib
import io
import json
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

from ftte_jax.data import datasets as D
from ftte_jax.data import natural
from ftte_jax.data.config import DataConfig

sys.path.insert(0, str(Path(__file__).parent))
import natural_files as nf  # noqa: E402  (tests/ on the path)

# LEAF's models/utils/language_utils.py, as published.
LEAF_LETTERS = ("\n !\"&'(),-.0123456789:;>?ABCDEFGHIJKLMNOPQRSTUVWXYZ[]abcd"
                "efghijklmnopqrstuvwxyz}")


def load(root, dataset, num_clients, seed=0, **kw):
  return D.load_federated(DataConfig(dataset=dataset, data_dir=str(root),
                                     num_clients=num_clients, **kw), seed=seed)


def client_rows(fed, i, key="x"):
  arr = np.asarray(getattr(fed.train, key) if key in ("x", "y") else
                   fed.train.extras[key])
  return arr[fed.train.rows(i)]


def as_set(rows):
  return {np.asarray(r).tobytes() for r in rows}


def test_vocabulary_is_leafs():
  assert natural.LETTERS == LEAF_LETTERS and len(LEAF_LETTERS) == 80
  text = "To be, or not?"
  # LEAF's word_to_indices: ALL_LETTERS.find(c) per character.
  np.testing.assert_array_equal(natural.encode(text),
                                [LEAF_LETTERS.find(c) for c in text])


def test_femnist_leaf_clients_are_writers(tmp_path):
  users = nf.femnist_users(9, [5, 1, 7, 4, 6, 3, 8, 2, 5], seed=0)
  train, test = nf.split_users(users)
  nf.write_leaf(tmp_path, "femnist", "train", train, files=3)
  nf.write_leaf(tmp_path, "femnist", "test", test, files=3)
  fed = load(tmp_path, "femnist", 9)
  info = fed.info
  assert (info.task, info.num_classes, info.input_shape, info.input_dtype,
          info.partition) == ("classification", 62, (28, 28, 1), "float32",
                              "natural")
  assert info.users_in_files == 9 and info.empty_users == 0
  assert fed.train.num_clients == 9
  # Natural boundaries: client i holds writer i's training examples, all
  # of them and no other (a writer with one example included).
  for i, (x, y) in enumerate(train.values()):
    assert int(fed.train.counts[i]) == len(y)
    want = np.asarray(x, np.float32).reshape(-1, 28, 28, 1)
    assert as_set(client_rows(fed, i)) == as_set(want)
    assert sorted(client_rows(fed, i, "y").tolist()) == sorted(y)
  assert int(fed.train.counts[1]) == 1
  # The test set: every writer's held-out examples.
  held = [x for x, _ in test.values() for x in x]
  assert len(fed.test["y"]) == len(held) == info.num_test
  assert as_set(fed.test["x"]) == as_set(
      np.asarray(held, np.float32).reshape(-1, 28, 28, 1))


def test_empty_user_is_skipped_and_counted(tmp_path):
  users = nf.femnist_users(4, 4, seed=1)
  users["f9999_00"] = ([], [])
  nf.write_leaf(tmp_path, "femnist", "train", users)
  nf.write_leaf(tmp_path, "femnist", "test", nf.femnist_users(4, 2, seed=2))
  fed = load(tmp_path, "femnist", 4)
  assert fed.info.users_in_files == 5 and fed.info.empty_users == 1
  assert (np.asarray(fed.train.counts) == 4).all()
  with pytest.raises(ValueError, match=r"num_clients: femnist has 4 writers"
                     r" .* \(1 empty, skipped\); use --num_clients <= 4"):
    load(tmp_path, "femnist", 5)


def test_num_clients_takes_a_seeded_sample_and_its_test_examples(tmp_path):
  users = nf.femnist_users(10, 6, seed=3)
  nf.write_leaf_dataset(tmp_path, "femnist", users, train_fraction=0.5)
  a = load(tmp_path, "femnist", 4, split_seed=7)
  b = load(tmp_path, "femnist", 4, seed=1, split_seed=7)
  np.testing.assert_array_equal(a.test["x"], b.test["x"])
  assert as_set(a.train.x) == as_set(b.train.x)
  assert a.train.num_clients == 4 and a.info.num_test == 4 * 3
  # Each chosen writer's training rows come with its own test rows.
  _, test = nf.split_users(users, 0.5)
  chosen = [u for u, (x, _) in nf.split_users(users, 0.5)[0].items()
            if as_set(np.asarray(x, np.float32).reshape(-1, 28, 28, 1)) <=
            as_set(a.train.x)]
  assert len(chosen) == 4
  want = [x for u in chosen for x in test[u][0]]
  assert as_set(a.test["x"]) == as_set(
      np.asarray(want, np.float32).reshape(-1, 28, 28, 1))
  other = load(tmp_path, "femnist", 4, split_seed=8)
  assert as_set(other.train.x) != as_set(a.train.x)


def test_user_split_tests_on_held_out_users(tmp_path):
  # LEAF's '-t user': test users train nowhere; all of them test.
  users = nf.femnist_users(6, 3, seed=4)
  ids = list(users)
  nf.write_leaf(tmp_path, "femnist", "train", {u: users[u] for u in ids[:4]})
  nf.write_leaf(tmp_path, "femnist", "test", {u: users[u] for u in ids[4:]})
  fed = load(tmp_path, "femnist", 2, split_seed=0)
  assert fed.train.num_clients == 2 and fed.info.num_test == 6


def test_max_examples_per_client_caps_train_and_test(tmp_path):
  nf.write_leaf_dataset(tmp_path, "femnist", nf.femnist_users(3, 20, seed=5))
  fed = load(tmp_path, "femnist", 3, max_examples_per_client=5)
  assert (np.asarray(fed.train.counts) == 5).all()
  assert fed.info.num_test == 3 * 4  # 4 held out each, under the cap.
  fed = load(tmp_path, "femnist", 3, max_examples_per_client=2)
  assert fed.info.num_test == 6 and fed.info.num_train == 6


def test_shakespeare_leaf_sequences_and_non_ascii(tmp_path):
  text = "Wherefore art thou, Romeo? D\u00e9j\u00e0 vu \u2019tis " * 5
  xs, ys = nf.windows(text)
  users = {"ROMEO_AND_JULIET_JULIET": (xs[:30], ys[:30]),
           "HAMLET_HAMLET": nf.shakespeare_users(1, 12, seed=0)[
               "THE_PLAY_ROLE0"]}
  nf.write_leaf_dataset(tmp_path, "shakespeare", users)
  fed = load(tmp_path, "shakespeare", 2)
  info = fed.info
  assert (info.task, info.num_classes, info.input_shape, info.input_dtype
          ) == ("sequence", natural.VOCAB_SIZE, (80,), "int32")
  x, y = client_rows(fed, 0), client_rows(fed, 0, "y")
  mask = client_rows(fed, 0, "mask")
  # Every input is LEAF's ids of the window, non-ASCII characters OOV.
  want = {natural.encode(s).tobytes(): s for s in xs[:24]}
  for row, target in zip(x, y):
    s = want[row.tobytes()]
    np.testing.assert_array_equal(
        row, [LEAF_LETTERS.find(c) if c in LEAF_LETTERS else natural.OOV
              for c in s])
    # Targets: the next character at every position, LEAF's label last.
    np.testing.assert_array_equal(target[:-1], row[1:])
    assert target[-1] == natural.encode(ys[xs.index(s)])[0]
  assert (mask == 1).all() and (row == natural.OOV).any()
  # Every non-ASCII character of every window (inputs and labels, train
  # and test) is counted: 'é', 'à' and '’' of each 40-character line.
  assert info.oov_characters == sum(
      c not in LEAF_LETTERS for s in xs[:30] + ys[:30] for c in s) == 181
  assert fed.test["x"].dtype == np.int32 and fed.test["mask"].shape == (
      info.num_test, 80)


def test_shakespeare_short_strings_are_padded_and_masked(tmp_path):
  users = {"A": (["To be", "x" * 80], ["!", "y"]), "B": (["ab"], ["c"])}
  nf.write_leaf(tmp_path, "shakespeare", "train", users)
  nf.write_leaf(tmp_path, "shakespeare", "test", {"A": (["or"], [" "])})
  fed = load(tmp_path, "shakespeare", 2)
  t = fed.test
  np.testing.assert_array_equal(t["x"][0, :3], [natural.encode("o")[0],
                                                natural.encode("r")[0],
                                                natural.PAD])
  np.testing.assert_array_equal(t["y"][0, :2], natural.encode("r "))
  np.testing.assert_array_equal(t["mask"][0, :3], [1, 1, 0])
  assert t["mask"][0].sum() == 2


def _truncate(path, keep=0.6):
  data = Path(path).read_bytes()
  Path(path).write_bytes(data[:int(len(data) * keep)])


@pytest.mark.parametrize("damage, match", [
    (lambda p: _truncate(p), "not valid JSON, corrupt or truncated"),
    (lambda p: Path(p).write_bytes(b"\xff\xfe garbage"), "not valid JSON"),
    (lambda p: Path(p).write_text("[1, 2]"), "an object with 'users'"),
    (lambda p: Path(p).write_text(json.dumps(
        {"users": ["u"], "num_samples": [1],
         "user_data": {"u": {"x": [[0.5] * 783], "y": [3]}}})),
     "user 'u': each x must be 784 numbers"),
    (lambda p: Path(p).write_text(json.dumps(
        {"users": ["u"], "num_samples": [1],
         "user_data": {"u": {"x": [[0.5] * 784], "y": [62]}}})),
     r"labels must be integers in \[0, 62\)"),
    (lambda p: Path(p).write_text(json.dumps(
        {"users": ["u"], "num_samples": [1], "user_data": {}})),
     "user 'u' has no 'x' and 'y'"),
])
def test_damaged_json_names_the_file(tmp_path, damage, match):
  paths, _ = nf.write_leaf_dataset(tmp_path, "femnist",
                                   nf.femnist_users(2, 3, seed=0))
  damage(paths[0])
  with pytest.raises(D.DatasetFormatError, match=match) as e:
    load(tmp_path, "femnist", 2)
  assert str(e.value).startswith(paths[0])


def test_duplicate_user_and_num_samples_mismatch(tmp_path):
  users = nf.femnist_users(2, 4, seed=0)
  paths = nf.write_leaf(tmp_path, "femnist", "train", users, files=2)
  nf.write_leaf(tmp_path, "femnist", "test", users)
  # LEAF's own Shakespeare test files declare more samples than they hold:
  # counted, not refused.
  obj = json.loads(Path(paths[0]).read_text())
  obj["num_samples"] = [n + 79 for n in obj["num_samples"]]
  Path(paths[0]).write_text(json.dumps(obj))
  assert load(tmp_path, "femnist", 2).info.num_samples_mismatch == 1
  obj["users"].append(list(users)[1])
  obj["user_data"][list(users)[1]] = obj["user_data"][list(users)[0]]
  Path(paths[0]).write_text(json.dumps(obj))
  with pytest.raises(D.DatasetFormatError, match="is also in"):
    load(tmp_path, "femnist", 2)


def test_missing_files_say_how_to_produce_them(tmp_path):
  with pytest.raises(D.DatasetNotFoundError) as e:
    load(tmp_path, "femnist", 2, source="leaf")
  msg = str(e.value)
  assert str(tmp_path / "femnist" / "train") in msg
  assert "github.com/TalwalkarLab/leaf" in msg and "./preprocess.sh -s niid "\
      "--sf 1.0 -k 0 -t sample" in msg and "fed_emnist.tar.bz2" in msg
  assert D.missing_files("shakespeare", tmp_path, "leaf") == [
      tmp_path / "shakespeare" / "train", tmp_path / "shakespeare" / "test"]
  assert D.missing_files("femnist", tmp_path) == [
      tmp_path / "femnist" / "fed_emnist_train.h5",
      tmp_path / "femnist" / "fed_emnist_test.h5"]


def test_snippets_to_sequences_is_fedjax_scheme():
  # fedjax/datasets/shakespeare.py's example, sequence_length=3:
  # [b'ABCD', b'E'] -> inputs [[BOS, A, B], [C, D, EOS], [BOS, E, PAD]],
  # outputs [[A, B, C], [D, EOS, BOS], [E, EOS, PAD]].
  a, b, c, d, e = natural.encode("ABCDE")
  bos, eos, pad = natural.BOS, natural.EOS, natural.PAD
  out = natural.snippets_to_sequences([b"ABCD", b"E"], seq_len=3)
  np.testing.assert_array_equal(out["x"], [[bos, a, b], [c, d, eos],
                                           [bos, e, pad]])
  np.testing.assert_array_equal(out["y"], [[a, b, c], [d, eos, bos],
                                           [e, eos, pad]])
  np.testing.assert_array_equal(out["mask"], [[1, 1, 1], [1, 1, 1],
                                              [1, 1, 0]])


def _tff_femnist(root, clients):
  for split in ("train", "test"):
    nf.write_tff(str(natural.tff_path(root, "femnist", split)), clients,
                 lambda v: {"pixels": v[0], "label": v[1]})


def test_tff_femnist_and_shakespeare(tmp_path):
  pytest.importorskip("h5py")
  rng = np.random.default_rng(0)
  clients = {f"f{i:04d}_00": (rng.random((n, 28, 28), dtype=np.float32),
                              rng.integers(0, 62, n).astype(np.int32))
             for i, n in enumerate([3, 1, 4])}
  _tff_femnist(tmp_path, clients)
  fed = load(tmp_path, "femnist", 3)
  assert fed.info.source.startswith("tff: ")
  for i, (px, lab) in enumerate(clients.values()):  # sorted ids, as TFF.
    assert as_set(client_rows(fed, i)) == as_set(px[..., None])
    assert sorted(client_rows(fed, i, "y").tolist()) == sorted(lab.tolist())
  assert fed.info.num_test == 8
  snippets = {"ROLE_A": [b"To be, or not to be", b"Ay"],
              "ROLE_B": ["caf\u00e9 noir".encode()]}
  for split in ("train", "test"):
    nf.write_tff(str(natural.tff_path(tmp_path, "shakespeare", split)),
                 snippets, lambda v: {"snippets": np.array(v, dtype=object)})
  fed = load(tmp_path, "shakespeare", 2)
  want = natural.snippets_to_sequences(snippets["ROLE_A"])
  np.testing.assert_array_equal(client_rows(fed, 0), want["x"])
  np.testing.assert_array_equal(client_rows(fed, 0, "mask"), want["mask"])
  assert fed.info.oov_characters == 2  # the é, train and test.


def test_tff_file_that_is_not_hdf5_names_the_file(tmp_path):
  pytest.importorskip("h5py")
  for split in ("train", "test"):
    path = natural.tff_path(tmp_path, "femnist", split)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"not an hdf5 file")
  with pytest.raises(D.DatasetFormatError, match="fed_emnist_train.h5: not "
                     "a readable HDF5 file"):
    load(tmp_path, "femnist", 1)


def test_tff_archive_download_checked_and_extracted(tmp_path, monkeypatch):
  pytest.importorskip("h5py")
  src = tmp_path / "src"
  rng = np.random.default_rng(1)
  _tff_femnist(src, {"f0000_00": (rng.random((2, 28, 28), dtype=np.float32),
                                  np.array([1, 2], np.int32))})
  buf = io.BytesIO()
  with tarfile.open(fileobj=buf, mode="w:bz2") as tar:
    for split in ("train", "test"):
      tar.add(natural.tff_path(src, "femnist", split),
              arcname=f"fed_emnist_{split}.h5")
  blob = buf.getvalue()
  rel, url, _, _ = D.REMOTE_FILES["femnist"][0]
  monkeypatch.setattr(D.urllib.request, "urlopen",
                      lambda u, timeout: io.BytesIO(blob))
  dest = tmp_path / "data"
  monkeypatch.setitem(D.REMOTE_FILES, "femnist", [(rel, url, None, "0" * 64)])
  with pytest.raises(D.DatasetFormatError, match="SHA-256"):
    D.download("femnist", dest, progress=False)
  assert not (dest / rel).exists()  # never left where a loader reads it.
  monkeypatch.setitem(D.REMOTE_FILES, "femnist", [
      (rel, url, None, hashlib.sha256(blob).hexdigest())])
  D.download("femnist", dest, progress=False)
  assert D.missing_files("femnist", dest) == []
  assert load(dest, "femnist", 1).info.num_train == 2


def test_tff_digests_are_tffs():
  # As tensorflow_federated's loaders checked them (emnist.py at 2c3c896c,
  # shakespeare.py at 0106781f).
  assert D.REMOTE_FILES["femnist"][0][1:] == (
      "https://storage.googleapis.com/tff-datasets-public/fed_emnist.tar.bz2",
      None, "fe1ed5a502cea3a952eb105920bff8cffb32836b5173cb18a57a32c3606f3ea0")
  assert D.REMOTE_FILES["shakespeare"][0][1:] == (
      "https://storage.googleapis.com/tff-datasets-public/shakespeare.tar.bz2",
      None, "0285be9906cb5f268092eee4edeeacfc2af4574f2941f7cc2f08a321d7f5c707")


def _exit_line(capsys, call):
  with pytest.raises(SystemExit) as e:
    call()
  assert e.value.code == 2
  (line,) = capsys.readouterr().err.splitlines()
  return line


def test_ensure_data_says_what_to_do(tmp_path, monkeypatch, capsys):
  from launch import flags as flags_lib  # pylint: disable=import-outside-toplevel
  config = flags_lib.resolve_args(["--dataset=shakespeare",
                                   "--model=char_lstm",
                                   f"--data_dir={tmp_path}"]).config
  leaf_cmd = "cd leaf/data/shakespeare && ./preprocess.sh -s niid --sf 1.0"
  # Without h5py: LEAF's files, or h5py for TFF's.
  def no_h5py():
    raise ImportError("no h5py")
  monkeypatch.setattr(natural, "require_h5py", no_h5py)
  line = _exit_line(capsys, lambda: flags_lib.ensure_data(config, "auto"))
  assert "error: --dataset=shakespeare: no LEAF JSON" in line
  assert leaf_cmd in line and "pip install h5py" in line
  monkeypatch.undo()
  # Offline with h5py: the download fails; LEAF's way is named too.
  monkeypatch.setattr(D.urllib.request, "urlopen", lambda *a, **k: (
      _ for _ in ()).throw(OSError("network unreachable")))
  line = _exit_line(capsys, lambda: flags_lib.ensure_data(config, "auto"))
  assert "could not be downloaded (network unreachable)" in line
  assert leaf_cmd in line and "shakespeare.tar.bz2" in line
  line = _exit_line(capsys, lambda: flags_lib.ensure_data(config, "never"))
  assert "not found and --download=never" in line and leaf_cmd in line
  # A LEAF train folder without its test folder names the test folder.
  nf.write_leaf(tmp_path, "shakespeare", "train",
                nf.shakespeare_users(1, 3))
  line = _exit_line(capsys, lambda: flags_lib.ensure_data(config, "auto"))
  assert f"no LEAF JSON files in {tmp_path / 'shakespeare' / 'test'}" in line
