r"""Runs one federated experiment from absl flags; resumes from checkpoints.

  python -m launch.main                       # default FTTE run on MNIST
  python -m launch.main --flagfile=experiments/smoke.flags --algorithm=fedbuff

Every option of ``ExperimentConfig`` is a flag (see ``launch/flags.py``;
``--helpfull`` lists them). Outputs in ``--workdir``:

  config.json     the resolved configuration, its SHA-256, the flags given.
  metrics.jsonl   one JSON row per evaluation.
  summary.json    the end-of-run summary (``Experiment.summary``).
  checkpoints/    orbax checkpoints of the whole simulation state.
  tensorboard/    the metric rows as TensorBoard events (--metrics).

On a terminal a progress bar shows the run (--progress, ``launch/watch.py``);
``python -m launch.plot WORKDIR...`` plots finished runs.

Running the same command again resumes from the latest checkpoint (and
rewrites metrics.jsonl to the checkpoint's rows first, so no row is
duplicated); a workdir holding a different configuration is refused unless
``--overwrite``. A run holds an exclusive lock on its workdir
(``launch/workdir_lock.py``) from before it reads or clears anything there.

Exit statuses: 0 finished; 2 bad input, a workdir in use or unusable, or a
checkpoint that could not be saved (one line naming the cause); 3 diverged
(``--on_divergence=stop``); 4 no client update arrived (``stopped_by:
"no_updates"``); 1 an unexpected error (a traceback).
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import sys
import time
import traceback

from absl import app
from absl import flags
from absl import logging

from launch import flags as flags_lib
from launch import watch

FLAGS = flags.FLAGS
# The user's algorithm pieces (``run(extensions=...)``): (Extensions or a
# factory, a name for config.json and the configuration hash).
_EXTENSIONS: list = [None, None]

_OUTPUTS = ("config.json", "metrics.jsonl", "summary.json", "checkpoints",
            watch.TENSORBOARD_DIR)
# Summary fields printed at the end (all of them go to summary.json).
_SHOWN = ("algorithm", "stopped_by", "final_accuracy", "best_accuracy",
          "target_accuracy", "time_to_target_s", "rounds", "virtual_time_s",
          "client_updates", "client_updates_per_s", "wall_s", "compile_s",
          "peak_device_memory_bytes", "upload_bytes_per_update",
          "download_bytes_per_update", "mean_staleness", "params_sha256")


def _diff(old: dict, new: dict, prefix: str = "") -> list[str]:
  """Dotted names of the entries that differ between two config dicts."""
  out = []
  for k in sorted(set(old) | set(new)):
    a, b = old.get(k), new.get(k)
    if isinstance(a, dict) and isinstance(b, dict):
      out += _diff(a, b, f"{prefix}{k}.")
    elif a != b:
      out.append(f"{prefix}{k}: {a!r} -> {b!r}")
  return out


def _clear_workdir(workdir: str) -> None:
  """Removes this launcher's outputs (only those) from ``workdir``; exit 2
  naming what cannot be removed."""
  for name in _OUTPUTS:
    p = os.path.join(workdir, name)
    try:
      if os.path.isdir(p) and not os.path.islink(p):
        shutil.rmtree(p)
      elif os.path.lexists(p):
        os.remove(p)
    except OSError as e:
      flags_lib.fail(f"--overwrite: cannot remove {p} ({e.strerror or e})")


def _check_workdir(workdir: str, config_dict: dict, sha: str
                   ) -> dict | None:
  """Refuses (exit 2) a workdir that holds another configuration's run, a
  malformed config.json, or outputs of the wrong kind; returns its
  config.json (None: there is none)."""
  _check_outputs(workdir)
  path = os.path.join(workdir, "config.json")
  if os.path.exists(path):
    try:
      with open(path, encoding="utf-8") as f:
        stored = json.load(f)
    except (OSError, ValueError) as e:
      flags_lib.fail(f"--workdir={workdir}: unreadable {path} "
                     f"({flags_lib.one_line(e)}); pass --overwrite to start "
                     "fresh")
    if not isinstance(stored, dict) or not isinstance(
        stored.get("config_sha256"), str):
      kind = "object" if isinstance(stored, dict) else {
          list: "array", str: "string"}.get(type(stored), "value")
      flags_lib.fail(f"--workdir={workdir}: {path} is not a run's "
                     f"configuration (a JSON {kind} without config_sha256); "
                     "pass --overwrite to start fresh")
    if stored["config_sha256"] != sha:
      old = stored.get("experiment")
      diff = _diff(old, config_dict) if isinstance(old, dict) else []
      flags_lib.fail(
          f"--workdir={workdir} holds a run with a different configuration "
          f"({'; '.join(diff[:3]) or 'hash differs'}"
          f"{'; ...' if len(diff) > 3 else ''}); pass --overwrite to discard "
          "it, or choose another --workdir")
    return stored
  if os.path.isdir(os.path.join(workdir, "checkpoints")) and os.listdir(
      os.path.join(workdir, "checkpoints")):
    flags_lib.fail(f"--workdir={workdir} holds checkpoints but no "
                   "config.json; pass --overwrite to discard them")
  return None


def _check_outputs(workdir: str) -> None:
  """Exit 2, before the build, for an output path of the wrong kind (a
  ``checkpoints`` that is a file, a ``summary.json`` that is a directory)
  or a checkpoints directory that cannot be written: otherwise the run
  would train and then fail to save."""
  for name in _OUTPUTS:
    p = os.path.join(workdir, name)
    want_dir = name in ("checkpoints", watch.TENSORBOARD_DIR)
    if os.path.lexists(p) and os.path.isdir(p) != want_dir:
      flags_lib.fail(
          f"--workdir={workdir}: {p} is {'not ' if want_dir else ''}a "
          f"directory; remove it or pass --overwrite")
  ckpt = os.path.join(workdir, "checkpoints")
  if os.path.isdir(ckpt):
    _probe_dir(ckpt, f"--workdir={workdir}: {ckpt}")


def _finished(config, state) -> bool:
  return int(state.version) >= config.rounds or (
      config.max_virtual_time is not None and
      float(state.clock) >= config.max_virtual_time)


def define_flags(fv: flags.FlagValues = flags.FLAGS) -> None:
  """Registers every flag of launch.main on ``fv`` (``run`` does, on the
  global flags; ``launch/flags_doc.py`` lists them in docs/flags.md)."""
  flags_lib.define_config_flags(fv)
  flags_lib.define_run_flags(fv)
  flags_lib.define_download_flag(fv)
  watch.define_flags(fv)


class _QuietLibraries(logging.logging.Filter):
  """Drops INFO chatter of orbax (per-save thread messages) from the log,
  and the tracebacks of its errors: a failed save is reported by the
  launcher in one line (``checkpointing.CheckpointSaveError``), and
  orbax's own line says where it failed."""

  def filter(self, record) -> bool:
    if "orbax" in record.pathname and record.exc_info:
      record.exc_info, record.exc_text = None, None
    return record.levelno >= logging.logging.WARNING or not any(
        lib in record.pathname for lib in ("orbax", "xla_bridge"))


def _resolved(argv: list[str]) -> flags_lib.Resolved:
  """The checked config, its data present (exit 2 otherwise)."""
  if len(argv) > 1:
    flags_lib.fail(f"unexpected positional arguments {argv[1:]}; flags are "
                   "written --name=value")
  try:
    resolved = flags_lib.resolve(FLAGS)
  except ValueError as e:
    flags_lib.fail(e)
  # Before the workdir or the compilation cache: a dataset that can be
  # neither found nor fetched should leave nothing behind.
  flags_lib.ensure_data(resolved.config, FLAGS.download)
  return resolved


def main(argv: list[str]) -> None:
  logging.get_absl_logger().addFilter(_QuietLibraries())
  try:
    flags_lib.cpu_devices_count(FLAGS.cpu_devices)
    watch.check_flags(FLAGS)
  except ValueError as e:
    flags_lib.fail(e)
  resolved = _resolved(argv)
  config = resolved.config
  # Imported after validation: a bad flag should not pay for JAX start-up.
  t_imports = time.perf_counter()
  distributed = flags_lib.init_distributed(FLAGS)
  flags_lib.set_cpu_devices(FLAGS.cpu_devices, distributed)
  logging.info("compilation cache: %s", flags_lib.enable_compilation_cache(
      FLAGS.compilation_cache) or "off")
  import jax  # pylint: disable=g-import-not-at-top
  from ftte_jax import checkpointing  # pylint: disable=g-import-not-at-top
  from ftte_jax import experiment  # noqa: F401  (timed here; _build uses it)
  imports_s = time.perf_counter() - t_imports
  # Under jax.distributed every process computes; process 0 writes.
  primary = jax.process_index() == 0

  config_dict = checkpointing.to_jsonable(config.to_dict())
  sha = checkpointing.config_hash(_hashed(config_dict))
  workdir = _workdir_path(config, sha)
  # Before anything in the workdir is read or cleared (--overwrite).
  lock = _lock(workdir)
  try:
    _main_locked(resolved, config_dict, sha, workdir, primary, imports_s)
  finally:
    if lock is not None:
      lock.release()


def _main_locked(resolved, config_dict: dict, sha: str, workdir: str,
                 primary: bool, imports_s: float) -> None:
  """The run, with the workdir locked."""
  from ftte_jax import checkpointing  # pylint: disable=g-import-not-at-top
  config = resolved.config
  stored = None if FLAGS.overwrite else _check_workdir(workdir, config_dict,
                                                        sha)
  logging.info("workdir %s (config %s)", workdir, sha[:12])
  exp, build_s = _build(config)
  # Written only once the build succeeded: a failed start leaves nothing
  # that a corrected command would be refused for.
  if FLAGS.overwrite and primary:
    _clear_workdir(workdir)
  os.makedirs(workdir, exist_ok=True)
  # The clients mesh the run so far used (config.json records it).
  devices_before = _stored(stored, "launch", "mesh_devices")
  if primary:
    _write_config(workdir, config, config_dict, sha, resolved.given,
                  exp.num_devices)
  ckpt, state, history = _restore(exp, workdir, sha)
  resumed_from = int(state.version) if state is not None else None
  summary_path = os.path.join(workdir, "summary.json")
  if state is not None and _finished(config, state):
    done = _complete_outputs(workdir, state, checkpointing)
    if done is not None:
      ckpt.close()
      logging.info("run already complete at round %d; summary in %s",
                   resumed_from, summary_path)
      _print_summary(done, workdir)
      _exit_status(done, workdir)
      return
  if resumed_from is not None:
    logging.info("resuming from round %d (%d metric rows)", resumed_from,
                 len(history))
    if devices_before not in (None, exp.num_devices):
      logging.warning(
          "--workdir=%s: the run so far split its clients over %d devices, "
          "this process over %d (--cpu_devices, --mesh_devices): sums are "
          "taken in another order, so it continues close to, not bit for "
          "bit like, an uninterrupted run", workdir, devices_before,
          exp.num_devices)
  try:
    state, history, timing = _run(exp, ckpt, state, history,
                                  workdir if primary else None)
    summary = exp.summary(state, history, timing)
    ckpt.close()
  except checkpointing.CheckpointSaveError as e:
    # orbax's threads of the failed save may never finish: no close().
    flags_lib.fail(f"--workdir={workdir}: {e}")
  summary.update(config_sha256=sha, workdir=os.path.abspath(workdir),
                 build_s=build_s, resumed_from_round=resumed_from,
                 num_params=exp.info.get("num_params"))
  summary["startup_s"]["imports_s"] = imports_s
  failure = _failure(summary, config)
  if failure:
    summary["failure"] = failure
  if primary:
    checkpointing.write_json(summary_path, summary)
    _print_summary(checkpointing.to_jsonable(summary), workdir)
  _exit_status(summary, workdir)


def _extensions_name() -> str | None:
  """The name of the run's extensions (None: the built-in algorithms)."""
  name = _EXTENSIONS[1]
  return name() if callable(name) else name


def _hashed(config_dict: dict) -> dict:
  """What the configuration hash covers: the config, and the extensions'
  name when there are any (so a workdir is never resumed under another
  algorithm)."""
  name = _extensions_name()
  return config_dict if name is None else {**config_dict,
                                           "extensions": name}


def _stored(stored: dict | None, section: str, key: str):
  """``stored[section][key]`` of a config.json, None where any is missing
  or of another type."""
  part = stored.get(section) if isinstance(stored, dict) else None
  return part.get(key) if isinstance(part, dict) else None


def _failure(summary: dict, config) -> str | None:
  """The summary's one-line ``failure`` for a run that could not train."""
  if summary.get("stopped_by") != "no_updates":
    return None
  from ftte_jax.experiment import run as run_lib  # pylint: disable=g-import-not-at-top
  n, rounds = summary.get("client_updates") or 0, summary.get("rounds")
  what = (f"no client update arrived in {rounds} server steps" if not n
          else f"no client update arrived in the last "
          f"{run_lib.no_update_window(config)} or more server steps up to "
          f"round {rounds} ({n} applied before)")
  stale = summary.get("updates_stale")
  return (f"{what}: every task was abandoned (--dropout, a trace's dropout "
          "column) or missed its deadline (--deadline_s, --deadline_factor)"
          f"{f' or came back too stale to count ({stale})' if stale else ''}"
          f"; {summary.get('updates_dropped')} tasks dropped in "
          f"{summary.get('virtual_time_s', 0.0):.6g} virtual seconds")


def _exit_status(summary: dict, workdir: str) -> None:
  """Exits 3 (diverged) or 4 (no update arrived) with one line when the
  run ended that way; returns otherwise."""
  if summary.get("stopped_by") == "divergence":
    print(f"main.py: diverged at round {summary['rounds']}: a step's result "
          "or the test loss was not finite; the last good state and the "
          f"summary are in {workdir} (--on_divergence=skip goes on)",
          file=sys.stderr, flush=True)
    sys.exit(flags_lib.EXIT_DIVERGED)
  if summary.get("stopped_by") == "no_updates":
    print(f"main.py: no update arrived, the model is untrained: "
          f"{summary.get('failure') or 'stopped_by no_updates'}; summary in "
          f"{workdir}", file=sys.stderr, flush=True)
    sys.exit(flags_lib.EXIT_NO_UPDATES)


def _complete_outputs(workdir: str, state, checkpointing) -> dict | None:
  """A finished run's summary, if it and metrics.jsonl are intact and the
  summary describes the checkpoint's model; else None, with a warning (the
  caller then rebuilds both from the checkpoint)."""
  summary_path = os.path.join(workdir, "summary.json")
  if not os.path.exists(summary_path):
    return None
  why = None
  try:
    with open(summary_path, encoding="utf-8") as f:
      summary = json.load(f)
    if not isinstance(summary, dict) or "params_sha256" not in summary:
      why = "summary.json is not a run summary"
    elif summary["params_sha256"] != checkpointing.params_sha256(
        state.params):
      why = "summary.json describes another model than the checkpoint's"
  except (OSError, ValueError) as e:
    why = f"summary.json is unreadable ({flags_lib.one_line(e)})"
  if why is None:
    why = _damaged_metrics(os.path.join(workdir, "metrics.jsonl"))
  if why is None:
    return summary
  logging.warning("--workdir=%s: %s; rebuilding summary.json and "
                  "metrics.jsonl from the checkpoint of round %d", workdir,
                  why, int(state.version))
  return None


def _damaged_metrics(path: str) -> str | None:
  """Why metrics.jsonl is damaged (missing, or a line that is not a JSON
  row); None if intact."""
  n = 0
  try:
    with open(path, encoding="utf-8") as f:
      for n, line in enumerate(f, 1):
        row = json.loads(line)
        if not isinstance(row, dict) or "round" not in row:
          return f"metrics.jsonl line {n} is not a metric row"
  except FileNotFoundError:
    return "metrics.jsonl is missing"
  except (OSError, ValueError) as e:
    return (f"metrics.jsonl line {n + 1 if isinstance(e, UnicodeError) else n}"
            f" is unreadable ({flags_lib.one_line(e)})")
  return None


def _workdir_path(config, sha) -> str:
  """The run's workdir, checked to be creatable and writable (exit 2)."""
  workdir = FLAGS.workdir or os.path.join(
      "runs", f"{config.engine.algorithm}-{sha[:8]}")
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    flags_lib.fail(f"--workdir={workdir} exists and is not a directory")
  _check_name_lengths(workdir)
  _probe_workdir(workdir)
  return workdir


def _check_name_lengths(workdir: str) -> None:
  """Exit 2 for a path or a name in it longer than the filesystem allows
  (``os.mkdir`` would fail only after the build)."""
  path = os.path.abspath(workdir)
  parent = path
  while not os.path.exists(parent):
    parent = os.path.dirname(parent)
  try:
    name_max = os.pathconf(parent, "PC_NAME_MAX")
    path_max = os.pathconf(parent, "PC_PATH_MAX")
  except (OSError, ValueError):
    name_max, path_max = 255, 4096
  # Room for the longest name written inside: checkpoints.damaged/<step>.n
  # and orbax's temporary step directories.
  room = 64
  for name in path.split(os.sep):
    if len(name.encode()) > name_max:
      flags_lib.fail(f"--workdir={workdir}: the name {name[:40]}... is "
                     f"{len(name.encode())} bytes, longer than this "
                     f"filesystem allows ({name_max})")
  if len(path.encode()) + room > path_max:
    flags_lib.fail(f"--workdir={workdir}: the path is {len(path.encode())} "
                   f"bytes; with the files written inside it would pass this "
                   f"filesystem's limit ({path_max})")


def _lock(workdir: str):
  """Takes the workdir's lock (process 0 of a jax.distributed run); exit 2,
  on every process, naming the holder when another run has it."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from launch import workdir_lock  # pylint: disable=g-import-not-at-top
  lock = refusal = None
  if jax.process_index() == 0:
    try:
      lock = workdir_lock.acquire(workdir)
    except workdir_lock.WorkdirBusyError as e:
      refusal = str(e)
    except OSError as e:
      refusal = (f"--workdir={workdir} cannot be created or locked "
                 f"({e.strerror or e})")
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    refused = int(multihost_utils.broadcast_one_to_all(
        np.int32(refusal is not None)))
    if refused and refusal is None:
      refusal = (f"--workdir={workdir}: process 0 could not lock it (its "
                 "log says why)")
  if refusal is not None:
    flags_lib.fail(refusal)
  if lock is not None and lock.stale:
    logging.warning("%s", lock.stale)
  if lock is not None and lock.advisory:
    logging.warning("--workdir=%s: this filesystem refuses file locks; the "
                    "lock is only a record of this process", workdir)
  return lock


def _probe_dir(path: str, what: str) -> None:
  """Exit 2 if the existing directory ``path`` cannot be written (a probe
  file is created and removed)."""
  probe = os.path.join(path, f".probe{os.getpid()}")
  try:
    with open(probe, "w") as f:
      f.write("probe")
    os.remove(probe)
  except OSError as e:
    flags_lib.fail(f"{what} is not writable ({e.strerror})")


def _probe_workdir(workdir: str) -> None:
  """Exit 2 now, not after the build, if ``workdir`` cannot be written.

  An existing workdir gets a probe file (created and removed); otherwise
  the nearest existing ancestor must be a writable directory. Nothing is
  left behind either way.
  """
  if os.path.isdir(workdir):
    _probe_dir(workdir, f"--workdir={workdir}")
    return
  parent = os.path.dirname(os.path.abspath(workdir))
  while not os.path.exists(parent):
    parent = os.path.dirname(parent)
  if not os.path.isdir(parent):
    flags_lib.fail(f"--workdir={workdir} cannot be created: {parent} is a "
                   "file")
  if not os.access(parent, os.W_OK | os.X_OK):
    flags_lib.fail(f"--workdir={workdir} cannot be created: {parent} is not "
                   "writable")


def _restore(exp, workdir, sha):
  """``(checkpointer, state or None, history)`` from the workdir."""
  import jax  # pylint: disable=g-import-not-at-top
  from ftte_jax import checkpointing  # pylint: disable=g-import-not-at-top
  ckpt = checkpointing.Checkpointer(
      os.path.join(workdir, "checkpoints"), sha, every=FLAGS.checkpoint_every,
      max_to_keep=FLAGS.keep_checkpoints)
  try:
    restored = ckpt.restore_latest(lambda: jax.eval_shape(exp.init_state))
  except checkpointing.ConfigMismatchError as e:
    ckpt.close()
    flags_lib.fail(f"--workdir={workdir}: {e}; pass --overwrite to discard "
                   "it")
  except checkpointing.CorruptCheckpointError as e:
    ckpt.close()
    flags_lib.fail(f"--workdir={workdir}: {e}")
  for reason in ckpt.skipped:  # damaged steps, newest first.
    logging.warning("--workdir=%s: damaged checkpoint skipped, resuming from "
                    "an older one: %s", workdir, reason)
  state, history = restored if restored else (None, [])
  return ckpt, state, history


def _build(config):
  """``(experiment, seconds)``; a build error exits 2 with one line."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from ftte_jax import experiment  # pylint: disable=g-import-not-at-top
  t0 = time.perf_counter()
  try:
    exp = experiment.build(config, _EXTENSIONS[0])
  except ValueError as e:
    msg = flags_lib.one_line(e)
    if msg.startswith("memory budget"):
      msg += ("; raise the smallest --memory_tier_fractions (or "
              "--memory_tiers), or lower --batch_size")
    flags_lib.fail(msg)
  build_s = time.perf_counter() - t0
  logging.info("built %s on %s in %.1fs: %d clients, %d eligible", config.model,
               config.data.dataset, build_s, config.data.num_clients,
               int(np.asarray(exp.env.eligible).sum()))
  return exp, build_s


def _write_config(workdir, config, config_dict, sha, given,
                  mesh_devices: int) -> None:
  """``config.json``: the resolved options, versions and how it was run."""
  import jax  # pylint: disable=g-import-not-at-top
  from ftte_jax import checkpointing  # pylint: disable=g-import-not-at-top
  from ftte_jax import experiment  # pylint: disable=g-import-not-at-top
  from ftte_jax.data import datasets  # pylint: disable=g-import-not-at-top
  checkpointing.write_json(os.path.join(workdir, "config.json"), {
      "experiment": config_dict,
      "config_sha256": sha,
      "algorithm": config.engine.algorithm,
      # The user's extensions (launch.main.run(extensions=...)), by name.
      "extensions": _extensions_name(),
      "flags_given": given,
      # Our reconstruction of FTTE, not the paper's published forms.
      "reconstruction": {
          "note": "values of options that are this project's choices, not "
                  "the FTTE paper's (docs/design.md, 'Reconstruction "
                  "choices')",
          "options": experiment.reconstruction_choices(config)},
      "data_dir_resolved": str(datasets.default_data_dir(
          config.data.data_dir)),
      "launch": {"workdir": os.path.abspath(workdir),
                 "checkpoint_every": FLAGS.checkpoint_every,
                 "keep_checkpoints": FLAGS.keep_checkpoints,
                 "compilation_cache": FLAGS.compilation_cache,
                 "cpu_devices": FLAGS.cpu_devices,
                 # The devices the clients are split over: sums over them
                 # round differently with another count.
                 "mesh_devices": mesh_devices,
                 "argv": sys.argv},
      "versions": {"python": sys.version.split()[0],
                   "jax": jax.__version__},
      "backend": jax.default_backend(),
  })


def _run(exp, ckpt, state, history, workdir):
  """Runs (or resumes) with metrics appended (to ``workdir``'s
  metrics.jsonl; nowhere when None) and checkpoints taken."""
  from ftte_jax import checkpointing  # pylint: disable=g-import-not-at-top
  # orbax imports while the programs compile or load and the first steps
  # run; the first save finds it ready.
  checkpointing.preload()
  metrics_path = os.devnull
  if workdir is not None:
    metrics_path = os.path.join(workdir, "metrics.jsonl")
    # The checkpoint's rows are the truth: drop any logged after it.
    checkpointing.write_text(metrics_path, "".join(
        json.dumps(r) + "\n" for r in history))
  rows = list(history)
  watcher = watch.start(FLAGS, exp.config.rounds, history,
                        0 if state is None else int(state.version), workdir)
  with open(metrics_path, "a") as metrics:

    def on_eval(state, row):
      del state
      rows.append(row)
      metrics.write(json.dumps(checkpointing.to_jsonable(row)) + "\n")
      metrics.flush()
      watcher.row(row)

    def on_step(state):
      ckpt.maybe_save(state, rows)
      watcher.step(state)

    try:
      state, history, timing = exp.run(state, history, on_eval=on_eval,
                                       on_step=on_step)
    finally:
      watcher.close()
  if (ckpt.latest_step() != int(state.version) and
      int(state.version) not in ckpt.in_the_way):
    ckpt.save(state, rows)
  return state, history, timing


def _print_summary(summary: dict, workdir: str) -> None:
  width = max(len(k) for k in _SHOWN)
  lines = [f"summary ({os.path.join(workdir, 'summary.json')}):"]
  if summary.get("failure"):
    lines.append(f"  FAILED ({summary.get('stopped_by')}): "
                 f"{summary['failure']}")
  for k in _SHOWN:
    v = summary.get(k)
    text = f"{v:.6g}" if isinstance(v, float) else str(v)
    lines.append(f"  {k:<{width}}  {text}")
  print("\n".join(lines), flush=True)


def run(extensions=None, name=None) -> None:
  """Runs ``main``, then exits without finalizing the interpreter.

  Args:
    extensions: the user's algorithm pieces, an ``Extensions`` or a factory
      ``(config, model) -> Extensions`` (``experiment.build``); every flag,
      checkpoint and resume works as for the built-in algorithms
      (``examples/``).
    name: names the extensions in config.json and the configuration hash
      (a string, or a function called after the flags are parsed, so it
      can include the script's own flags); needed with ``extensions``.

  Tearing down the modules and the XLA client after a run took about 0.5 s
  on the 2-core CPU, a tenth of a warm run of the FedJAX workload. By then
  every file is written and closed and the checkpointer has finished, so
  the atexit handlers run and the process exits directly. An unexpected
  exception prints its traceback and exits 1 the same way: a normal
  interpreter exit would wait forever on the threads of an orbax save that
  failed (they wait for a signal that never comes).
  """
  if extensions is not None and name is None:
    raise ValueError("name: run(extensions=...) needs a name for the "
                     "extensions (config.json and the configuration hash)")
  _EXTENSIONS[:] = [extensions, name]
  define_flags()
  try:
    app.run(main, flags_parser=flags_lib.parse_or_exit)
    code = 0
  except SystemExit as e:
    code = e.code
  except KeyboardInterrupt:
    print("main.py: interrupted", file=sys.stderr)
    code = 130
  except BaseException:  # pylint: disable=broad-except
    traceback.print_exc()
    code = 1
  if code is not None and not isinstance(code, int):
    print(code, file=sys.stderr)  # what SystemExit would have printed.
    code = 1
  atexit._run_exitfuncs()  # pylint: disable=protected-access
  logging.flush()
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(code or 0)


if __name__ == "__main__":
  run()
