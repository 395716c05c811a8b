"""Jitting programs that run once per process (model init, round-0 state).

XLA compiles at backend optimization level 3 by default. For a program that
runs once, most of that compile time is never paid back: on the 2-core CPU,
level 2 compiles and runs the MLP's and LeNet-5's init about 3x faster
(MLP 0.5 s instead of 1.3 s; ``experiments/benchmarks/startup.py``,
``results/startup_cpu.json``). These
programs hold no dots or convolutions, only elementwise integer and float
arithmetic, which LLVM does not reassociate at any level, so their results
are the same bits; ``tests/test_one_shot.py`` holds them to that. The step,
which runs thousands of times, keeps the default.
"""

from __future__ import annotations

from typing import Any, Callable

import jax

COMPILER_OPTIONS = {"xla_backend_optimization_level": 2}


def jit(fun: Callable[..., Any], **kwargs) -> Callable[..., Any]:
  """``jax.jit`` with the one-shot compiler options.

  Called under a trace (``jax.eval_shape`` of a start-up function, or inside
  another jit) it is a plain nested ``jax.jit``: JAX takes compiler options
  only at the top level, and a nested program is not compiled on its own.
  """
  top = jax.jit(fun, compiler_options=COMPILER_OPTIONS, **kwargs)
  nested = jax.jit(fun, **kwargs)

  def call(*args, **kw):
    traced = any(isinstance(x, jax.core.Tracer)
                 for x in jax.tree.leaves((args, kw)))
    return (nested if traced else top)(*args, **kw)

  return call
