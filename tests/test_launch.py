"""End-to-end tests of ``python -m launch.main`` as a subprocess.

Each subprocess pays JAX start-up and compilation (~5-10 s), so the runs are
tiny (generated 8x8 images, an MLP, 16 clients) and few.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import cli

REPO = Path(__file__).resolve().parents[1]
SMOKE = str(REPO / "experiments" / "smoke.flags")
LONG = ["--rounds=60", "--eval_every=5", "--checkpoint_every=10"]
# The killed run SIGKILLs itself at this round: after the checkpoint of
# round 20 is on disk and five more steps and a metric row past it.
KILL_AT = 25
_KILLER = f"""
import os, signal
from ftte_jax import checkpointing
_maybe_save = checkpointing.Checkpointer.maybe_save
def maybe_save(self, state, history):
  saved = _maybe_save(self, state, history)
  if int(state.version) == {KILL_AT}:
    self.manager.wait_until_finished()
    os.kill(os.getpid(), signal.SIGKILL)
  return saved
checkpointing.Checkpointer.maybe_save = maybe_save
"""


def launch(*args, **kw):
  """A launch.main subprocess of its own (another environment, a kill)."""
  return subprocess.Popen(
      [sys.executable, "-m", "launch.main", *args], cwd=REPO,
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def run(*args, timeout=300):
  """``(exit status, stdout, stderr)`` of a launch.main run."""
  return cli.run(args, timeout)


def summary(workdir):
  return json.loads((Path(workdir) / "summary.json").read_text())


def metrics(workdir):
  lines = (Path(workdir) / "metrics.jsonl").read_text().splitlines()
  return [json.loads(line) for line in lines]


def finished_steps(workdir):
  ckpt = Path(workdir) / "checkpoints"
  if not ckpt.is_dir():
    return []
  return sorted(int(p.name) for p in ckpt.iterdir() if p.name.isdigit())


@pytest.mark.slow
def test_kill_and_resume_is_exact(tmp_path):
  """A run SIGKILLed mid-run resumes from its last checkpoint and ends as
  the uninterrupted run does, with the same metric rows. The kill comes
  from inside the process at a fixed round (a sitecustomize wraps
  Checkpointer.maybe_save), so the test needs no long run to land it."""
  ref_dir, dir_ = tmp_path / "reference", tmp_path / "killed"
  args = [f"--flagfile={SMOKE}", *LONG]
  # The uninterrupted reference runs alongside the run that gets killed.
  ref = launch(*args, f"--workdir={ref_dir}")
  site = tmp_path / "site"
  site.mkdir()
  (site / "sitecustomize.py").write_text(_KILLER)
  victim = launch(*args, f"--workdir={dir_}", env=dict(
      os.environ, PYTHONPATH=os.pathsep.join(
          [str(site), str(REPO), os.environ.get("PYTHONPATH", "")])))
  _, victim_err = victim.communicate(timeout=300)
  assert victim.returncode == -signal.SIGKILL, victim_err
  assert not (dir_ / "summary.json").exists()
  # Rows were logged past the checkpoint the run resumes from.
  assert metrics(dir_)[-1]["round"] == KILL_AT
  killed_at = finished_steps(dir_)[-1]
  assert killed_at == 20

  code, out, err = run(*args, f"--workdir={dir_}")
  assert code == 0, err
  assert f"resuming from round {killed_at}" in err
  ref_out, ref_err = ref.communicate(timeout=300)
  assert ref.returncode == 0, ref_err

  got, want = summary(dir_), summary(ref_dir)
  assert got["resumed_from_round"] == killed_at
  assert got["params_sha256"] == want["params_sha256"]
  assert got["params_sha256"] in out
  for key in ("final_accuracy", "client_updates", "virtual_time_s",
              "bytes_up", "mean_staleness", "time_to_target_s"):
    assert got[key] == want[key], key
  # No duplicated rows: the metric log equals the uninterrupted one.
  strip = lambda rows: [{k: v for k, v in r.items()
                         if k not in ("wall_s", "client_updates_per_s")}
                        for r in rows]
  assert strip(metrics(dir_)) == strip(metrics(ref_dir))
  rounds = [r["round"] for r in metrics(dir_)]
  # Every eval_every rows, plus the exact step where the target was reached.
  assert [r for r in rounds if r % 5 == 0] == list(range(0, 61, 5))
  assert [r["round"] for r in metrics(dir_) if r.get("crossing")] == [
      got["rounds_to_target"]]

  # A finished run re-run is not recomputed.
  code, out, err = run(*args, f"--workdir={dir_}")
  assert code == 0 and "already complete" in err
  assert want["params_sha256"] in out


@pytest.mark.slow
def test_outputs_mismatch_and_overwrite(tmp_path):
  code, out, err = run(f"--flagfile={SMOKE}", f"--workdir={tmp_path}",
                       "--metrics=tensorboard")
  assert code == 0, err
  config = json.loads((tmp_path / "config.json").read_text())
  assert config["experiment"]["engine"]["algorithm"] == "ftte"
  assert config["experiment"]["engine"]["concurrency"] == 8
  # Unset engine flags come from the preset.
  assert config["experiment"]["engine"]["mask"] == "search"
  assert config["flags_given"]["buffer_size"] == 4
  s = summary(tmp_path)
  for key in ("algorithm", "final_accuracy", "target_accuracy",
              "time_to_target_s", "time_to_target_sustained_s",
              "client_updates", "client_updates_per_s",
              "wall_s", "compile_s", "peak_device_memory_bytes",
              "upload_bytes_per_update", "download_bytes_per_update",
              "params_sha256", "num_devices", "num_processes"):
    assert key in s, key
  # --cpu_devices=auto: a CPU device per core; the mesh takes all of them,
  # at most K = 4 (padding K to a multiple of the devices).
  from launch import flags as flags_lib
  cpus = flags_lib.cpu_devices_count("auto") or 1
  assert s["num_devices"] == min(cpus, 4)
  assert s["client_padding"]["padded_size"] == -(-4 // min(cpus, 4)) * min(
      cpus, 4)
  assert s["num_processes"] == 1
  assert config["launch"]["mesh_devices"] == s["num_devices"]
  phases = s["startup_s"]
  assert set(phases) == {"imports_s", "data_s", "model_s", "fleet_s",
                         "plan_s", "engine_s", "compile_s"}
  assert all(v >= 0 for v in phases.values())
  rows = metrics(tmp_path)
  assert [r["round"] for r in rows if r["round"] % 5 == 0] == [0, 5, 10, 15,
                                                                20]
  for key in ("virtual_time_s", "test_accuracy", "test_loss",
              "updates_applied", "updates_dropped", "mean_staleness",
              "bytes_up", "bytes_down", "wall_s"):
    assert key in rows[-1], key
  assert "accuracy" in err and "round    20" in err  # progress lines
  _check_tensorboard_events(tmp_path / "tensorboard", rows)
  ftte_run = tmp_path.parent / f"{tmp_path.name}-ftte"
  shutil.copytree(tmp_path, ftte_run)

  code, out, err = run(f"--flagfile={SMOKE}", f"--workdir={tmp_path}",
                       "--buffer_size=2")
  assert code == 2
  line = err.strip().splitlines()[-1]
  assert "--workdir" in line and "different configuration" in line
  assert "buffer_size" in line and "--overwrite" in line
  assert "Traceback" not in err

  code, out, err = run(f"--flagfile={SMOKE}", f"--workdir={tmp_path}",
                       "--buffer_size=2", "--algorithm=fedbuff",
                       "--overwrite")
  assert code == 0, err
  s = summary(tmp_path)
  assert s["algorithm"] == "fedbuff" and s["resumed_from_round"] is None
  assert json.loads((tmp_path / "config.json").read_text())[
      "experiment"]["engine"]["buffer_size"] == 2
  assert not (tmp_path / "tensorboard").exists()  # --overwrite cleared it.

  # launch.plot on the two smoke workdirs.
  image = tmp_path.parent / "accuracy.png"
  p = subprocess.run([sys.executable, "-m", "launch.plot", str(ftte_run),
                      str(tmp_path), f"--out={image}"], cwd=REPO,
                     capture_output=True, text=True, timeout=120)
  assert p.returncode == 0, p.stderr
  assert p.stdout.strip() == str(image)
  assert image.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert image.stat().st_size > 10_000  # three panels with two curves.


def _check_tensorboard_events(logdir, rows):
  """The run's TensorBoard events, read back as TensorBoard reads them,
  hold metrics.jsonl's rows: step = round, one scalar per number."""
  from tensorboard.backend.event_processing import event_accumulator
  acc = event_accumulator.EventAccumulator(str(logdir))
  acc.Reload()
  tags = set(acc.Tags()["scalars"])
  assert {"test_accuracy", "test_loss", "virtual_time_s", "bytes_up",
          "updates_applied", "client_updates_per_s"} <= tags
  for tag in ("test_accuracy", "virtual_time_s", "bytes_up"):
    events = acc.Scalars(tag)
    assert [e.step for e in events] == [r["round"] for r in rows]
    np.testing.assert_array_equal([e.value for e in events],
                                  np.float32([r[tag] for r in rows]))


@pytest.mark.slow
@pytest.mark.parametrize("args, flag", [
    (["--algorithm=sgd"], "--algorithm"),
    (["--num_clients=-5"], "--num_clients"),
    (["--data_dir=/no/such/dir"], "--data_dir"),
    (["--flagfile=/no/such.flags"], "--flagfile"),
    (["--algorithm=fedasync", "--buffer_size=4"], "buffer_size"),
    (["--memory_tier_fractions=2,1"], "memory_tier_fractions"),
    (["--client_lr=nan"], "--client_lr must be a positive finite number"),
    (["--dropout=1.5"], "--dropout must be a number in [0, 1]"),
    (["--compilation_cache=/dev/null/cache"], "--compilation_cache"),
    (["--compilation_cache=false"], "--compilation_cache='false': not a"),
    (["--cpu_devices=0"], "--cpu_devices='0': valid: 'auto' or an integer"),
    (["--cpu_devices=two"], "--cpu_devices='two'"),
    (["--metrics=csv"], "--metrics=csv: unknown writer 'csv'"),
    # Values valid in Python that float32/int32 storage would turn into inf
    # or wrap, refused as given or as derived.
    ([f"--flagfile={SMOKE}", "--rounds=100000000000000000000"],
     "--rounds must fit int32"),
    ([f"--flagfile={SMOKE}", "--memory_tier_fractions=1e40"],
     "--memory_tier_fractions must fit float32"),
    ([f"--flagfile={SMOKE}", "--memory_tier_fractions=1e38,2e38"],
     "memory_tier_fractions times full training memory"),
    # The model is built abstractly on the data before anything is written.
    ([f"--flagfile={SMOKE}", "--dataset=synthetic", "--partition=natural",
      "--model=lenet5"], "--model: 'lenet5'"),
    ([f"--flagfile={SMOKE}", '--model_options={"hidden": [0]}'],
     "--model: 'mlp' with model_options"),
    ([f"--flagfile={SMOKE}", "--dataset=npz"], "--npz_path"),
    # A natural dataset takes no partitioner (smoke.flags gives iid).
    ([f"--flagfile={SMOKE}", "--dataset=femnist"],
     "--partition: femnist's clients are given by the data"),
    (["--proxy_examples=some"], "--proxy_examples must be an integer >= 0 "
     "or 'auto'"),
    ([f"--flagfile={SMOKE}", "--dataset=npz", "--npz_path=/no/such.npz"],
     "--npz_path: no such file"),
])
def test_bad_input_exits_2_in_one_line(tmp_path, args, flag):
  code, out, err = run(*args, f"--workdir={tmp_path / 'w'}", timeout=120)
  assert code == 2
  assert "Traceback" not in err
  lines = [l for l in err.splitlines() if "error:" in l]
  assert len(lines) == 1 and flag in lines[0], err
  assert not (tmp_path / "w").exists()  # nothing written on bad input


def _help_blocks(text):
  """Flag name -> its help, whitespace normalized, from absl's --helpfull."""
  blocks, name = {}, None
  for line in text.splitlines():
    m = re.match(r"^  --(?:\[no\])?(\w+): ?(.*)", line)
    if m:
      name = m.group(1)
      blocks[name] = m.group(2)
    elif name and line.startswith("    "):
      blocks[name] += " " + line.strip()
    else:
      name = None
  return {k: " ".join(v.split()) for k, v in blocks.items()}


@pytest.mark.slow
def test_helpfull_lists_every_option_with_valid_values_and_default():
  from ftte_jax.core import options
  from launch import flags as flags_lib
  code, out, err = run("--helpfull", timeout=120)
  blocks = _help_blocks(out + err)
  for spec in flags_lib.SPECS:
    text = blocks[spec.flag]
    assert f"(valid: {options.describe(spec.option)}" in text, text
    if spec.option.choices is not None:
      assert "<" + "|".join(spec.option.choices) + ">" in text
    if spec.flag == "algorithm":
      assert "(default: 'ftte')" in text
    elif spec.section == "engine":
      assert "default: the --algorithm preset's" in text, text
    else:
      assert "default: " in text, text
  assert "default: 0.2,1.1,2)" in blocks["memory_tier_fractions"]
  for name in ("femnist", "shakespeare", "synthetic", "cifar10"):
    assert name in blocks["dataset"]
  assert "or 'auto'; default: auto)" in blocks["proxy_examples"]
  assert "(valid: an integer >= 1; default: 100)" in blocks["num_clients"]
  for name in ("workdir", "checkpoint_every", "keep_checkpoints", "overwrite"):
    assert name in blocks


@pytest.mark.slow
def test_damaged_latest_checkpoint_resumes_from_an_older_one(tmp_path):
  # The newest checkpoint's bytes are altered after the run: the rerun
  # warns, resumes from the previous step and ends with the same model.
  wd = tmp_path / "run"
  args = [f"--flagfile={SMOKE}", "--rounds=6", "--eval_every=2",
          "--checkpoint_every=2", f"--workdir={wd}"]
  rc, _, err = run(*args)
  assert rc == 0, err
  want = summary(wd)["params_sha256"]
  files = [p for p in (wd / "checkpoints" / "6" / "state").rglob("*")
           if p.is_file()]
  big = max(files, key=lambda p: p.stat().st_size)
  data = bytearray(big.read_bytes())
  data[len(data) // 2] ^= 0xFF
  big.write_bytes(bytes(data))
  rc, _, err = run(*args)
  assert rc == 0, err
  assert "damaged checkpoint skipped" in err and "step 6" in err
  assert summary(wd)["params_sha256"] == want
  assert [r["round"] for r in metrics(wd)] == [0, 2, 4, 6]


@pytest.mark.slow
def test_divergence_stops_with_exit_3_after_saving(tmp_path):
  wd = tmp_path / "run"
  rc, _, err = run(f"--flagfile={SMOKE}", "--algorithm=fedbuff",
                   "--server_lr=1e30", "--rounds=30", f"--workdir={wd}")
  assert rc == 3, err
  assert "diverged" in err.splitlines()[-1]
  s = summary(wd)
  assert s["stopped_by"] == "divergence"
  assert s["rounds"] < 30
  assert (wd / "checkpoints" / str(s["rounds"])).is_dir()


@pytest.mark.slow
def test_unwritable_workdir_and_float32_trace_are_refused_first(tmp_path):
  # A workdir under a file fails before the build, naming the flag.
  blocker = tmp_path / "file"
  blocker.write_text("x")
  code, _, err = run(f"--flagfile={SMOKE}", f"--workdir={blocker / 'w'}",
                     timeout=120)
  assert code == 2 and "--workdir" in err and "is a file" in err
  # A trace speed that underflows float32 is named by file and line.
  trace = tmp_path / "trace.csv"
  rows = ["speed_flops,bw_up,bw_down,memory_bytes,dropout"]
  rows += ["1e9,1e6,1e6,1e12,0"] * 15 + ["1e-300,1e6,1e6,1e12,0"]
  trace.write_text("\n".join(rows) + "\n")
  wd = tmp_path / "w"
  code, _, err = run(f"--flagfile={SMOKE}", f"--trace_path={trace}",
                     f"--workdir={wd}", timeout=120)
  assert code == 2 and f"{trace}: line 17: speed_flops" in err, err
  assert not wd.exists()


@pytest.mark.slow
def test_npz_dataset_from_the_command_line(tmp_path):
  rng = np.random.default_rng(0)
  path = tmp_path / "d.npz"
  np.savez(path, x_train=rng.random((96, 6, 6)).astype(np.float32),
           y_train=rng.integers(0, 3, 96), x_test=rng.random(
               (24, 6, 6)).astype(np.float32), y_test=rng.integers(0, 3, 24))
  wd = tmp_path / "w"
  code, _, err = run(f"--flagfile={SMOKE}", "--dataset=npz",
                     f"--npz_path={path}", "--num_clients=8",
                     "--concurrency=4", "--buffer_size=2", "--rounds=2",
                     "--eval_every=1", f"--workdir={wd}", timeout=300)
  assert code == 0, err
  assert summary(wd)["rounds"] == 2


def _fresh_env(tmp_path, offline=True):
  """No $FTTE_DATA_DIR, an empty user cache, and (offline) no network:
  sitecustomize makes every urlopen raise, as on an offline machine."""
  import os
  env = {k: v for k, v in os.environ.items() if k != "FTTE_DATA_DIR"}
  env.update(HOME=str(tmp_path / "home"), XDG_CACHE_HOME=str(tmp_path / "c"))
  if offline:
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(
        "import urllib.request\n"
        "def _offline(*a, **k):\n"
        "  raise OSError('network unreachable')\n"
        "urllib.request.urlopen = _offline\n")
    env["PYTHONPATH"] = os.pathsep.join(
        [str(site), str(REPO), env.get("PYTHONPATH", "")])
  return env


@pytest.mark.slow
@pytest.mark.parametrize("args, says", [
    (["--download=never"], "not found and --download=never"),
    ([], "could not be downloaded (network unreachable)"),
])
def test_missing_dataset_offline_exits_2_in_one_line(tmp_path, args, says):
  wd = tmp_path / "w"
  p = launch(*args, f"--workdir={wd}", env=_fresh_env(tmp_path))
  _, err = p.communicate(timeout=120)
  assert p.returncode == 2 and "Traceback" not in err
  (line,) = err.splitlines()
  cache = tmp_path / "c" / "ftte_jax" / "mnist"
  assert line.startswith("main.py: error: --dataset=mnist: ") and says in line
  assert f"https://storage.googleapis.com/cvdf-datasets/mnist/ into {cache}" \
      in line and "--dataset=synthetic and --dataset=tiny" in line
  assert not wd.exists() and not cache.exists()


@pytest.mark.slow
def test_natural_dataset_missing_or_damaged_exits_2_naming_files(tmp_path):
  sys.path.insert(0, str(Path(__file__).parent))
  import natural_files as nf  # pylint: disable=import-outside-toplevel
  data = tmp_path / "data"
  data.mkdir()
  env = _fresh_env(tmp_path)
  base = ["--dataset=femnist", "--model=femnist_cnn", f"--data_dir={data}",
          "--num_clients=2", "--concurrency=2", "--buffer_size=2",
          f"--workdir={tmp_path / 'w'}"]
  p = launch(*base, "--download=never", env=env)
  _, err = p.communicate(timeout=120)
  assert p.returncode == 2 and "Traceback" not in err
  (line,) = err.splitlines()
  assert line.startswith("main.py: error: --dataset=femnist: ")
  assert str(data / "femnist" / "train") in line
  assert "./preprocess.sh -s niid --sf 1.0 -k 0 -t sample" in line
  assert "fed_emnist.tar.bz2" in line
  paths, _ = nf.write_leaf_dataset(data, "femnist",
                                   nf.femnist_users(2, 4, seed=0))
  raw = Path(paths[0]).read_bytes()
  Path(paths[0]).write_bytes(raw[:len(raw) // 2])  # truncated.
  p = launch(*base, env=env)
  _, err = p.communicate(timeout=300)
  assert p.returncode == 2 and "Traceback" not in err, err
  (line,) = [l for l in err.splitlines() if "error:" in l]
  assert f"{paths[0]}: not valid JSON, corrupt or truncated" in line
  assert not (tmp_path / "w").exists()


def test_ensure_data_downloads_into_the_user_cache(tmp_path, monkeypatch,
                                                   capsys, mnist_available):
  # The real files served as if from the network, so the published
  # SHA-256 sums are checked for real.
  if not mnist_available:
    pytest.skip("MNIST absent from FTTE_DATA_DIR")
  import io
  from ftte_jax.data import datasets
  from launch import flags as flags_lib
  config = flags_lib.resolve_args([]).config  # the default: mnist.
  flags_lib.ensure_data(config, "never")  # present in $FTTE_DATA_DIR.
  src = datasets.default_data_dir() / "mnist"
  monkeypatch.delenv("FTTE_DATA_DIR")
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
  monkeypatch.setattr(datasets.urllib.request, "urlopen", lambda url, timeout:
                      io.BytesIO((src / url.rsplit("/", 1)[1]).read_bytes()))
  flags_lib.ensure_data(config, "auto")
  assert datasets.missing_files("mnist") == []
  assert datasets.load_mnist(split="test")[0].shape == (10000, 28, 28, 1)
  assert "mnist: t10k-images-idx3-ubyte.gz 1.6/1.6 MB 100%" in \
      capsys.readouterr().err


@pytest.mark.parametrize("setting,distributed,environ,cores,want", [
    ("auto", False, {}, 2, 2),
    ("auto", False, {}, 64, 8),  # MAX_AUTO_CPU_DEVICES: data per device.
    ("auto", False, {}, 1, 1),
    ("auto", True, {}, 4, None),  # each process keeps JAX's own.
    ("auto", False, {"XLA_FLAGS": "--xla_force_host_platform_device_count=4"},
     2, None),
    ("auto", False, {"JAX_NUM_CPU_DEVICES": "3"}, 2, None),
    ("3", False, {"JAX_NUM_CPU_DEVICES": "1"}, 2, 3),  # the flag wins.
    ("12", True, {}, 2, 12),
])
def test_cpu_devices_count(setting, distributed, environ, cores, want):
  from launch import flags as flags_lib
  assert flags_lib.cpu_devices_count(setting, distributed, environ,
                                     cores) == want


@pytest.mark.parametrize("setting", ["0", "-1", "1.5", "two", "", " 2"])
def test_cpu_devices_count_refuses_by_name(setting):
  from launch import flags as flags_lib
  with pytest.raises(ValueError, match="--cpu_devices"):
    flags_lib.cpu_devices_count(setting, cores=2)


@pytest.mark.slow
def test_cpu_devices_split_the_clients_and_agree_with_one(tmp_path):
  """--cpu_devices=2 puts the clients mesh on two CPU devices; the model
  ends within 1e-6 of a one-device run's (sums in another order), and a
  warm second run loads the mesh's programs from JAX's persistent
  cache."""
  cache = tmp_path / "cache"
  runs = {}
  for name, devices in (("one", 1), ("two", 2), ("two_warm", 2)):
    code, _, err = run(f"--flagfile={SMOKE}", "--rounds=6",
                       f"--cpu_devices={devices}",
                       f"--compilation_cache={cache}",
                       f"--workdir={tmp_path / name}")
    assert code == 0, err
    runs[name] = summary(tmp_path / name)
  assert runs["one"]["num_devices"] == 1 and runs["two"]["num_devices"] == 2
  assert set(runs["two"]["compilation_cache"].values()) == {"miss"}
  assert set(runs["two_warm"]["compilation_cache"].values()) == {"hit"}
  assert runs["two_warm"]["params_sha256"] == runs["two"]["params_sha256"]
  assert runs["two"]["final_accuracy"] == pytest.approx(
      runs["one"]["final_accuracy"], abs=1e-3)
  for a, b in zip(metrics(tmp_path / "one"), metrics(tmp_path / "two")):
    assert a["test_loss"] == pytest.approx(b["test_loss"], abs=1e-5)


@pytest.mark.slow
def test_resume_on_another_device_count_warns(tmp_path):
  """config.json records the clients mesh's devices; a resume on another
  count says it will not be bit for bit, and still finishes close."""
  wd = tmp_path / "run"
  args = [f"--flagfile={SMOKE}", "--rounds=6", "--eval_every=2",
          "--checkpoint_every=2", "--compilation_cache=off",
          f"--workdir={wd}"]
  code, _, err = run(*args, "--cpu_devices=1")
  assert code == 0, err
  config = json.loads((wd / "config.json").read_text())
  assert config["launch"]["mesh_devices"] == 1
  assert config["launch"]["cpu_devices"] == "1"
  want = summary(wd)
  shutil.rmtree(wd / "checkpoints" / "6")
  (wd / "summary.json").unlink()
  code, _, err = run(*args, "--cpu_devices=2")
  assert code == 0, err
  assert "resuming from round 4" in err
  assert "split its clients over 1 devices, this process over 2" in err
  got = summary(wd)
  assert got["num_devices"] == 2
  assert got["final_loss"] == pytest.approx(want["final_loss"], abs=1e-4)
  assert json.loads((wd / "config.json").read_text())["launch"][
      "mesh_devices"] == 2
