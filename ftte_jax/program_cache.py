"""Compiled programs kept on disk, so that a warm start skips tracing.

JAX's persistent compilation cache saves XLA's compile, but each process
still traces and lowers a program to find its entry: for the step of the
FedJAX workload (``experiments/benchmarks/vs_fedjax.py``) about 0.9 s of a
warm run on the 2-core CPU. This cache keeps the compiled executable itself
(``jax.experimental.serialize_executable``) under a key of everything its
trace depends on:

- the caller's description of what the traced function closes over (for
  an experiment: the engine config, the model's module, the local-step
  loop length, the client optimizer's options, the plan's leaf kinds, the
  donated arguments);
- the tree structure, shapes, dtypes, weak types and placement of the
  arguments;
- the source of this package; the versions of Python, JAX, jaxlib, flax,
  optax and numpy; JAX's configuration (all but its cache and logging
  options); ``XLA_FLAGS``; the backend and its devices.

A key that leaves out something the trace reads would load a stale
program, so the description must name every closed-over value
(``tests/test_program_cache.py`` holds the simulator's signature to the
experiment's description). A key that names too much only costs a compile.
An entry that cannot be loaded is logged, compiled afresh and replaced;
entries are written whole (a temporary file renamed), so a killed process
leaves no half entry. Only fresh compiles are stored: on XLA:CPU an
executable that JAX's cache loaded serializes without some of its
kernels. The payload is pickled: like JAX's own cache, the directory must
be trusted.
"""

from __future__ import annotations

import concurrent.futures
import functools
import hashlib
import json
import logging
import os
import pathlib
import pickle
import re
import sys
import tempfile
import threading
from typing import Any, Callable, Sequence

import jax
from jax.experimental import serialize_executable
import numpy as np

FORMAT = 2  # bump when the entry layout changes.
SUBDIRECTORY = "ftte_programs"
# JAX options that change no program: the caches' own and logging.
_UNKEYED = re.compile(r"cache|^jax_log_|^jax_logging_")


def environment_digest() -> str:
  """SHA-256 of this package's source, the library versions, JAX's
  configuration, XLA_FLAGS and the devices."""
  # JAX's options may change within a process (a test turning on x64);
  # the source and the versions do not.
  config = {k: repr(v) for k, v in sorted(jax.config.values.items())
            if not _UNKEYED.search(k)}
  return hashlib.sha256(json.dumps({
      "static": _static_digest(), "jax_config": config,
      "xla_flags": os.environ.get("XLA_FLAGS", "")},
      sort_keys=True).encode()).hexdigest()


@functools.cache
def _static_digest() -> str:
  import flax  # pylint: disable=g-import-not-at-top
  import jaxlib  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  return hashlib.sha256(json.dumps({
      "format": FORMAT, "source": source_digest(
          pathlib.Path(__file__).resolve().parent),
      "python": sys.version, "jax": jax.__version__,
      "jaxlib": jaxlib.__version__, "flax": flax.__version__,
      "optax": optax.__version__, "numpy": np.__version__,
      "backend": jax.default_backend(),
      "devices": [d.device_kind for d in jax.devices()],
      "processes": jax.process_count()}, sort_keys=True).encode()).hexdigest()


def source_digest(root: pathlib.Path) -> str:
  """SHA-256 of every ``.py`` file under ``root``: paths and contents."""
  h = hashlib.sha256()
  for path in sorted(root.rglob("*.py")):
    h.update(str(path.relative_to(root)).encode() + b"\0")
    h.update(path.read_bytes() + b"\0")
  return h.hexdigest()


def _argument(x) -> str:
  aval = jax.typeof(x)
  sharding = getattr(x, "sharding", None)
  return (f"{aval.str_short()}|weak={getattr(aval, 'weak_type', False)}|"
          f"{sharding!r}|devices={_device_ids(sharding)}")


def _device_ids(sharding) -> list[int] | None:
  """The devices an argument lives on, in its mesh's order: a loaded
  executable runs on the devices it was compiled for, and a sharding's
  repr does not name them."""
  if sharding is None:
    return None
  mesh = getattr(sharding, "mesh", None)
  if mesh is not None and hasattr(mesh, "devices"):
    return [int(d.id) for d in np.ravel(mesh.devices)]
  return sorted(int(d.id) for d in sharding.device_set)


def program_key(name: str, description: dict, args: Sequence[Any]) -> str:
  """The entry's key: ``name``, ``description`` (JSON), the arguments'
  structure and types, and ``environment_digest()``."""
  leaves, tree = jax.tree.flatten(tuple(args))
  material = json.dumps({
      "name": name, "description": description, "tree": str(tree),
      "args": [_argument(x) for x in leaves],
      "environment": environment_digest()}, sort_keys=True, default=repr)
  return hashlib.sha256(material.encode()).hexdigest()


def default_directory() -> str | None:
  """``ftte_programs`` inside JAX's persistent compilation cache when that
  is on (``launch.main --compilation_cache``); None when it is off or the
  run spans processes (``jax.distributed``)."""
  cache = jax.config.jax_compilation_cache_dir
  if (not cache or not jax.config.jax_enable_compilation_cache or
      jax.process_count() > 1):
    return None
  return os.path.join(cache, SUBDIRECTORY)


def _load(path: str):
  with open(path, "rb") as f:
    payload, in_tree, out_tree, device_ids = pickle.load(f)
  # Without its devices an executable would be loaded onto all of the
  # backend's, and a one-device program would expect a shard on each.
  by_id = {d.id: d for d in jax.local_devices()}
  return serialize_executable.deserialize_and_load(
      payload, in_tree, out_tree,
      execution_devices=[by_id[i] for i in device_ids])


def _store(path: str, compiled) -> None:
  device_ids = [d.id for d in compiled.runtime_executable().local_devices()]
  blob = pickle.dumps((*serialize_executable.serialize(compiled), device_ids))
  directory = os.path.dirname(path)
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-")
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(blob)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 would hide it from others.
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def compile_all(programs: Sequence[tuple[str, Callable, tuple]],
                description: dict, directory: str | None
                ) -> tuple[dict, dict]:
  """Compiles jitted functions at their arguments, loading what is cached.

  Args:
    programs: ``(name, jitted, args)`` triples.
    description: JSON-able statement of everything the functions close
      over (see the module docstring); part of every key.
    directory: where entries live; None compiles without the cache.
      Programs on several devices of this process (a clients mesh) are
      kept like the others, keyed by their devices.

  Returns:
    ``({name: jax.stages.Compiled}, {name: status})``, the status being
    "hit" (loaded), "miss" (compiled and stored), "jax_cache" (loaded by
    JAX's persistent cache after tracing; not stored, see below) or
    "off" (no directory). Misses are lowered here
    and compiled side by side in threads (XLA compiles outside the GIL).
  """
  compiled, status, lowered, paths = {}, {}, {}, {}
  for name, jitted, args in programs:
    if directory is not None:
      paths[name] = os.path.join(
          directory, f"{name}-{program_key(name, description, args)}.bin")
      if os.path.exists(paths[name]):
        try:
          compiled[name], status[name] = _load(paths[name]), "hit"
          continue
        except Exception as e:  # pylint: disable=broad-except
          logging.warning("program cache: %s is unreadable (%s: %s); "
                          "compiling it again", paths[name],
                          type(e).__name__, e)
    lowered[name] = jitted.lower(*args)
    status[name] = "miss" if name in paths else "off"
  with concurrent.futures.ThreadPoolExecutor(max(1, len(lowered))) as pool:
    done = dict(zip(lowered, pool.map(_compile, lowered.values())))
  for name, (program, from_jax_cache) in done.items():
    compiled[name] = program
    if name not in paths:
      continue
    if from_jax_cache:
      # On XLA:CPU an executable loaded from JAX's cache serializes
      # without some of its kernels ("Function ... not found" when the
      # copy runs): only a fresh compile is kept.
      status[name] = "jax_cache"
      continue
    try:
      _store(paths[name], program)
    except (OSError, ValueError, NotImplementedError) as e:
      logging.warning("program cache: could not write %s (%s: %s)",
                      paths[name], type(e).__name__, e)
  return compiled, status


_THREAD = threading.local()


def _count_jax_cache_hits(event: str, **kwargs) -> None:
  del kwargs
  if event == "/jax/compilation_cache/cache_hits" and hasattr(_THREAD,
                                                               "hits"):
    _THREAD.hits += 1


jax.monitoring.register_event_listener(_count_jax_cache_hits)


def _compile(lowered) -> tuple[Any, bool]:
  """``(compiled, whether JAX's persistent cache supplied it)``; JAX
  records the hit in the compiling thread."""
  _THREAD.hits = 0
  try:
    return lowered.compile(), _THREAD.hits > 0
  finally:
    del _THREAD.hits
