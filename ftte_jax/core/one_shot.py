"""Jitting programs that run once per process (model init, round-0 state).

XLA compiles at backend optimization level 3 with its newer fusion emitters
by default. For a program that runs once, most of that compile time is
never paid back. These programs compile at level 2, and on the CPU with the
older elemental emitters: on the 2-core CPU the MLP's and LeNet-5's init
compile and run 3.3x and 4.2x faster (``experiments/benchmarks/startup.py``,
``results/startup_cpu.json``) and the round-0 state 1.5x and 1.6x. They hold
no dots or convolutions, only elementwise integer and float arithmetic, and
their results are the same bits; ``tests/test_one_shot.py`` holds them to
that. The evaluation, whose dots run in library kernels at any level,
takes the same options (``experiment.run.evaluate_compiler_options``).
The step, which runs thousands of times, keeps the newer emitters
(its elementwise kernels run slower without them); on the CPU it compiles
at level 2 too (``experiment.run.step_compiler_options``).
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import numpy as np



@functools.cache
def compiler_options() -> dict:
  """The one-shot options this jaxlib knows (the emitter switch is recent:
  an older XLA would refuse the unknown option)."""
  options = {"xla_backend_optimization_level": 2}
  emitters = {"xla_cpu_use_fusion_emitters": False}
  try:
    jax.jit(lambda x: x + 1, compiler_options=emitters).lower(
        np.float32(0)).compile()
  except Exception:  # pylint: disable=broad-except  (any refusal: skip it)
    return options
  return {**options, **emitters}


def jit(fun: Callable[..., Any], **kwargs) -> Callable[..., Any]:
  """``jax.jit`` with the one-shot compiler options.

  Called under a trace (``jax.eval_shape`` of a start-up function, or inside
  another jit) it is a plain nested ``jax.jit``: JAX takes compiler options
  only at the top level, and a nested program is not compiled on its own.

  Args:
    fun: the function.
    **kwargs: ``jax.jit``'s.
  """
  nested = jax.jit(fun, **kwargs)
  top = []  # built at the first top-level call (the options probe compiles).

  def call(*args, **kw):
    if any(isinstance(x, jax.core.Tracer)
           for x in jax.tree.leaves((args, kw))):
      return nested(*args, **kw)
    if not top:
      top.append(jax.jit(fun, compiler_options=compiler_options(), **kwargs))
    return top[0](*args, **kw)

  return call
