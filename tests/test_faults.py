"""Replays every fault class of issue 13 ("Reliability and security").

One small case per fault a hostile or careless user hit, each asserting the
clean outcome: a refusal naming the flag or file (exit 2, one line, nothing
written), a counted and refused server step, a checkpoint fallback with a
warning, a bounded compile, or a library call that raises. Refusals are
checked in-process where the launcher's checks are callable
(``flags.resolve_args``, ``experiment.build``); a few subprocess runs check
the exit status and stderr end to end. Deeper tests of each class live in
test_launch, test_divergence, test_checkpointing, test_fleet and
test_datasets.
"""

import os

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
from test_launch import SMOKE, run

_OK = "1e9,1e6,1e6,1e12,0"
_HEADER = "speed_flops,bw_up,bw_down,memory_bytes,dropout"


def _trace(tmp_path, last_row, tier=None):
  """A 16-device trace (smoke.flags' num_clients) whose last row is given."""
  head, ok = _HEADER, [_OK] * 15
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
]


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
