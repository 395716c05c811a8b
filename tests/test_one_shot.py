"""Start-up programs compiled with the one-shot options give the same bits.

``one_shot.jit`` compiles programs that run once per process (model init,
the round-0 state, the deadline) with cheaper XLA options (level 2, and the
elemental emitters on the CPU), for a faster start. That is only sound if the results do not
move: these tests compare every leaf bit for bit against a default
``jax.jit`` of the same function.
"""

import jax
import numpy as np
import pytest

import helpers
from ftte_jax import experiment
from ftte_jax import models
from ftte_jax.core import one_shot
from ftte_jax.experiment import run


def _default_jit(fun, **kwargs):
  """``jax.jit`` with XLA's default options, in one_shot.jit's place."""
  return jax.jit(fun, **kwargs)


@pytest.mark.parametrize("name,shape", [("mlp", (1, 28, 28, 1)),
                                        ("lenet5", (1, 28, 28, 1)),
                                        ("resnet8", (1, 32, 32, 3))])
def test_model_init_same_bits(name, shape):
  module = models.get_model(name, 10)
  key, x = jax.random.PRNGKey(3), np.zeros(shape, np.float32)
  helpers.assert_bit_identical(one_shot.jit(module.init)(key, x),
                               jax.jit(module.init)(key, x))


@pytest.mark.parametrize("algorithm", ["ftte", "fedavg"])
def test_round0_state_same_bits(algorithm, monkeypatch):
  exp = experiment.build(helpers.tiny_config(algorithm))
  state = exp.init_state()  # one_shot.jit inside.
  monkeypatch.setattr(one_shot, "jit", _default_jit)
  helpers.assert_bit_identical(state, exp.init_state())


def test_nested_under_a_trace():
  """Under eval_shape (how a checkpoint's target is built) it nests."""
  exp = experiment.build(helpers.tiny_config("fedbuff"))
  abstract = jax.eval_shape(exp.init_state)
  concrete = exp.init_state()
  assert jax.tree.structure(abstract) == jax.tree.structure(concrete)
  for a, c in zip(jax.tree.leaves(abstract), jax.tree.leaves(concrete)):
    assert (a.shape, a.dtype) == (c.shape, c.dtype)


def test_deadline_same_bits(monkeypatch):
  """The environment's deadline (the worst first task) is one-shot too."""
  config = helpers.tiny_config("fedbuff")
  fast = experiment.build(config).env.deadline
  monkeypatch.setattr(one_shot, "jit", _default_jit)
  helpers.assert_bit_identical(fast, experiment.build(config).env.deadline)


@pytest.mark.parametrize("model", ["mlp", "lenet5"])
def test_evaluation_with_the_one_shot_options(model):
  """The evaluation compiles with the one-shot options
  (``run.evaluate_compiler_options``); its accuracy and loss match the
  default options' (the dots run in the same library kernels)."""
  exp = experiment.build(helpers.tiny_config("fedavg", model=model))
  assert run.evaluate_compiler_options() == one_shot.compiler_options()
  params = exp.setup.model.params
  fast = exp.evaluate(params)
  default = jax.jit(exp.sim.evaluate)(params, exp.test)
  assert fast["test_accuracy"] == float(default["test_accuracy"])
  np.testing.assert_allclose(fast["test_loss"], float(default["test_loss"]),
                             rtol=1e-6)


def test_the_step_options_keep_the_results():
  """The step's CPU options (``run.step_compiler_options``: level 2, no
  YNNPACK dot fusions) change only float rounding: three steps under them
  match three under XLA's defaults to 1e-5."""
  exp = experiment.build(helpers.tiny_config("fedavg"))
  state = exp.init_state()
  finals = []
  for options in (run.step_compiler_options(), {}):
    step = jax.jit(exp.sim.step, compiler_options=options)
    s = state
    for _ in range(3):
      s, _ = step(exp.env, s)
    finals.append(jax.device_get(s.params))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5,
                                                       atol=1e-6), *finals)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="CPU options")
def test_the_step_options_leave_dots_to_xla():
  """Where this XLA has the option, the step's dots are XLA's own calls,
  not YNNPACK fusions; an option value it does not know is refused
  quietly (``run._xla_accepts``), not raised."""
  assert not run._xla_accepts(  # pylint: disable=protected-access
      (("xla_cpu_experimental_ynn_fusion_type", "NO_SUCH_FUSION"),))
  options = run.step_compiler_options()
  if "xla_cpu_experimental_ynn_fusion_type" not in options:
    pytest.skip("this XLA has no YNNPACK fusion option")
  a = np.ones((32, 784), np.float32)
  b = np.ones((784, 200), np.float32)
  hlo = jax.jit(lambda a, b: a @ b, compiler_options=options).lower(
      a, b).compile().as_text()
  assert "__ynn_fusion" not in hlo and " dot(" in hlo
