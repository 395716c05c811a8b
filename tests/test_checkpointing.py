"""Checkpoint round trips of a whole SimState are bit-identical."""

import dataclasses
import json
import os
import subprocess
import sys
import threading
import types

import jax
import numpy as np
import pytest

import helpers
from ftte_jax import checkpointing
from ftte_jax import experiment


@pytest.fixture(scope="module")
def exp():
  return experiment.build(helpers.tiny_config())


def test_round_trip_is_bit_identical_and_resumes_exactly(exp, tmp_path):
  state = exp.init_state()
  for _ in range(3):
    state, _ = exp.step_fn(exp.env, state)
  history = [{"round": 3, "test_accuracy": np.float32(0.5)}]
  ckpt = checkpointing.Checkpointer(tmp_path, "hash-a", every=3)
  assert ckpt.maybe_save(state, history)
  ckpt.close()

  ckpt = checkpointing.Checkpointer(tmp_path, "hash-a")
  assert ckpt.latest_step() == 3
  for target in (jax.eval_shape(exp.init_state), exp.init_state(),
                 lambda: jax.eval_shape(exp.init_state)):
    restored, rows = ckpt.restore_latest(target)
    helpers.assert_bit_identical(restored, state)
    assert rows == [{"round": 3, "test_accuracy": 0.5}]
  ckpt.close()
  # The restored state continues exactly as the original.
  a, _ = exp.step_fn(exp.env, jax.tree.map(np.copy, restored))
  b, _ = exp.step_fn(exp.env, state)
  helpers.assert_bit_identical(a, b)


def test_other_config_is_refused(exp, tmp_path):
  ckpt = checkpointing.Checkpointer(tmp_path, "hash-a")
  ckpt.save(exp.init_state(), [])
  ckpt.close()
  other = checkpointing.Checkpointer(tmp_path, "hash-b")
  with pytest.raises(checkpointing.ConfigMismatchError, match="hash-b"[:6]):
    other.restore_latest(jax.eval_shape(exp.init_state))
  other.close()


def test_every_and_max_to_keep(exp, tmp_path):
  ckpt = checkpointing.Checkpointer(tmp_path, "h", every=2, max_to_keep=2)
  state = exp.init_state()
  saved = []
  for _ in range(6):
    state, _ = exp.step_fn(exp.env, state)
    saved.append(ckpt.maybe_save(state, []))
  ckpt.close()
  assert saved == [False, True, False, True, False, True]
  assert ckpt.manager.all_steps() == [4, 6]
  assert checkpointing.Checkpointer(tmp_path, "h").restore_latest(
      jax.eval_shape(exp.init_state)) is not None


def test_empty_directory_restores_nothing(exp, tmp_path):
  ckpt = checkpointing.Checkpointer(tmp_path / "new", "h")
  assert ckpt.restore_latest(jax.eval_shape(exp.init_state)) is None

  def target():
    raise AssertionError("a target function is called only for a checkpoint")

  assert ckpt.restore_latest(target) is None
  # A fresh run makes nothing (orbax's manager, the directory) until it saves.
  assert ckpt._manager is None and not (tmp_path / "new").exists()
  ckpt.close()
  ckpt.save(exp.init_state(), [])
  ckpt.close()
  assert checkpointing.Checkpointer(tmp_path / "new", "h").restore_latest(
      jax.eval_shape(exp.init_state)) is not None


def _imports_orbax(code: str) -> bool:
  out = subprocess.run(
      [sys.executable, "-c", code + "\nprint('orbax.checkpoint' in "
       "sys.modules)"], capture_output=True, text=True, check=True,
      cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
      env={**os.environ, "JAX_PLATFORMS": "cpu"})
  return out.stdout.split()[-1] == "True"


@pytest.mark.slow
def test_orbax_is_imported_at_first_use_or_by_preload():
  # The launcher's imports leave orbax (about 0.4 s) for later.
  assert not _imports_orbax("import sys, launch.main, ftte_jax.experiment, "
                            "ftte_jax.checkpointing")
  assert _imports_orbax("import sys\nfrom ftte_jax import checkpointing\n"
                        "checkpointing.preload()\n"
                        "checkpointing._PRELOADING[0].join()")


def test_config_hash_and_atomic_json(exp, tmp_path):
  d = exp.config.to_dict()
  # config.json stores the dict through JSON; its hash must survive that.
  same = json.loads(json.dumps(checkpointing.to_jsonable(d)))
  assert checkpointing.config_hash(d) == checkpointing.config_hash(same)
  changed = dataclasses.replace(exp.config, seed=1).to_dict()
  assert checkpointing.config_hash(d) != checkpointing.config_hash(changed)
  path = tmp_path / "x.json"
  checkpointing.write_json(path, {"a": np.float32(1.5), "b": (1, 2)})
  assert json.loads(path.read_text()) == {"a": 1.5, "b": [1, 2]}
  assert [p.name for p in tmp_path.iterdir()] == ["x.json"]
  with pytest.raises(ValueError, match="checkpoint_every"):
    checkpointing.Checkpointer(tmp_path, "h", every=0)


def _three_steps(exp, tmp_path):
  """Checkpoints at versions 1, 2, 3; returns the states saved."""
  ckpt = checkpointing.Checkpointer(tmp_path, "h", every=1, max_to_keep=3)
  state, states = exp.init_state(), {}
  for _ in range(3):
    state, _ = exp.step_fn(exp.env, state)
    states[int(state.version)] = jax.device_get(state)
    ckpt.save(state, [{"round": int(state.version)}])
  ckpt.close()
  return states


def _flip_bytes(step_dir):
  """Flips bytes in the largest data file of a step's state (keeps its size)."""
  files = [p for p in (step_dir / "state").rglob("*") if p.is_file()]
  big = max(files, key=lambda p: p.stat().st_size)
  data = bytearray(big.read_bytes())
  for i in range(len(data) // 2, len(data) // 2 + 64):
    data[i] ^= 0xFF
  big.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", ["flip", "no_metadata", "no_state",
                                    "empty_meta"])
def test_damaged_latest_checkpoint_falls_back_to_an_intact_one(
    exp, tmp_path, damage, caplog):
  import shutil
  states = _three_steps(exp, tmp_path)
  step3 = tmp_path / "3"
  if damage == "flip":
    _flip_bytes(step3)
  elif damage == "no_metadata":
    for p in step3.rglob("_METADATA"):
      p.unlink()
  elif damage == "no_state":
    shutil.rmtree(step3 / "state")
  else:
    for p in (step3 / "meta").rglob("*"):
      if p.is_file():
        p.write_text("")
  ckpt = checkpointing.Checkpointer(tmp_path, "h", every=1)
  with caplog.at_level("WARNING"):
    state, rows = ckpt.restore_latest(jax.eval_shape(exp.init_state))
  ckpt.close()
  assert rows == [{"round": 2}]
  helpers.assert_bit_identical(state, states[2])
  assert len(ckpt.skipped) == 1 and ckpt.skipped[0].startswith("step 3")
  assert any("step 3" in r.getMessage() for r in caplog.records)


def test_no_intact_checkpoint_is_an_error_not_a_fresh_start(exp, tmp_path):
  _three_steps(exp, tmp_path)
  for step in (1, 2, 3):
    _flip_bytes(tmp_path / str(step))
  ckpt = checkpointing.Checkpointer(tmp_path, "h", every=1)
  with pytest.raises(checkpointing.CorruptCheckpointError,
                     match="no intact checkpoint.*overwrite"):
    ckpt.restore_latest(jax.eval_shape(exp.init_state))
  ckpt.close()


@pytest.mark.parametrize("blocker", ["permission", "aside_is_a_file"])
def test_damaged_step_that_cannot_be_moved_is_left_with_a_warning(
    exp, tmp_path, blocker, monkeypatch, caplog):
  states = _three_steps(exp, tmp_path)
  _flip_bytes(tmp_path / "3")
  if blocker == "permission":  # what a step owned by another user gives.
    def denied(src, dst):
      raise PermissionError(13, "Permission denied", src)
    monkeypatch.setattr(checkpointing.os, "replace", denied)
  else:
    (tmp_path.parent / f"{tmp_path.name}.damaged").write_text("x")
  ckpt = checkpointing.Checkpointer(tmp_path, "h", every=1)
  with caplog.at_level("WARNING"):
    state, rows = ckpt.restore_latest(jax.eval_shape(exp.init_state))
  assert rows == [{"round": 2}]
  helpers.assert_bit_identical(state, states[2])
  assert (tmp_path / "3").is_dir() and ckpt.in_the_way == {3}
  assert any("step 3 could not be moved" in r.getMessage() and
             "left in place" in r.getMessage() for r in caplog.records)
  # The run goes on; it does not save over the damaged step.
  state3, _ = exp.step_fn(exp.env, jax.tree.map(np.asarray, state))
  with caplog.at_level("WARNING"):
    assert not ckpt.maybe_save(state3, [])
  assert any("step 3 not saved" in r.getMessage() for r in caplog.records)
  ckpt.close()


class _StuckManager:
  """An orbax manager whose pending save never finishes (a hung disk)."""

  def __init__(self, error=None):
    self.error = error

  def wait_until_finished(self):
    if self.error:
      raise self.error
    threading.Event().wait(60)

  def check_for_errors(self):
    pass

  def close(self):
    pass


def test_a_pending_save_is_bounded_and_its_error_surfaced(tmp_path):
  import time
  ckpt = checkpointing.Checkpointer(tmp_path, "h", timeout_s=0.3)
  ckpt._manager = _StuckManager()
  t0 = time.perf_counter()
  with pytest.raises(checkpointing.CheckpointSaveError,
                     match=r"did not finish within 0.3 s"):
    ckpt.close()
  assert time.perf_counter() - t0 < 10
  ckpt = checkpointing.Checkpointer(tmp_path, "h")
  ckpt._manager = _StuckManager(NotADirectoryError(20, "Not a directory"))
  with pytest.raises(checkpointing.CheckpointSaveError,
                     match=r"saving checkpoints in .* failed \(.*Not a dir"):
    ckpt.close()


def test_orbax_leftovers_after_a_failed_read_are_silenced(tmp_path,
                                                          monkeypatch):
  # What tensorstore's late read completions raise once orbax's restore
  # has closed its event loop; the hook is installed by the first restore.
  seen = []
  monkeypatch.setattr(sys, "unraisablehook", seen.append)
  monkeypatch.setattr(checkpointing, "_QUIET_HOOKS", [])
  checkpointing._quiet_orbax_leftovers(str(tmp_path))

  def unraisable(e):
    return types.SimpleNamespace(exc_type=type(e), exc_value=e,
                                 exc_traceback=None, err_msg=None, object=None)

  sys.unraisablehook(unraisable(RuntimeError("Event loop is closed")))
  assert seen == []
  other = unraisable(RuntimeError("something else"))
  sys.unraisablehook(other)
  assert seen == [other]
  import logging
  records = []
  handler = logging.Handler()
  handler.emit = records.append
  asyncio_log = logging.getLogger("asyncio")
  asyncio_log.addHandler(handler)
  try:
    asyncio_log.error("Future exception was never retrieved\nfuture: "
                      f"<Future exception=ValueError('{tmp_path}/6/state')>")
    asyncio_log.error("Future exception was never retrieved\nfuture: "
                      "<Future exception=ValueError('elsewhere')>")
  finally:
    asyncio_log.removeHandler(handler)
  assert [r.getMessage().endswith("'elsewhere')>") for r in records] == [True]
