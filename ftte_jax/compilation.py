"""Compiling a run's programs side by side, and what the persistent cache did.

A warm start takes its executables from JAX's persistent compilation cache
(``launch/flags.py``, ``enable_compilation_cache``). JAX keys an entry by the
lowered program itself (its module text, the compile options, the devices
and the library versions), so an entry cannot stand for another program:
whatever the trace closes over is in the text it hashes. What a warm start
still pays is tracing and lowering each program, about a second for the
step of the FedJAX workload; ``experiments/benchmarks/warm_start.py``
measures that against a cache of executables keyed by hand, which this
project had and removed because a value its key left out would have loaded
a stale program without an error.
"""

from __future__ import annotations

import concurrent.futures
import threading
from typing import Any, Callable, Sequence

import jax

_THREAD = threading.local()


def _count_cache_hits(event: str, **kwargs) -> None:
  del kwargs
  if event == "/jax/compilation_cache/cache_hits" and hasattr(_THREAD, "hits"):
    _THREAD.hits += 1


jax.monitoring.register_event_listener(_count_cache_hits)


def persistent_cache_on() -> bool:
  """Whether JAX's persistent compilation cache is on in this process."""
  return bool(jax.config.jax_compilation_cache_dir and
              jax.config.jax_enable_compilation_cache)


def compile_all(programs: Sequence[tuple[str, Callable, tuple]]
                ) -> tuple[dict, dict]:
  """Lowers jitted functions at their arguments and compiles them together.

  Args:
    programs: ``(name, jitted, args)`` triples.

  Returns:
    ``({name: jax.stages.Compiled}, {name: status})``, the status being
    "hit" (JAX's persistent cache supplied the executable), "miss"
    (compiled, and offered to the cache) or "off" (no persistent cache).
    The programs are lowered in turn (tracing holds the GIL) and compiled
    side by side in threads (XLA compiles outside it).
  """
  return compile_lowered({name: jitted.lower(*args)
                          for name, jitted, args in programs})


def compile_lowered(lowered: dict) -> tuple[dict, dict]:
  """``compile_all`` for programs already lowered (``{name: Lowered}``)."""
  with concurrent.futures.ThreadPoolExecutor(max(1, len(lowered))) as pool:
    done = dict(zip(lowered, pool.map(_compile, lowered.values())))
  on = persistent_cache_on()
  compiled = {name: program for name, (program, _) in done.items()}
  status = {name: ("off" if not on else "hit" if hit else "miss")
            for name, (_, hit) in done.items()}
  return compiled, status


def _compile(lowered) -> tuple[Any, bool]:
  """``(compiled, whether JAX's persistent cache supplied it)``; JAX
  records the hit in the compiling thread."""
  _THREAD.hits = 0
  try:
    return lowered.compile(), _THREAD.hits > 0
  finally:
    del _THREAD.hits
