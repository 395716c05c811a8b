"""Replays every fault class of issues 13 and 31, each as a small case.

Each case asserts a clean outcome: a refusal naming the flag or file (exit
2, one line, no traceback, nothing written), a counted and refused server
step, a checkpoint fallback with a warning, a bounded compile, a library
call that raises, a run that could not train reported as failed (exit 4,
``stopped_by: "no_updates"``), or exit 0 with a finite model and strict
JSON. Refusals are checked in-process where the launcher's checks are
callable (``flags.resolve_args``, ``experiment.build``, the launcher's
helpers); the subprocess cases (marked slow) check exit status and stderr
end to end. Issue 31's classes: concurrent runs on one workdir (the lock),
runs in which no update can arrive (launcher, sweep, compare), recovery
paths (a damaged step that cannot be moved aside, damaged summary.json or
metrics.jsonl, a malformed config.json, a checkpoints path that is a file,
a save that fails in the background), data checked at the door (npz
features and labels, empty sets, importance trees), quiet shutdown, long
workdir names, BOM flagfiles and fedavg with arrival refill. Deeper tests
of each class live in test_launch, test_divergence, test_checkpointing,
test_workdir_lock, test_sweep, test_fleet and test_datasets.
"""

import dataclasses
import json
import os
import shutil
import signal
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import helpers
from ftte_jax import checkpointing
from ftte_jax import experiment
from ftte_jax.core import aggregation
from ftte_jax.core import client as client_lib
from ftte_jax.data import client_data
from ftte_jax.search import plan as plan_lib
from launch import flags as flags_lib
from test_checkpointing import _flip_bytes, _three_steps
from test_launch import REPO, SMOKE, launch, metrics, run

_OK = "1e9,1e6,1e6,1e12,0"
_HEADER = "speed_flops,bw_up,bw_down,memory_bytes,dropout"


def _trace(tmp_path, last_row, tier=None, drop=None, memory=None):
  """A 16-device trace (smoke.flags' num_clients) whose last row is given
  (the others: dropout ``drop`` and memory ``memory`` if given)."""
  ok_row = _OK
  if drop is not None or memory is not None:
    ok_row = f"1e9,1e6,1e6,{memory or 1e12:g},{drop or 0:g}"
  head, ok = _HEADER, [ok_row] * 15
  if tier is not None:
    head, ok = head + ",tier", [r + ",0" for r in ok]
  path = tmp_path / "trace.csv"
  path.write_text("\n".join([head, *ok, last_row]) + "\n")
  return path


def _latin1(path):
  path.write_bytes(b"--rounds=2\n# caf\xe9\n")
  return path


def _npz_mismatch(path):
  rng = np.random.default_rng(0)
  np.savez(path, x_train=rng.random((96, 6, 6)).astype(np.float32),
           y_train=rng.integers(0, 3, 96),
           x_test=rng.random((24, 5, 5)).astype(np.float32),
           y_test=rng.integers(0, 3, 24))
  return path


# Refused as the flags resolve: (arguments, what the one line must say).
RESOLVE = [
    (["--staleness_a=nan"], "--staleness_a must be a finite number"),
    (["--staleness=hinge", "--staleness_b=nan"], "--staleness_b must be"),
    (["--data_weight_exponent=inf"], "--data_weight_exponent must be"),
    (["--variance_beta=nan"], "--variance_beta must be"),
    (["--memory_tier_fractions=1e40"], "--memory_tier_fractions must fit"),
    (["--speed_sigma=inf"], "--speed_sigma must be"),
    (["--rounds=100000000000000000000"], "--rounds must fit int32"),
    (["--dirichlet_alpha=0"], "--dirichlet_alpha must be"),
    (["--seed=-1"], "--seed=-1"),
    (["--last_n_tensors=0"], "--last_n_tensors=0"),
    (["--npz_path=/no/such.npz", "--dataset=npz"], "--npz_path: no such"),
    (lambda t: [f"--flagfile={_latin1(t / 'x.flags')}"],
     "x.flags: not UTF-8 text"),
    # Issue 31: nothing can arrive, and fedavg run asynchronously.
    (["--dropout=1"], "--dropout=1: every task is abandoned"),
    (lambda t: [f"--trace_path={_trace(t, '1e9,1e6,1e6,1e12,1', drop=1)}"],
     "trace.csv: every device has dropout 1"),
    (["--algorithm=fedavg", "--concurrency=4", "--refill=arrival"],
     "fedavg is synchronous: concurrency must equal buffer_size (4) and "
     "refill must be 'step', got refill='arrival'"),
]


@pytest.mark.parametrize("args, says", RESOLVE)
def test_bad_flag_is_refused_naming_it(tmp_path, args, says):
  args = args(tmp_path) if callable(args) else args
  with pytest.raises(ValueError) as e:
    flags_lib.resolve_args([f"--flagfile={SMOKE}", *args])
  assert says in flags_lib.one_line(e.value)


# Refused by the build (data, model, fleet), before launch.main writes.
BUILD = [
    (lambda t: [f"--trace_path={_trace(t, '1e9,1e6,1e6')}"],
     "trace.csv: line 17: the header has 5 columns"),
    (lambda t: [f"--trace_path={_trace(t, '1e9,fast,1e6,1e12,0')}"],
     "trace.csv: line 17: bw_up 'fast' is not a number"),
    (lambda t: [f"--trace_path={_trace(t, _OK + ',x', tier=True)}"],
     "trace.csv: line 17: tier 'x' is not an integer"),
    (lambda t: [f"--trace_path={_trace(t, _OK + ',-1', tier=True)}"],
     "trace.csv: line 17: tier must be >= 0"),
    (lambda t: [f"--trace_path={_trace(t, '1e9,1e6,1e6,1e39,0')}"],
     "trace.csv: line 17: memory_bytes"),
    (lambda t: [f"--trace_path={_trace(t, '1e-300,1e6,1e6,1e12,0')}"],
     "trace.csv: line 17: speed_flops"),
    (lambda t: [f"--trace_path={_latin1(t / 'trace.csv')}"],
     "trace.csv: not UTF-8 text"),
    (['--model_options={"hidden": [0]}'], "--model: 'mlp' with model_options"),
    (["--dataset=synthetic", "--partition=natural", "--model=lenet5"],
     "--model: 'lenet5'"),
    (lambda t: ["--dataset=npz", f"--npz_path={_npz_mismatch(t / 'd.npz')}"],
     "d.npz: x_train examples have shape (6, 6) but x_test (5, 5)"),
    (["--mask=last_n", "--last_n_tensors=1000"],
     "--last_n_tensors must be in [1, "),
    # Issue 31: what only the build can know makes no update arrive.
    (["--deadline_s=1e-9"], "--deadline_s=1e-09 is shorter than any task "
     "can take (the fastest eligible device needs at least"),
    (["--deadline_factor=1e-9"], "--deadline_factor=1e-09 (a deadline of"),
    # The one device that would deliver cannot hold its mask (excluded).
    (lambda t: [f"--trace_path={_trace(t, '1e9,1e6,1e6,1e3,0', drop=1)}",
                "--mask=full"],
     "trace.csv: every eligible device has dropout 1"),
    # Issue 31: data checked at the door, by file, array and index.
    (lambda t: _npz_args(t, x_train=((5, 2, 3), 1e300)),
     "d.npz: x_train[5, 2, 3] = 1e+300: features must be finite and within "
     "float32's range"),
    (lambda t: _npz_args(t, x_test=((1, 0, 0), np.nan)),
     "d.npz: x_test[1, 0, 0] = nan: features must be finite"),
    (lambda t: _npz_args(t, y_train=((7,), -1)),
     "d.npz: y_train: label -1 out of range [0, 3) at index 7"),
    (lambda t: _npz_args(t, empty="test"),
     "d.npz: x_test has no examples; an npz dataset needs non-empty train "
     "and test sets"),
]


def _npz_args(t, empty=None, **cells):
  """--dataset=npz arguments for a float64 dataset with ``cells`` set
  (array name -> (index, value)) or the ``empty`` set emptied."""
  rng = np.random.default_rng(0)
  arrays = dict(x_train=rng.random((96, 6, 6)), y_train=rng.integers(0, 3, 96),
                x_test=rng.random((24, 6, 6)), y_test=rng.integers(0, 3, 24))
  for name, (index, value) in cells.items():
    arrays[name][index] = value
  if empty:
    arrays[f"x_{empty}"] = arrays[f"x_{empty}"][:0]
    arrays[f"y_{empty}"] = arrays[f"y_{empty}"][:0]
  np.savez(t / "d.npz", **arrays)
  return ["--dataset=npz", f"--npz_path={t / 'd.npz'}", "--num_clients=8",
          "--concurrency=4", "--buffer_size=2"]


@pytest.mark.parametrize("args, says", BUILD)
def test_bad_input_is_refused_by_the_build(tmp_path, args, says):
  args = args(tmp_path) if callable(args) else args
  config = flags_lib.resolve_args([f"--flagfile={SMOKE}", *args]).config
  with pytest.raises(ValueError) as e:
    experiment.build(config)
  assert says in flags_lib.one_line(e.value)


def _workdir_under_file(t):
  (t / "file").write_text("x")
  return t / "file" / "w", "is a file"


def _unwritable_workdir(t):
  if os.geteuid() == 0:
    pytest.skip("root writes anywhere")
  (t / "ro").mkdir(mode=0o500)
  return t / "ro" / "w", "not writable"


# End to end: exit 2, one error line naming the culprit, no traceback,
# nothing written. One case per stage (flags, flagfile, workdir, build).
@pytest.mark.slow
@pytest.mark.parametrize("case", [
    lambda t: (["--variance_beta=nan"], t / "w", "--variance_beta"),
    lambda t: ([f"--flagfile={_latin1(t / 'x.flags')}"], t / "w",
               "x.flags: not UTF-8 text"),
    lambda t: ([], *_workdir_under_file(t)),
    lambda t: ([], *_unwritable_workdir(t)),
    lambda t: ([f"--trace_path={_trace(t, '1e9,1e6,1e6')}"], t / "w",
               "trace.csv: line 17"),
], ids=["flag", "flagfile", "workdir_under_file", "unwritable_workdir",
        "trace_short_row"])
def test_launcher_exits_2_in_one_line_writing_nothing(tmp_path, case):
  args, wd, says = case(tmp_path)
  code, _, err = run(f"--flagfile={SMOKE}", *args, f"--workdir={wd}",
                     timeout=120)
  assert code == 2 and "Traceback" not in err, err
  (line,) = [l for l in err.splitlines() if "error:" in l]
  assert says in line, err
  assert not wd.exists()


def _finite(tree):
  return all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(tree))


def test_huge_client_lr_under_ftte_is_refused_or_finite():
  exp = experiment.build(helpers.tiny_config(
      rounds=4, eval_every=2, engine_kw={"client_lr": 1e6}))
  state, history, timing = exp.run()
  s = exp.summary(state, history, timing)
  # Never NaN parameters reported as a clean finish.
  assert _finite(state.params)
  assert s["stopped_by"] == "divergence" or (
      s["updates_nonfinite"] + s["steps_refused"] > 0 or
      all(np.isfinite(r["test_loss"]) for r in history))


@pytest.mark.slow
def test_diverging_server_stops_with_exit_3_after_the_summary(tmp_path):
  # skip goes on: test_divergence.test_skip_goes_on_and_counts_refused_steps.
  wd = tmp_path / "run"
  code, _, err = run(f"--flagfile={SMOKE}", "--algorithm=fedbuff",
                     "--server_lr=1e30", "--rounds=12", f"--workdir={wd}")
  assert code == 3 and "diverged" in err.splitlines()[-1], err
  assert (wd / "summary.json").exists()


@pytest.fixture(scope="module")
def exp():
  return experiment.build(helpers.tiny_config())


def _truncate(step):
  files = [p for p in (step / "state").rglob("*") if p.is_file()]
  big = max(files, key=lambda p: p.stat().st_size)
  big.write_bytes(big.read_bytes()[:big.stat().st_size // 2])


def _drop_metadata(step):
  for p in step.rglob("_METADATA"):
    p.unlink()


@pytest.mark.parametrize("damage", [_truncate, _drop_metadata, _flip_bytes],
                         ids=["truncated", "no_metadata", "flipped"])
def test_damaged_checkpoint_falls_back_with_a_warning(exp, tmp_path, damage,
                                                      caplog):
  _three_steps(exp, tmp_path)
  damage(tmp_path / "3")
  ckpt = checkpointing.Checkpointer(tmp_path, "h", every=1)
  with caplog.at_level("WARNING"):
    _, rows = ckpt.restore_latest(jax.eval_shape(exp.init_state))
  ckpt.close()
  assert rows == [{"round": 2}]
  assert ckpt.skipped[0].startswith("step 3")
  assert any("step 3" in r.getMessage() for r in caplog.records)


def _client_program_size(steps):
  apply, params = helpers.tiny_model()
  data = client_data.ClientData(
      x=jnp.zeros((32, 6)), y=jnp.zeros((32,), jnp.int32),
      offsets=jnp.zeros((1,), jnp.int32), counts=jnp.full((1,), 32, jnp.int32))
  update = client_lib.make_client_update(
      apply, 4, client_lib.make_client_optimizer(0.1), steps, unroll=True)
  mask = jax.tree.map(jnp.ones_like, params)
  local = client_lib.LocalData(source=data, offset=jnp.int32(0),
                               count=jnp.int32(32), num_steps=jnp.int32(steps))
  # The lowered program, where an unrolled loop's body is written out.
  return len(jax.jit(update).lower(
      jax.random.PRNGKey(0), params, mask, local).as_text())


def test_thousands_of_local_steps_compile_bounded():
  unrolled = _client_program_size(64)
  assert unrolled > _client_program_size(8)  # the size measures unrolling.
  assert _client_program_size(2000) <= unrolled


def test_aggregate_refuses_a_tier_outside_the_masks():
  deltas = {"w": jnp.ones((2, 3))}
  masks = {"w": jnp.ones((2, 3))}
  weights = jnp.ones(2)
  aggregation.aggregate(deltas, masks, jnp.array([0, 1]), weights)
  for bad in ([0, 2], [-1, 0]):
    with pytest.raises(ValueError, match=r"tier: id -?\d is outside \[0, 2\)"):
      aggregation.aggregate(deltas, masks, jnp.array(bad), weights)


def test_build_plan_refuses_nan_importance_and_infinite_budget():
  from test_search import SGD, _mlp  # pylint: disable=g-import-not-at-top
  info, spec, params, fisher = _mlp()
  mem = np.full(3, 1e7)
  nan = jax.tree.map(lambda f: np.full_like(f, np.nan), fisher)
  with pytest.raises(ValueError, match="importance must be finite"):
    plan_lib.build_plan(info, spec, params, nan, mem, SGD, batch_size=8)
  with pytest.raises(ValueError, match="positive, finite byte counts"):
    plan_lib.build_plan(info, spec, params, fisher, [1e7, np.inf, 1e7], SGD,
                        batch_size=8)


# ---------------------------------------------------------------------------
# Issue 31, in-process.


@pytest.mark.parametrize("bad, says", [
    (lambda f: {**f, "layer01_dense": {**f["layer01_dense"],
                                       "kernel": f["layer01_dense"][
                                           "kernel"][:, :8]}},
     "importance leaf layer01_dense/kernel has shape (16, 8), the "
     "parameter's is (16, 16)"),
    (lambda f: {k: v for k, v in f.items() if k != "layer02_dense"},
     "importance has no leaf layer02_dense/bias"),
    (lambda f: {**f, "extra": {"w": np.ones(3)}},
     "importance has a leaf extra/w that the parameters do not"),
    (lambda f: [f], "importance must be a tree shaped like the parameters"),
])
def test_build_plan_refuses_an_importance_tree_of_other_shapes(bad, says):
  from test_search import SGD, _mlp  # pylint: disable=g-import-not-at-top
  info, spec, params, fisher = _mlp()
  with pytest.raises(ValueError) as e:
    plan_lib.build_plan(info, spec, params, bad(fisher), np.full(3, 1e7), SGD,
                        batch_size=8)
  assert says in str(e.value)
  # Wrapped as flax variables, the right tree is accepted.
  plan_lib.build_plan(info, spec, {"params": params}, {"params": fisher},
                      np.full(3, 1e7), SGD, batch_size=8)


def test_flagfile_with_a_byte_order_mark_is_accepted(tmp_path):
  bom = b"\xef\xbb\xbf"
  (tmp_path / "a.flags").write_bytes(bom + b"--rounds=3\n--seed=5\n")
  (tmp_path / "b.flags").write_bytes(bom + b"# a comment first\n--rounds=4\n")
  (tmp_path / "c.flags").write_bytes(
      bom + f"--flagfile={tmp_path / 'b.flags'}\n--seed=6\n".encode())
  for name, rounds, seed in (("a", 3, 5), ("b", 4, 0), ("c", 4, 6)):
    config = flags_lib.resolve_args(
        [f"--flagfile={SMOKE}", f"--flagfile={tmp_path / name}.flags"]).config
    assert (config.rounds, config.seed) == (rounds, seed), name


def test_no_update_window_counts_a_thousand_failed_tasks():
  from ftte_jax.experiment import run as run_lib  # pylint: disable=g-import-not-at-top
  window = lambda algorithm, **e: run_lib.no_update_window(
      helpers.tiny_config(algorithm, engine_kw=e))
  # refill=arrival: a step that applies nothing took 64 K failed events.
  assert window("ftte") == 4  # ceil(1000 / (64 * 4))
  assert window("fedasync") == 16  # ceil(1000 / 64)
  # K tasks a step.
  assert window("fedavg") == 250
  assert window("ftte", count_timeouts=True) == 250


def test_task_jitter_never_takes_off_more_than_max_jitter_z():
  from ftte_jax.core import draws  # pylint: disable=g-import-not-at-top
  from ftte_jax.experiment import run as run_lib  # pylint: disable=g-import-not-at-top
  extremes = jnp.array([0, 1, 2**31, 2**32 - 512, 2**32 - 1], jnp.uint32)
  z = np.asarray(draws.normal(extremes))
  assert np.isfinite(z).all() and np.abs(z).max() < run_lib.MAX_JITTER_Z


@pytest.fixture(scope="module")
def silent_fleet():
  """A built run whose every device is made to drop every task afterwards
  (the build refuses such a fleet; here the run loop is tested)."""
  exp = experiment.build(helpers.tiny_config(rounds=12, eval_every=2))
  fleet = exp.env.fleet
  exp.env = exp.env.replace(fleet=fleet.replace(
      dropout=jnp.ones_like(fleet.dropout)))
  return exp


def test_a_run_without_updates_stops_with_no_updates(silent_fleet):
  from ftte_jax.experiment import run as run_lib  # pylint: disable=g-import-not-at-top
  exp = silent_fleet
  state, history, timing = exp.run()
  assert timing["stopped_by"] == "no_updates"
  # Rows at 0, 2, 4: four steps (no_update_window) without an update.
  assert run_lib.no_update_window(exp.config) == 4
  assert int(state.version) == 4 and [r["round"] for r in history] == [0, 2,
                                                                       4]
  # Each of those steps took the engine's cap of events, all failed.
  assert history[1]["updates_dropped"] == 2 * run_lib.EVENTS_PER_UPDATE * 4
  assert exp.summary(state, history, timing)["client_updates"] == 0
  # Resumed from round 2, it stops at the same step: the rule reads rows.
  again, rows, timing = exp.run(*_replay_to(exp, 2), history=history[:2])
  assert timing["stopped_by"] == "no_updates" and int(again.version) == 4
  assert rows == history or [r["round"] for r in rows] == [0, 2, 4]


def _replay_to(exp, rounds):
  state = exp.init_state()
  for _ in range(rounds):
    state, _ = exp.step_fn(exp.env, state)
  return (state,)


def test_a_short_run_that_ended_untrained_is_no_updates(silent_fleet):
  exp = silent_fleet
  cfg = exp.config
  exp.setup = dataclasses.replace(exp.setup, config=dataclasses.replace(
      cfg, rounds=3, eval_every=3))
  try:
    state, _, timing = exp.run()
  finally:
    exp.setup = dataclasses.replace(exp.setup, config=cfg)
  # 3 < the window, but it ended with no update applied at all.
  assert int(state.version) == 3 and timing["stopped_by"] == "no_updates"


def _main():
  import launch.main as main_lib  # pylint: disable=g-import-not-at-top
  return main_lib


@pytest.mark.parametrize("setup, says", [
    (lambda w: (w / "config.json").write_text("[]"),
     "config.json is not a run's configuration (a JSON array without "
     "config_sha256); pass --overwrite"),
    (lambda w: (w / "config.json").write_text('{"config_sha256": "ab'),
     "unreadable"),
    (lambda w: (w / "checkpoints").write_text("x"),
     "checkpoints is not a directory; remove it or pass --overwrite"),
    (lambda w: (w / "summary.json").mkdir(),
     "summary.json is a directory; remove it or pass --overwrite"),
])
def test_malformed_workdir_is_refused_naming_the_file(tmp_path, setup, says,
                                                     capsys):
  main_lib = _main()
  setup(tmp_path)
  with pytest.raises(SystemExit) as e:
    main_lib._check_workdir(str(tmp_path), {}, "ab")
  assert e.value.code == 2
  (line,) = capsys.readouterr().err.splitlines()
  assert f"--workdir={tmp_path}" in line and says in line


def test_workdir_name_longer_than_the_filesystem_allows(tmp_path, capsys):
  main_lib = _main()
  with pytest.raises(SystemExit) as e:
    main_lib._check_name_lengths(str(tmp_path / ("w" * 300)))
  assert e.value.code == 2
  line = capsys.readouterr().err.strip()
  assert "is 300 bytes, longer than this filesystem allows (255)" in line
  main_lib._check_name_lengths(str(tmp_path / ("w" * 200)))  # fine.


class _State:

  def __init__(self, params):
    self.params, self.version = params, 6


def test_damaged_summary_or_metrics_of_a_finished_run_are_rebuilt(
    tmp_path, caplog):
  main_lib = _main()
  params = {"w": np.arange(3, dtype=np.float32)}
  good = {"params_sha256": checkpointing.params_sha256(params),
          "stopped_by": "rounds"}
  rows = "".join(json.dumps({"round": r}) + "\n" for r in (0, 2))
  cases = {
      "intact": (json.dumps(good), rows, None),
      "truncated summary": (json.dumps(good)[:20], rows,
                            "summary.json is unreadable"),
      "summary of another model": (json.dumps({**good, "params_sha256": "0"}),
                                   rows, "describes another model"),
      "summary not an object": ("[]", rows, "not a run summary"),
      "half-written metrics": (json.dumps(good), rows + '{"round": 4, "te',
                               "metrics.jsonl line 3 is unreadable"),
      "metrics not rows": (json.dumps(good), rows + "[1]\n",
                           "metrics.jsonl line 3 is not a metric row"),
  }
  for name, (text, lines, why) in cases.items():
    (tmp_path / "summary.json").write_text(text)
    (tmp_path / "metrics.jsonl").write_text(lines)
    caplog.clear()
    with caplog.at_level("WARNING"):
      done = main_lib._complete_outputs(str(tmp_path), _State(params),
                                        checkpointing)
    if why is None:
      assert done == good, name
    else:
      assert done is None, name
      (record,) = caplog.records
      assert why in record.getMessage() and "rebuilding" in \
          record.getMessage(), name


def test_sweep_and_compare_show_a_run_without_updates_as_failed(tmp_path):
  from experiments import compare  # pylint: disable=g-import-not-at-top
  from launch import sweep  # pylint: disable=g-import-not-at-top
  result = {"algorithm": "ftte", "final_accuracy": 0.9, "stopped_by": "rounds",
            "params_sha256": "a", "time_to_target_s": 3.0}
  untrained = {**result, "final_accuracy": 0.16, "stopped_by": "no_updates",
               "client_updates": 0}
  jobs = []
  for name, code, s in (("ok", 0, result), ("none", 4, untrained),
                        ("refused", 2, None), ("old", 0, untrained)):
    (tmp_path / name).mkdir()
    if s is not None:
      (tmp_path / name / "summary.json").write_text(json.dumps(s))
    jobs.append(sweep.Job(name, {"seed": "0"}, [], str(tmp_path / name), code))
  rows = sweep.gather(jobs)
  assert [r["status"] for r in rows] == [
      "ok", "failed (no_updates)", "failed (refused, exit 2)",
      "failed (no_updates)"]
  assert rows[0]["final_accuracy"] == 0.9
  # No result values for a failed run: its untrained accuracy is no result.
  assert rows[1]["final_accuracy"] is None and rows[1]["params_sha256"] is None
  (mean,) = sweep.average_over_seeds(rows, ["seed"])
  assert mean["final_accuracy"] == 0.9 and mean["failed"] == 3
  table = compare.comparison_rows({"fedbuff": result},
                                  {"ftte": "failed (no_updates)"})
  assert [(r["algorithm"], r["status"], r.get("final_accuracy"))
          for r in table] == [("fedbuff", "ok", 0.9),
                              ("ftte", "failed (no_updates)", None)]


# ---------------------------------------------------------------------------
# Issue 31, end to end (subprocesses: slow).


def _strict(text):
  """JSON that strict parsers accept (no NaN or Infinity)."""
  def refuse(constant):
    raise ValueError(f"not strict JSON: {constant}")
  return json.loads(text, parse_constant=refuse)


def _one_error_line(err, says):
  assert "Traceback" not in err and "Event loop is closed" not in err, err
  (line,) = [l for l in err.splitlines() if "error:" in l or
             l.startswith("main.py: no update")]
  assert says in line, err
  return line


def _finished_cleanly(code, err, wd):
  """Exit 0, no traceback, a finite model and strict JSON outputs."""
  assert code == 0 and "Traceback" not in err, err
  assert "Event loop is closed" not in err, err
  s = _strict((Path(wd) / "summary.json").read_text())
  assert np.isfinite(s["final_loss"]) and s["stopped_by"] == "rounds"
  for line in (Path(wd) / "metrics.jsonl").read_text().splitlines():
    _strict(line)
  return s


@pytest.mark.slow
def test_second_run_on_a_locked_workdir_is_refused(tmp_path):
  """Run B, with --overwrite, on run A's workdir exits 2 naming A; A
  finishes with the model of a clean run."""
  args = [f"--flagfile={SMOKE}", "--rounds=300", "--eval_every=50",
          "--checkpoint_every=50"]
  wd, ref = tmp_path / "shared", tmp_path / "clean"
  a = launch(*args, f"--workdir={wd}")
  clean = launch(*args, f"--workdir={ref}")
  deadline = time.time() + 120
  while not (wd / ".lock").exists():
    assert a.poll() is None and time.time() < deadline, a.communicate()
    time.sleep(0.05)
  code, _, err = run(*args, "--overwrite", f"--workdir={wd}", timeout=120)
  assert a.poll() is None, "run A ended before B was refused"
  line = _one_error_line(err, f"--workdir={wd} is in use by process {a.pid}")
  assert code == 2 and "another --workdir" in line
  a_err = a.communicate(timeout=300)[1]
  clean_err = clean.communicate(timeout=300)[1]
  got = _finished_cleanly(a.returncode, a_err, wd)
  want = _finished_cleanly(clean.returncode, clean_err, ref)
  assert got["params_sha256"] == want["params_sha256"]
  assert got["resumed_from_round"] is None  # B cleared nothing.
  assert not (wd / ".lock").exists()  # released at the end.


def _config_list(t):
  (t / "w").mkdir()
  (t / "w" / "config.json").write_text("[]")
  return [], "config.json is not a run's configuration"


def _checkpoints_file(t):
  (t / "w").mkdir()
  (t / "w" / "checkpoints").write_text("x")
  return [], "checkpoints is not a directory"


# One line, exit 2, no traceback; nothing written (or the workdir's files
# untouched and no lock left behind).
@pytest.mark.slow
@pytest.mark.parametrize("case", [
    lambda t: (["--dropout=1.0"], "--dropout=1: every task is abandoned"),
    lambda t: (["--deadline_s=1e-9"], "--deadline_s=1e-09 is shorter than"),
    lambda t: (_npz_args(t, x_train=((5, 2, 3), 1e300)),
               "d.npz: x_train[5, 2, 3] = 1e+300"),
    lambda t: (["--algorithm=fedavg", "--concurrency=4", "--refill=arrival"],
               "refill must be 'step', got refill='arrival'"),
    lambda t: (["--workdir=" + str(t / ("w" * 300))],
               "is 300 bytes, longer than this filesystem allows"),
    _config_list,
    _checkpoints_file,
], ids=["dropout_1", "deadline", "npz_1e300", "fedavg_refill_arrival",
        "long_workdir", "config_json_list", "checkpoints_is_a_file"])
def test_issue31_refusals_exit_2_in_one_line(tmp_path, case):
  args, says = case(tmp_path)
  wd = tmp_path / "w"
  before = sorted(os.listdir(wd)) if wd.exists() else None
  code, _, err = run(f"--flagfile={SMOKE}", f"--workdir={wd}", *args,
                     timeout=120)
  assert code == 2, err
  _one_error_line(err, says)
  assert (sorted(os.listdir(wd)) if wd.exists() else None) == before


def _sweep(*args, timeout=300):
  return run_module("launch.sweep", *args, timeout=timeout)


def run_module(module, *args, timeout=300):
  import subprocess  # pylint: disable=g-import-not-at-top
  p = subprocess.run([sys.executable, "-m", module, *args], cwd=REPO,
                     capture_output=True, text=True, timeout=timeout)
  return p.returncode, p.stdout, p.stderr


# With re-search the deadline is not refused up front (the masks, hence
# the task times, may change), so the run itself finds nothing arrives.
SILENT = ["--rounds=6", "--eval_every=2", "--research_every=10",
          "--checkpoint_every=2"]


@pytest.mark.slow
def test_run_without_updates_exits_4_and_the_sweep_shows_it_failed(
    tmp_path):
  code, out, err = _sweep(f"--flagfile={SMOKE}", *SILENT,
                          "--grid=deadline_s=1e-9,1000", "--parallel=2",
                          f"--sweep_dir={tmp_path}")
  assert code == 1, err
  rows = {r["deadline_s"]: r for r in _strict(
      (tmp_path / "results.json").read_text())}
  silent, fine = rows["1e-9"], rows["1000"]
  assert (fine["status"], fine["exit"]) == ("ok", 0)
  assert fine["final_accuracy"] is not None
  assert (silent["status"], silent["exit"]) == ("failed (no_updates)", 4)
  assert silent["stopped_by"] == "no_updates"
  assert silent["final_accuracy"] is None and silent["rounds"] is None
  assert "failed (no_updates)" in out and "1 run(s) failed" in err
  # The launcher: one line on stderr, exit 4, a summary saying so.
  wd = tmp_path / silent["run"]
  log = (wd / "run.log").read_text()
  line = _one_error_line(log, "main.py: no update arrived, the model is "
                         "untrained: no client update arrived in 4 "
                         "server steps")
  assert "every task was abandoned" in line and str(wd) in line
  s = _strict((wd / "summary.json").read_text())
  assert s["stopped_by"] == "no_updates" and s["client_updates"] == 0
  assert s["rounds"] == 4 and s["failure"] in line
  assert "FAILED (no_updates)" in log
  # Re-run: still no result, the same exit status.
  code, _, err = run(f"--flagfile={SMOKE}", *SILENT, "--deadline_s=1e-9",
                     f"--workdir={wd}", timeout=120)
  assert code == 4 and "no update arrived" in err.splitlines()[-1]


@pytest.mark.slow
def test_compare_shows_a_run_without_updates_as_failed(tmp_path):
  code, out, err = run_module(
      "experiments.compare", f"--flagfile={SMOKE}", *SILENT,
      "--algorithms=ftte,fedbuff", "--algo_flags=ftte:--deadline_s=1e-9",
      "--algo_flags=fedbuff:--research_every=0", f"--compare_dir={tmp_path}",
      timeout=300)
  assert code == 1, err
  data = _strict((tmp_path / "compare.json").read_text())
  by = {r["algorithm"]: r for r in data["rows"]}
  assert by["fedbuff"]["status"] == "ok"
  assert by["fedbuff"]["final_accuracy"] is not None
  assert by["ftte"] == {"algorithm": "ftte", "status": "failed (no_updates)"}
  assert data["failures"] == {"ftte": "failed (no_updates)"}
  assert "ftte" not in data["summaries"]
  md = (tmp_path / "compare.md").read_text()
  assert "failed (no_updates)" in md and "Failed (no values" in md


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
  """A finished 6-round run with checkpoints at 2, 4, 6: (args, workdir,
  summary)."""
  wd = tmp_path_factory.mktemp("finished") / "run"
  args = [f"--flagfile={SMOKE}", "--rounds=6", "--eval_every=2",
          "--checkpoint_every=2"]
  code, _, err = run(*args, f"--workdir={wd}")
  s = _finished_cleanly(code, err, wd)
  return args, wd, s


def _copy(finished, tmp_path):
  args, wd, s = finished
  dst = tmp_path / "run"
  shutil.copytree(wd, dst)
  return [*args, f"--workdir={dst}"], dst, s


def _truncate_data(step):
  """Cuts every data file of a step's state to 10 bytes (tensorstore
  then fails mid-read, with reads of the other files in flight)."""
  for p in (step / "state").rglob("*"):
    if p.is_file() and p.parent.name == "d":
      p.write_bytes(p.read_bytes()[:10])


@pytest.mark.slow
def test_damaged_outputs_of_a_finished_run_are_rebuilt(finished, tmp_path):
  args, wd, want = _copy(finished, tmp_path)
  rows = metrics(wd)
  text = (wd / "summary.json").read_text()
  (wd / "summary.json").write_text(text[:len(text) // 2])
  with open(wd / "metrics.jsonl", "a") as f:
    f.write('{"round": 8, "test_acc')
  code, _, err = run(*args, timeout=120)
  got = _finished_cleanly(code, err, wd)
  assert "summary.json is unreadable" in err and "rebuilding" in err
  assert got["params_sha256"] == want["params_sha256"]
  assert got["final_accuracy"] == want["final_accuracy"]
  assert metrics(wd) == rows
  # Rebuilt once: the next run finds it complete.
  code, _, err = run(*args, timeout=120)
  assert code == 0 and "already complete" in err and "rebuilding" not in err


@pytest.mark.slow
def test_damaged_step_that_cannot_be_moved_is_left_and_the_run_ends_clean(
    finished, tmp_path):
  args, wd, want = _copy(finished, tmp_path)
  (wd / "summary.json").unlink()
  _truncate_data(wd / "checkpoints" / "6")
  (wd / "checkpoints.damaged").write_text("in the way")
  code, _, err = run(*args, timeout=120)
  got = _finished_cleanly(code, err, wd)
  assert "damaged checkpoint step 6 could not be moved" in err
  assert "left in place" in err and "resuming from round 4" in err
  assert got["params_sha256"] == want["params_sha256"]
  assert (wd / "checkpoints" / "6").is_dir()


@pytest.mark.slow
def test_failed_background_save_exits_2_without_hanging(tmp_path):
  # A full disk, as orbax meets it in its background thread: making the
  # step's temporary directory fails.
  site = tmp_path / "site"
  site.mkdir()
  (site / "sitecustomize.py").write_text(
      "import errno, os\n"
      "_makedirs = os.makedirs\n"
      "def makedirs(name, *a, **k):\n"
      "  if 'orbax-checkpoint-tmp' in os.fspath(name):\n"
      "    raise OSError(errno.ENOSPC, 'No space left on device', name)\n"
      "  return _makedirs(name, *a, **k)\n"
      "os.makedirs = makedirs\n")
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(
      [str(site), str(REPO), os.environ.get("PYTHONPATH", "")]))
  wd = tmp_path / "w"
  p = launch(f"--flagfile={SMOKE}", "--rounds=6", "--checkpoint_every=2",
             f"--workdir={wd}", env=env)
  try:
    _, err = p.communicate(timeout=180)
  except Exception:
    p.send_signal(signal.SIGKILL)
    raise
  assert p.returncode == 2
  _one_error_line(err, f"--workdir={wd}: saving checkpoints in "
                  f"{wd / 'checkpoints'} failed")
  assert "No space left on device" in err and not (wd / ".lock").exists()
  assert not (wd / "summary.json").exists()


def test_truncated_parameter_checkpoint_is_a_value_error_naming_it(tmp_path):
  _, params = helpers.tiny_model()
  path = tmp_path / "pre"
  checkpointing.save_params(path, params, {"model": "tiny"})
  for p in (path / "params").rglob("*"):
    if p.is_file() and p.parent.name == "d":
      p.write_bytes(p.read_bytes()[:10])
  with pytest.raises(ValueError, match=rf"^{path}: parameter files unreadable "
                     r"\(.*\); the checkpoint is damaged$"):
    checkpointing.load_params(path, params)
