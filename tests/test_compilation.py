"""JAX's persistent compilation cache for a run's programs.

A warm build loads the step and the evaluation from the cache and gives
the same bits. A change to what a program closes over compiles afresh:
the hand-keyed program cache this project had (removed; its key named the
engine config, the model's repr, the loop length, the client optimizer,
the arguments' types, the package's source and the library versions)
would have loaded the old program for the change tested here.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import helpers
from ftte_jax import compilation
from ftte_jax import experiment
from ftte_jax.core import losses


@pytest.fixture
def persistent_cache(tmp_path):
  """JAX's persistent cache in ``tmp_path`` for one test, every program
  kept (as ``launch/flags.py`` sets it up), then off again."""
  # JAX initializes its cache once per process; reset_cache starts over
  # (tests only: launch.main sets the directory before any compile).
  from jax._src import compilation_cache  # pylint: disable=g-import-not-at-top
  before = (jax.config.jax_compilation_cache_dir,
            jax.config.jax_persistent_cache_min_compile_time_secs)
  jax.config.update("jax_compilation_cache_dir", str(tmp_path))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  compilation_cache.reset_cache()
  try:
    yield tmp_path
  finally:
    jax.config.update("jax_compilation_cache_dir", before[0])
    jax.config.update("jax_persistent_cache_min_compile_time_secs",
                      before[1])
    compilation_cache.reset_cache()


def _compiled(config):
  exp = experiment.build(config)
  exp.compile(exp.init_state())
  return exp


@pytest.mark.slow
@pytest.mark.parametrize("steps_per_call", [1, 0])
def test_a_warm_build_hits_and_gives_the_same_bits(persistent_cache,
                                                   steps_per_call):
  config = helpers.tiny_config("fedbuff", steps_per_call=steps_per_call)
  name = "step" if steps_per_call == 1 else "steps"
  cold = _compiled(config)
  assert cold.program_status == {name: "miss", "evaluate": "miss"}
  assert any(persistent_cache.iterdir())
  warm = _compiled(config)
  assert warm.program_status == {name: "hit", "evaluate": "hit"}
  state, history, _ = warm.run()
  again, history_again, _ = cold.run()
  helpers.assert_bit_identical(state, again)
  assert [r["test_loss"] for r in history] == [
      r["test_loss"] for r in history_again]


@pytest.mark.slow
def test_a_change_the_old_key_did_not_list_compiles_afresh(persistent_cache,
                                                           monkeypatch):
  """The clients' loss doubled: the same config, model, arguments and
  source files (the removed key's whole material), another program."""
  config = helpers.tiny_config("fedbuff")
  before = _compiled(config)
  assert before.program_status["step"] == "miss"
  state_before, _, _ = before.run()

  classification = losses.classification

  def doubled(apply_fn):
    task = classification(apply_fn)
    return task._replace(loss=lambda p, b: (2.0 * task.loss(p, b)[0], {}))

  monkeypatch.setattr(losses, "classification", doubled)
  after = _compiled(config)
  assert after.program_status["step"] == "miss"  # not the stale program.
  state_after, _, _ = after.run()
  assert not np.array_equal(
      np.asarray(jax.tree.leaves(state_after.params)[0]),
      np.asarray(jax.tree.leaves(state_before.params)[0]))
  # What it loaded is the doubled loss's program, as compiled without a
  # cache.
  jax.config.update("jax_enable_compilation_cache", False)
  try:
    reference = _compiled(config)
    assert reference.program_status["step"] == "off"
    helpers.assert_bit_identical(reference.run()[0], state_after)
  finally:
    jax.config.update("jax_enable_compilation_cache", True)


def test_compile_all_reports_each_program(tmp_path, request):
  scale = 2.0
  x = jnp.ones(3)

  def programs():
    return [("scaled", jax.jit(lambda v: v * scale), (x,)),
            ("shifted", jax.jit(lambda v: v + 1.0), (x,))]

  compiled, status = compilation.compile_all(programs())
  assert status == {"scaled": "off", "shifted": "off"}
  request.getfixturevalue("persistent_cache")
  compiled, status = compilation.compile_all(programs())
  assert status == {"scaled": "miss", "shifted": "miss"}
  compiled, status = compilation.compile_all(programs())
  assert status == {"scaled": "hit", "shifted": "hit"}
  np.testing.assert_array_equal(compiled["scaled"](x), [2.0, 2.0, 2.0])
  scale = 3.0  # closed over: the lowered text, and so the key, changes.
  compiled, status = compilation.compile_all(programs())
  assert status == {"scaled": "miss", "shifted": "hit"}
  np.testing.assert_array_equal(compiled["scaled"](x), [3.0, 3.0, 3.0])
