"""Checkpoints of a whole simulation: SimState, metric history, config hash.

A checkpoint holds everything a run needs to continue bit-identically: the
engine's ``SimState`` (global params, optimizer state, ring buffer, in-flight
tasks, clock, key, counters), the metric rows logged so far, and the SHA-256
of the resolved configuration, so a checkpoint is never resumed under a
different configuration. Saving is orbax's ``CheckpointManager`` (async;
an interrupted save leaves a temporary directory that orbax ignores, so the
latest finished checkpoint is always readable).

Typical use (the launcher's)::

  ckpt = checkpointing.Checkpointer(workdir / "checkpoints", config_hash)
  restored = ckpt.restore_latest(jax.eval_shape(exp.init_state))
  state, history = restored if restored else (None, None)
  exp.run(state, history, on_step=lambda s: ckpt.maybe_save(s, history))
  ckpt.close()
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import sys
import threading
from typing import Any, Callable

import jax
import numpy as np

PyTree = Any


class ConfigMismatchError(ValueError):
  """A checkpoint was written under a different configuration."""


class CorruptCheckpointError(ValueError):
  """A checkpoint's files are unreadable or its bytes fail their hash."""


class CheckpointSaveError(RuntimeError):
  """A save failed (in the background or not) or did not finish in time."""


# A save (and the wait for it at close) that takes longer fails: a stuck
# filesystem must not hang a run. Generous: a multi-GB state on a slow disk.
SAVE_TIMEOUT_S = 900.0


def _quiet_orbax_leftovers(directory: str) -> None:
  """Silences what a failed read of ``directory`` leaves behind.

  When orbax's restore fails on a damaged step it closes its event loop
  while tensorstore still completes the step's other reads; each
  completion then meets the closed loop ("RuntimeError: Event loop is
  closed", printed as an unraisable exception) or a future nobody reads
  (asyncio's "Future exception was never retrieved"): dozens of
  tracebacks after an error that was handled (the step is skipped with a
  warning naming it). Only those are dropped: the first by its exact
  message, the second when it names a file under ``directory``.
  """
  _QUIET_DIRS.add(os.fspath(directory))
  if _QUIET_HOOKS:
    return
  previous = sys.unraisablehook

  def hook(unraisable):
    e = unraisable.exc_value
    if isinstance(e, RuntimeError) and str(e) == "Event loop is closed":
      return
    previous(unraisable)

  class Leftovers(logging.Filter):

    def filter(self, record) -> bool:
      text = record.getMessage()
      return not ("exception was never retrieved" in text and any(
          d in text for d in _QUIET_DIRS))

  sys.unraisablehook = hook
  logging.getLogger("asyncio").addFilter(Leftovers())
  _QUIET_HOOKS.append(hook)


_QUIET_DIRS: set[str] = set()
_QUIET_HOOKS: list = []


def _bounded(fn: Callable[[], Any], timeout_s: float, what: str) -> None:
  """Runs ``fn`` on a daemon thread; raises CheckpointSaveError if it
  raises or is still running after ``timeout_s`` seconds."""
  error: list[BaseException] = []

  def target():
    try:
      fn()
    except BaseException as e:  # pylint: disable=broad-except
      error.append(e)

  t = threading.Thread(target=target, name="checkpoint-wait", daemon=True)
  t.start()
  t.join(timeout_s)
  if t.is_alive():
    raise CheckpointSaveError(f"{what} did not finish within {timeout_s:g} s")
  if error:
    raise CheckpointSaveError(f"{what} failed ({_brief(error[0])})") from None


def _ocp():
  """``orbax.checkpoint``, imported at first use: the import takes about
  0.4 s on the 2-core CPU, which a run that saves only as it trains need
  not pay before its first step (``preload``)."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  return ocp


_PRELOADING: list[threading.Thread] = []


def preload() -> None:
  """Starts importing orbax in a background thread (once per process).

  The launcher calls this as compiling and training begin, when the main
  thread mostly waits on XLA with the GIL released, so the first save
  finds orbax imported. A failed import is left for that first use to
  raise.
  """
  if _PRELOADING or "orbax.checkpoint" in sys.modules:
    return

  def load():
    try:
      _ocp()
    except Exception:  # pylint: disable=broad-except  (raised at first use)
      pass

  _PRELOADING.append(threading.Thread(target=load, name="orbax-import"))
  _PRELOADING[0].start()


def config_hash(config_dict: dict) -> str:
  """SHA-256 of a configuration dict in canonical JSON (sorted keys)."""
  text = json.dumps(config_dict, sort_keys=True, default=_json_default)
  return hashlib.sha256(text.encode()).hexdigest()


def _brief(e: BaseException) -> str:
  """An exception as one short line."""
  text = " ".join(str(e).split()) or type(e).__name__
  return text if len(text) <= 160 else text[:157] + "..."


def params_sha256(params: PyTree) -> str:
  """SHA-256 of the parameters' bytes in flattening order (for repro checks)."""
  h = hashlib.sha256()
  for leaf in jax.tree.leaves(jax.device_get(params)):
    a = np.ascontiguousarray(leaf)
    h.update(str(a.dtype).encode() + str(a.shape).encode())
    h.update(a.tobytes())
  return h.hexdigest()


def _json_default(x):
  if isinstance(x, (np.integer,)):
    return int(x)
  if isinstance(x, (np.floating,)):
    return float(x)
  if isinstance(x, (np.ndarray, jax.Array)):
    return np.asarray(x).tolist()
  if isinstance(x, (tuple, set)):
    return list(x)
  if dataclasses.is_dataclass(x):
    return dataclasses.asdict(x)
  raise TypeError(f"not JSON serializable: {type(x).__name__}")


def write_json(path: str | os.PathLike, obj, indent: int | None = 2) -> None:
  """Writes JSON atomically (temporary file, fsync, rename)."""
  write_text(path, json.dumps(obj, indent=indent, default=_json_default) +
             "\n")


def write_text(path: str | os.PathLike, text: str) -> None:
  """Writes text atomically, so a reader never sees a half-written file."""
  path = os.fspath(path)
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w") as f:
    f.write(text)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def to_jsonable(obj):
  """Round-trips ``obj`` through JSON (numpy scalars to Python numbers)."""
  return json.loads(json.dumps(obj, default=_json_default))


@dataclasses.dataclass
class Checkpointer:
  """Saves and restores (SimState, history) under one directory.

  Attributes:
    directory: checkpoint root (one subdirectory per saved step).
    config_sha256: hash of the resolved config; stored with every save and
      checked on restore.
    every: save when the server version is a multiple of this.
    max_to_keep: number of most recent checkpoints kept.
  """

  directory: str | os.PathLike
  config_sha256: str
  every: int = 10
  max_to_keep: int = 3
  # Seconds a save, or the wait for pending saves, may take (then
  # CheckpointSaveError).
  timeout_s: float = SAVE_TIMEOUT_S
  _manager: Any = dataclasses.field(init=False, default=None, repr=False)
  # Steps restore_latest skipped as damaged, newest first, with reasons.
  skipped: list[str] = dataclasses.field(init=False, default_factory=list)
  # Damaged steps that could not be moved aside: not saved over.
  in_the_way: set[int] = dataclasses.field(init=False, default_factory=set)

  def __post_init__(self):
    if self.every < 1:
      raise ValueError(f"checkpoint_every must be >= 1, got {self.every}")
    if self.max_to_keep < 1:
      raise ValueError(f"max_to_keep must be >= 1, got {self.max_to_keep}")
    self.directory = os.path.abspath(os.fspath(self.directory))
    if jax.process_count() > 1:
      self.manager  # pylint: disable=pointless-statement  (see below)

  @property
  def manager(self):
    """orbax's ``CheckpointManager``, made (with the directory) at first
    use. Under ``jax.distributed`` making it is collective, so every
    process makes it on construction."""
    if self._manager is None:
      ocp = _ocp()
      self._manager = ocp.CheckpointManager(
          self.directory,
          options=ocp.CheckpointManagerOptions(max_to_keep=self.max_to_keep,
                                               create=True))
    return self._manager

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, state: PyTree, history: list[dict]) -> int:
    """Saves ``state`` and ``history`` at step ``state.version`` (async).

    The state is copied to host memory first: the server step donates its
    input buffers, so device arrays may be reused before an async save
    has read them.

    Raises:
      CheckpointSaveError: this save, or an earlier one still finishing in
        the background, failed (or waited past ``timeout_s``).
    """
    step = int(state.version)
    host_state = jax.device_get(state)
    # Our own content hash: orbax checks its metadata, not the bytes.
    meta = {"config_sha256": self.config_sha256, "step": step,
            "history": to_jsonable(history),
            "state_sha256": params_sha256(host_state)}
    ocp = _ocp()
    args = ocp.args.Composite(state=ocp.args.StandardSave(host_state),
                              meta=ocp.args.JsonSave(meta))
    # orbax would wait for the previous save unbounded: wait here first,
    # bounded, which also raises that save's background failure.
    self._wait()
    try:
      self.manager.save(step, args=args, force=True)
    except Exception as e:  # pylint: disable=broad-except
      raise CheckpointSaveError(
          f"saving checkpoint step {step} in {self.directory} failed "
          f"({_brief(e)})") from None
    return step

  def _wait(self) -> None:
    """Waits (at most ``timeout_s``) for the pending save; raises
    CheckpointSaveError if it failed or is still running."""
    manager = self._manager
    if manager is None:
      return

    def wait():
      manager.wait_until_finished()
      manager.check_for_errors()

    _bounded(wait, self.timeout_s, f"saving checkpoints in {self.directory}")

  def maybe_save(self, state: PyTree, history: list[dict]) -> bool:
    """Saves if ``state.version`` is a multiple of ``every``."""
    step = int(state.version)
    if step % self.every:
      return False
    if step in self.in_the_way:
      logging.warning("checkpoint step %d not saved: a damaged step %d that "
                      "could not be moved aside is in %s", step, step,
                      self.directory)
      return False
    self.save(state, history)
    return True

  def restore(self, step: int, target: PyTree) -> tuple[PyTree, list[dict]]:
    """Restores (state, history) of ``step``.

    Args:
      step: a saved step.
      target: the state's tree with arrays or ``jax.ShapeDtypeStruct``
        leaves (e.g. ``jax.eval_shape(exp.init_state)``).

    Returns:
      (state with jax arrays, history rows).

    Raises:
      ConfigMismatchError: the checkpoint was written under another config.
      CorruptCheckpointError: its files cannot be read, or the restored
        bytes do not hash to the digest written at save time.
    """
    ocp = _ocp()
    _quiet_orbax_leftovers(self.directory)
    try:
      meta = self.manager.restore(step, args=ocp.args.Composite(
          meta=ocp.args.JsonRestore()))["meta"]
    except Exception as e:  # orbax raises many types for damaged files.
      raise CorruptCheckpointError(
          f"step {step}: metadata unreadable ({_brief(e)})") from None
    if not isinstance(meta, dict) or "history" not in meta:
      raise CorruptCheckpointError(f"step {step}: metadata missing or empty")
    if meta.get("config_sha256") != self.config_sha256:
      raise ConfigMismatchError(
          f"checkpoint {self.directory}/{step} was written under config "
          f"{str(meta.get('config_sha256'))[:12]}, not "
          f"{self.config_sha256[:12]}")
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), target)
    try:
      out = self.manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract)))
    except Exception as e:  # orbax raises many types for damaged files.
      raise CorruptCheckpointError(
          f"step {step}: state unreadable ({_brief(e)})") from None
    digest = params_sha256(out["state"])
    if "state_sha256" in meta and digest != meta["state_sha256"]:
      raise CorruptCheckpointError(
          f"step {step}: state bytes hash to {digest[:12]}, saved as "
          f"{str(meta['state_sha256'])[:12]}")
    state = jax.tree.map(jax.numpy.asarray, out["state"])
    return state, list(meta["history"])

  def restore_latest(self, target: PyTree | Callable[[], PyTree]
                     ) -> tuple[PyTree, list[dict]] | None:
    """Restores the newest intact checkpoint; None if there is none.

    ``target`` may be a function returning it, called only when a
    checkpoint exists (a fresh run then skips tracing the state).

    A damaged checkpoint (``CorruptCheckpointError``) is skipped with a
    one-line warning naming the step and why, and the next older one is
    tried; ``skipped`` lists them. Skipped steps are moved, not deleted, to
    ``<directory>.damaged/`` (so the run can save those steps again and the
    bytes stay for inspection). A config mismatch is not damage and is
    raised.

    Raises:
      CorruptCheckpointError: checkpoints exist and none is intact.
    """
    self.skipped = []
    # No directory, no checkpoint: a fresh run does not wait for orbax.
    fresh = self._manager is None and not os.path.isdir(self.directory)
    steps = [] if fresh else sorted(self.manager.all_steps(), reverse=True)
    if steps and callable(target):
      target = target()
    for step in steps:
      try:
        return self.restore(step, target)
      except CorruptCheckpointError as e:
        self.skipped.append(str(e))
        logging.warning("checkpoint skipped: %s", e)
        self._set_aside(step)
    if steps:
      raise CorruptCheckpointError(
          f"{self.directory}: no intact checkpoint ({'; '.join(self.skipped)})"
          "; pass --overwrite to start fresh")
    return None

  def _set_aside(self, step: int) -> None:
    """Moves a damaged step out of the manager's directory (one process).

    What cannot be moved (no permission, ``<directory>.damaged`` a file)
    stays in place with a warning: the older steps are still tried, and
    the run saves this step number again only after the damaged one is
    gone (``maybe_save``).
    """
    if jax.process_index() == 0:
      aside = f"{self.directory}.damaged"
      src = os.path.join(self.directory, str(step))
      try:
        if os.path.isdir(src):
          os.makedirs(aside, exist_ok=True)
          dst = os.path.join(aside, str(step))
          n = 1
          while os.path.exists(dst):  # an earlier resume set one aside too.
            dst, n = os.path.join(aside, f"{step}.{n}"), n + 1
          os.replace(src, dst)
      except OSError as e:
        self.in_the_way.add(step)
        logging.warning("damaged checkpoint step %d could not be moved to "
                        "%s (%s); left in place", step, aside, _brief(e))
    try:
      self.manager.reload()
    except Exception as e:  # pylint: disable=broad-except
      logging.warning("checkpoint directory %s could not be re-read after "
                      "setting step %d aside (%s)", self.directory, step,
                      _brief(e))

  def close(self) -> None:
    """Waits for pending saves to finish (at most ``timeout_s``), then
    releases the manager.

    Raises:
      CheckpointSaveError: a pending save failed or did not finish in time.
    """
    if self._manager is None:
      return
    self._wait()
    manager, self._manager = self._manager, None
    _bounded(manager.close, self.timeout_s,
             f"closing the checkpoints in {self.directory}")


# ----------------------------------------------------------------------------
# A model's parameters on their own: the pretrained checkpoint.

PARAMS_FORMAT = "ftte_jax.params/1"
PARAMS_META = "params.json"


def save_params(directory: str | os.PathLike, params: PyTree,
                meta: dict) -> str:
  """Saves a parameter tree with its description; returns the params hash.

  ``directory`` gets ``params/`` (orbax) and ``params.json``: ``meta`` plus
  the format, the tree's shapes and its SHA-256, which ``load_params``
  checks, so a truncated or altered checkpoint is refused, never used.
  An existing directory is an error (nothing is overwritten).
  """
  directory = os.path.abspath(os.fspath(directory))
  if os.path.exists(directory):
    raise FileExistsError(f"{directory} exists; choose a new directory")
  params = jax.device_get(params)
  digest = params_sha256(params)
  with _ocp().StandardCheckpointer() as ckptr:  # leaving it waits for it.
    ckptr.save(os.path.join(directory, "params"), params)
  write_json(os.path.join(directory, PARAMS_META), {
      **meta, "format": PARAMS_FORMAT, "params_sha256": digest,
      "shapes": {"/".join(str(getattr(k, "key", k)) for k in path):
                 list(np.shape(leaf)) for path, leaf in
                 jax.tree_util.tree_flatten_with_path(params)[0]}})
  return digest


def read_params_meta(directory: str | os.PathLike) -> dict:
  """The description ``save_params`` wrote (cheap: no arrays are read).

  Raises:
    FileNotFoundError / ValueError: no such checkpoint, or not one of ours.
  """
  path = os.path.join(os.fspath(directory), PARAMS_META)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{directory}: not a parameter checkpoint (no "
                            f"{PARAMS_META}); write one with launch.pretrain")
  with open(path) as f:
    meta = json.load(f)
  if meta.get("format") != PARAMS_FORMAT:
    raise ValueError(f"{path}: format {meta.get('format')!r}, expected "
                     f"{PARAMS_FORMAT!r}")
  return meta


def load_params(directory: str | os.PathLike, like: PyTree) -> PyTree:
  """Restores parameters shaped like ``like`` and checks their SHA-256.

  Raises:
    ValueError: the tree or a shape differs from ``like``, or the files
      cannot be read or their bytes do not hash to the recorded digest (a
      damaged checkpoint).
  """
  directory = os.path.abspath(os.fspath(directory))
  meta = read_params_meta(directory)
  want = {"/".join(str(getattr(k, "key", k)) for k in path):
          list(np.shape(leaf)) for path, leaf in
          jax.tree_util.tree_flatten_with_path(like)[0]}
  if meta.get("shapes") != want:
    raise ValueError(f"{directory}: parameter shapes {meta.get('shapes')} do "
                     f"not match the model's {want}")
  abstract = jax.tree.map(
      lambda a: jax.ShapeDtypeStruct(np.shape(a), np.float32), like)
  _quiet_orbax_leftovers(directory)
  try:
    with _ocp().StandardCheckpointer() as ckptr:
      params = ckptr.restore(os.path.join(directory, "params"), abstract)
  except Exception as e:  # orbax raises many types for damaged files.
    raise ValueError(f"{directory}: parameter files unreadable "
                     f"({_brief(e)}); the checkpoint is damaged") from None
  digest = params_sha256(params)
  if digest != meta.get("params_sha256"):
    raise ValueError(f"{directory}: parameters hash to {digest[:12]}, the "
                     f"checkpoint records {str(meta.get('params_sha256'))[:12]}"
                     "; it is damaged")
  return params
