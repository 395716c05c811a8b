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
``--overwrite``. Bad input exits with status 2 and one line naming the flag.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import sys
import time

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
_SHOWN = ("algorithm", "final_accuracy", "best_accuracy", "target_accuracy",
          "time_to_target_s", "rounds", "virtual_time_s", "client_updates",
          "client_updates_per_s", "wall_s", "compile_s",
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
  """Removes this launcher's outputs (only those) from ``workdir``."""
  for name in _OUTPUTS:
    p = os.path.join(workdir, name)
    if os.path.isdir(p):
      shutil.rmtree(p)
    elif os.path.exists(p):
      os.remove(p)


def _check_workdir(workdir: str, config_dict: dict, sha: str
                   ) -> dict | None:
  """Refuses (exit 2) a workdir that holds another configuration's run;
  returns its config.json (None: there is none)."""
  path = os.path.join(workdir, "config.json")
  if os.path.exists(path):
    try:
      with open(path) as f:
        stored = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
      flags_lib.fail(f"--workdir={workdir}: unreadable config.json ({e}); "
                     "pass --overwrite to start fresh")
    if stored.get("config_sha256") != sha:
      diff = _diff(stored.get("experiment", {}), config_dict)
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
  """Drops INFO chatter of orbax (per-save thread messages) from the log."""

  def filter(self, record) -> bool:
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
  workdir, stored = _workdir(config, config_dict, sha)
  exp, build_s = _build(config)
  # Written only once the build succeeded: a failed start leaves nothing
  # that a corrected command would be refused for.
  if FLAGS.overwrite and primary:
    _clear_workdir(workdir)
  os.makedirs(workdir, exist_ok=True)
  # The clients mesh the run so far used (config.json records it).
  devices_before = (stored or {}).get("launch", {}).get("mesh_devices")
  if primary:
    _write_config(workdir, config, config_dict, sha, resolved.given,
                  exp.num_devices)
  ckpt, state, history = _restore(exp, workdir, sha)
  resumed_from = int(state.version) if state is not None else None
  summary_path = os.path.join(workdir, "summary.json")
  if state is not None and _finished(config, state) and os.path.exists(
      summary_path):
    ckpt.close()
    logging.info("run already complete at round %d; summary in %s",
                 resumed_from, summary_path)
    with open(summary_path) as f:
      _print_summary(json.load(f), workdir)
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
  state, history, timing = _run(exp, ckpt, state, history,
                                workdir if primary else None)
  summary = exp.summary(state, history, timing)
  summary.update(config_sha256=sha, workdir=os.path.abspath(workdir),
                 build_s=build_s, resumed_from_round=resumed_from,
                 num_params=exp.info.get("num_params"))
  summary["startup_s"]["imports_s"] = imports_s
  ckpt.close()
  if primary:
    checkpointing.write_json(summary_path, summary)
    _print_summary(checkpointing.to_jsonable(summary), workdir)
  _exit_if_diverged(summary, workdir)


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


def _exit_if_diverged(summary: dict, workdir: str) -> None:
  """Exit 3 with one line when on_divergence=stop ended the run."""
  if summary["stopped_by"] == "divergence":
    print(f"main.py: diverged at round {summary['rounds']}: a step's result "
          "or the test loss was not finite; the last good state and the "
          f"summary are in {workdir} (--on_divergence=skip goes on)",
          file=sys.stderr, flush=True)
    sys.exit(flags_lib.EXIT_DIVERGED)


def _workdir(config, config_dict, sha) -> tuple[str, dict | None]:
  """The run's workdir, refused (exit 2) if it holds another run, and the
  config.json it holds (None: none, or --overwrite)."""
  workdir = FLAGS.workdir or os.path.join(
      "runs", f"{config.engine.algorithm}-{sha[:8]}")
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    flags_lib.fail(f"--workdir={workdir} exists and is not a directory")
  _probe_workdir(workdir)
  stored = None if FLAGS.overwrite else _check_workdir(workdir, config_dict,
                                                        sha)
  logging.info("workdir %s (config %s)", workdir, sha[:12])
  return workdir, stored


def _probe_workdir(workdir: str) -> None:
  """Exit 2 now, not after the build, if ``workdir`` cannot be written.

  An existing workdir gets a probe file (created and removed); otherwise
  the nearest existing ancestor must be a writable directory. Nothing is
  left behind either way.
  """
  if os.path.isdir(workdir):
    probe = os.path.join(workdir, f".probe{os.getpid()}")
    try:
      with open(probe, "w") as f:
        f.write("probe")
      os.remove(probe)
    except OSError as e:
      flags_lib.fail(f"--workdir={workdir} is not writable ({e.strerror})")
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
  if ckpt.latest_step() != int(state.version):
    ckpt.save(state, rows)
  return state, history, timing


def _print_summary(summary: dict, workdir: str) -> None:
  width = max(len(k) for k in _SHOWN)
  lines = [f"summary ({os.path.join(workdir, 'summary.json')}):"]
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
  the atexit handlers run and the process exits directly. An exception
  other than ``SystemExit`` still takes the normal path (traceback, exit
  1).
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
