"""The program cache: a hit runs the same bits without tracing; keys move
with everything a program depends on; a bad entry is compiled again."""

import inspect
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import helpers
from ftte_jax import experiment
from ftte_jax import program_cache
from ftte_jax.core import engine
from ftte_jax.experiment import run

REPO = Path(__file__).resolve().parents[1]


def _run(exp, state, steps=3):
  history = []
  for _ in range(steps):
    state, _ = exp.programs.get("step", exp.step_fn)(exp.env, state)
    history.append(exp.evaluate(state.params))
  return state, history


@pytest.mark.parametrize("steps_per_call", [1, 0])
def test_a_hit_skips_tracing_and_gives_the_same_bits(tmp_path, monkeypatch,
                                                     steps_per_call):
  config = helpers.tiny_config("fedbuff", steps_per_call=steps_per_call)
  exp = experiment.build(config)
  reference = _run(exp, exp.init_state()) if steps_per_call == 1 else None
  off = experiment.build(config)
  off.compile(off.init_state())
  assert set(off.program_status.values()) == {"off"}

  monkeypatch.setattr(program_cache, "default_directory",
                      lambda: str(tmp_path))
  first = experiment.build(config)
  first.compile(first.init_state())
  assert set(first.program_status.values()) == {"miss"}
  name = "step" if steps_per_call == 1 else "steps"
  # With the start-up programs (one_shot.jit, given a closure).
  assert {f.split("-")[0] for f in os.listdir(tmp_path)} == {
      "model_init", "deadline", "round0_state", name, "evaluate"}

  second = experiment.build(config)
  second.compile(second.init_state())
  assert set(second.program_status.values()) == {"hit"}
  assert set(second.programs) == {name, "evaluate"}
  # Loaded, not traced: the jitted functions never ran.
  assert second.step_fn._cache_size() == 0  # pylint: disable=protected-access
  assert second.steps_fn._cache_size() == 0  # pylint: disable=protected-access
  assert second.eval_fn._cache_size() == 0  # pylint: disable=protected-access
  state, history, _ = second.run()
  again, history_again, _ = off.run()
  helpers.assert_bit_identical(state, again)
  assert [r["test_loss"] for r in history] == [
      r["test_loss"] for r in history_again]
  if reference is not None:
    helpers.assert_bit_identical(_run(second, second.init_state()),
                                 reference)


def test_an_unreadable_entry_is_compiled_again(tmp_path, monkeypatch, caplog):
  monkeypatch.setattr(program_cache, "default_directory",
                      lambda: str(tmp_path))
  config = helpers.tiny_config("fedavg")
  first = experiment.build(config)
  first.compile(first.init_state())
  for name in os.listdir(tmp_path):
    (tmp_path / name).write_bytes(b"not a program")
  second = experiment.build(config)
  with caplog.at_level(logging.WARNING):
    second.compile(second.init_state())
  assert set(second.program_status.values()) == {"miss"}
  assert "unreadable" in caplog.text
  third = experiment.build(config)  # the entries were written again.
  third.compile(third.init_state())
  assert set(third.program_status.values()) == {"hit"}
  helpers.assert_bit_identical(third.run()[0], first.run()[0])


def test_the_key_names_the_arguments_and_the_description():
  x = jnp.zeros((3, 2), jnp.float32)
  key = program_cache.program_key("f", {"a": 1}, (x,))
  assert key == program_cache.program_key("f", {"a": 1}, (jnp.ones((3, 2)),))
  assert key != program_cache.program_key("g", {"a": 1}, (x,))
  assert key != program_cache.program_key("f", {"a": 2}, (x,))
  assert key != program_cache.program_key("f", {"a": 1}, (x[:2],))
  assert key != program_cache.program_key("f", {"a": 1},
                                          (x.astype(jnp.int32),))
  assert key != program_cache.program_key("f", {"a": 1}, ((x,),))
  # A Python float traces weakly typed: another program than an f32 array.
  assert (program_cache.program_key("f", {}, (1.0,)) !=
          program_cache.program_key("f", {}, (np.float32(1.0),)))


def test_the_environment_digest_follows_source_and_options(tmp_path,
                                                           monkeypatch):
  (tmp_path / "a.py").write_text("x = 1\n")
  before = program_cache.source_digest(tmp_path)
  (tmp_path / "a.py").write_text("x = 2\n")
  assert program_cache.source_digest(tmp_path) != before

  digest = program_cache.environment_digest()
  monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_enable_fast_math=true")
  assert program_cache.environment_digest() != digest
  monkeypatch.delenv("XLA_FLAGS")
  jax.config.update("jax_debug_nans", True)
  try:
    assert program_cache.environment_digest() != digest
  finally:
    jax.config.update("jax_debug_nans", False)
  assert program_cache.environment_digest() == digest


def test_the_description_names_every_simulator_argument():
  """A new make_simulator argument must join Experiment.closure (build),
  or a cached step would ignore it. Runs with extensions bypass the cache
  (Experiment._cache_directory)."""
  params = set(inspect.signature(engine.make_simulator).parameters) - {
      "extensions"}
  closure = experiment.build(helpers.tiny_config("ftte")).closure
  assert params == set(closure) - {
      "step_donates", "step_compiler_options", "evaluate_compiler_options"}
  # The step's XLA options change its code, so they are keyed too.
  assert closure["step_compiler_options"] == run.step_compiler_options()
  if jax.default_backend() == "cpu":
    assert closure["step_compiler_options"][
        "xla_backend_optimization_level"] == 2


def test_launch_runs_hit_and_keep_the_same_bits(tmp_path):
  """Through launch.main: a cold run stores, a warm one hits. Without the
  entries, JAX's cache supplies the programs and nothing is stored (such a
  copy would miss kernels); the next run still traces and runs."""
  cache = tmp_path / "cache"
  statuses, shas = [], []
  for i, wipe in enumerate([False, False, True, False]):
    if wipe:
      shutil.rmtree(cache / program_cache.SUBDIRECTORY)
    p = subprocess.run(
        [sys.executable, "-m", "launch.main",
         f"--flagfile={REPO / 'experiments' / 'smoke.flags'}", "--rounds=4",
         f"--compilation_cache={cache}", f"--workdir={tmp_path / str(i)}"],
        cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
    assert p.returncode == 0, p.stderr
    summary = json.loads((tmp_path / str(i) / "summary.json").read_text())
    statuses.append(set(summary["program_cache"].values()))
    shas.append(summary["params_sha256"])
  assert statuses == [{"miss"}, {"hit"}, {"jax_cache"}, {"jax_cache"}]
  assert not (cache / program_cache.SUBDIRECTORY).exists() or not os.listdir(
      cache / program_cache.SUBDIRECTORY)
  assert len(set(shas)) == 1


_SHARDED = """
import sys
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from ftte_jax import program_cache
devices = jax.devices()[:2]
if sys.argv[2] == "reversed":
  devices = devices[::-1]
mesh = Mesh(np.array(devices), ("d",))
spread = jax.device_put(jnp.arange(4.0), NamedSharding(mesh, P("d")))
f = jax.jit(lambda x: jax.shard_map(
    lambda a: jax.lax.psum(a.sum(), "d")[None] + a, mesh=mesh,
    in_specs=P("d"), out_specs=P("d"))(x))
programs, status = program_cache.compile_all(
    [("spread", f, (spread,))], {}, sys.argv[1])
out = programs["spread"](spread)
print(status["spread"], np.asarray(out).tolist(),
      [d.id for d in out.sharding.mesh.devices])
"""


def test_programs_on_a_mesh_are_cached_by_their_devices(tmp_path):
  """A program on several devices of one process (a clients mesh) is
  stored and loaded like any other; the same shapes on the devices in
  another order are another entry, since a loaded executable keeps its
  devices."""
  def run(order):
    p = subprocess.run(
        [sys.executable, "-c", _SHARDED, str(tmp_path), order], cwd=REPO,
        capture_output=True, text=True, timeout=300, check=False,
        env=dict(os.environ, JAX_PLATFORMS="cpu",
                 XLA_FLAGS="--xla_force_host_platform_device_count=2"))
    assert p.returncode == 0, p.stderr[-3000:]
    return p.stdout.strip().split(maxsplit=1)

  want = "[6.0, 7.0, 8.0, 9.0] [0, 1]"
  assert run("forward") == ["miss", want]
  assert run("forward") == ["hit", want]
  assert run("reversed") == ["miss", "[6.0, 7.0, 8.0, 9.0] [1, 0]"]
  assert run("reversed")[0] == "hit"
  assert len(os.listdir(tmp_path)) == 2
