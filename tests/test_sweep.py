"""launch.sweep: grid parsing, validation up front, gathering summaries."""

import csv
import json
from pathlib import Path

import pytest

import cli
from launch import sweep

REPO = Path(__file__).resolve().parents[1]
SMOKE = str(REPO / "experiments" / "smoke.flags")


def test_parse_grid():
  assert sweep.parse_grid(["buffer_size=2,4", "--memory_tier_fractions="
                           "0.5,2;1,2"]) == [
                               ("buffer_size", ["2", "4"]),
                               ("memory_tier_fractions", ["0.5,2", "1,2"])]
  for bad, match in [("buffer_size", "NAME="), ("nope=1", "not a config"),
                     ("rounds=1,,2", "empty"),
                     ]:
    with pytest.raises(ValueError, match=match):
      sweep.parse_grid([bad])


def test_make_jobs_validates_every_run():
  jobs = sweep.make_jobs([f"--flagfile={SMOKE}"],
                         sweep.parse_grid(["buffer_size=2,4"]), ["0", "1"])
  assert [j.name for j in jobs] == ["buffer_size-2_seed-0",
                                    "buffer_size-2_seed-1",
                                    "buffer_size-4_seed-0",
                                    "buffer_size-4_seed-1"]
  assert jobs[-1].args[-2:] == ["--buffer_size=4", "--seed=1"]
  with pytest.raises(ValueError, match="buffer_size-9.*buffer_size"):
    sweep.make_jobs([f"--flagfile={SMOKE}"],
                    sweep.parse_grid(["buffer_size=2,9"]), [])


def test_average_over_seeds():
  rows = [{"lr": "a", "final_accuracy": 0.5, "time_to_target_s": 2.0},
          {"lr": "a", "final_accuracy": 0.7, "time_to_target_s": None}]
  (row,) = sweep.average_over_seeds(rows, ["lr"])
  assert row["final_accuracy"] == pytest.approx(0.6)
  assert row["final_accuracy_std"] == pytest.approx(0.1)
  assert row["time_to_target_s"] == 2.0 and row["reached_target"] == "1/2"


@pytest.mark.slow
def test_sweep_gathers_summaries(tmp_path):
  code, stdout, stderr = cli.run(
      [f"--flagfile={SMOKE}", "--rounds=5", "--grid=algorithm=ftte,fedbuff",
       "--seeds=3", "--parallel=2", f"--sweep_dir={tmp_path}",
       "--checkpoint_every=2", "--keep_checkpoints=1"], module="launch.sweep")
  assert code == 0, stderr
  rows = json.loads((tmp_path / "results.json").read_text())
  assert [(r["algorithm"], r["seed"], r["exit"]) for r in rows] == [
      ("ftte", "3", 0), ("fedbuff", "3", 0)]
  for r in rows:
    summary = json.loads((tmp_path / r["run"] / "summary.json").read_text())
    assert r["params_sha256"] == summary["params_sha256"]
    assert r["rounds"] == 5
    assert (tmp_path / r["run"] / "run.log").exists()
    # The checkpoint flags are passed on to every run.
    launch = json.loads((tmp_path / r["run"] / "config.json").read_text())[
        "launch"]
    assert (launch["checkpoint_every"], launch["keep_checkpoints"]) == (2, 1)
  with open(tmp_path / "results.csv") as f:
    assert len(list(csv.DictReader(f))) == 2
  md = (tmp_path / "results.md").read_text()
  assert md.startswith("| run |") and "fedbuff" in md
  assert "algorithm-fedbuff_seed-3" in stdout


@pytest.mark.slow
def test_sweep_bad_grid_exits_2(tmp_path):
  code, _, stderr = cli.run(
      [f"--flagfile={SMOKE}", "--grid=algorithm=ftte,fedasync",
       f"--sweep_dir={tmp_path}"], timeout=120, module="launch.sweep")
  assert code == 2
  assert "Traceback" not in stderr
  assert "algorithm-fedasync" in stderr and "buffer_size" in stderr
  assert not any(tmp_path.iterdir())


def test_compare_arguments_and_rows():
  # experiments.compare runs on launch.sweep's runner; its pure parts here.
  from experiments import compare
  args = compare.algorithm_args(
      [f"--flagfile={SMOKE}", "--rounds=10"], ["ftte", "fedasync", "fedavg"],
      ["fedavg:--local_steps=3"])
  assert "--buffer_size=1" in args["fedasync"]
  assert "--rounds=40" in args["fedasync"]  # K=4 times the shared rounds
  assert args["fedavg"][-3:] == ["--concurrency=4", "--refill=step",
                                 "--local_steps=3"]
  with pytest.raises(ValueError, match="ALG:--flag"):
    compare.algorithm_args([], ["ftte"], ["ftte:rounds=3"])
  rows = compare.comparison_rows({
      "ftte": {"time_to_target_s": 2.0, "peak_device_memory_bytes": 20.0,
               "upload_bytes_per_update": 3.0},
      "fedavg": {"time_to_target_s": 8.0, "peak_device_memory_bytes": 100.0,
                 "upload_bytes_per_update": 10.0}})
  assert rows[0]["speedup_vs_fedavg"] == pytest.approx(0.75)
  assert rows[0]["memory_ratio_vs_fedavg"] == pytest.approx(0.2)
  assert rows[0]["upload_ratio_vs_fedavg"] == pytest.approx(0.3)
  assert rows[1]["speedup_vs_fedavg"] == 0.0


def test_compare_same_updates_for_any_buffer_size():
  from experiments import compare
  # fedavg with its own K=2 against the shared K=4: twice the steps.
  args = compare.algorithm_args([f"--flagfile={SMOKE}"], ["fedavg"],
                                ["fedavg:--buffer_size=2"])["fedavg"]
  assert args[-5:] == ["--concurrency=2", "--refill=step", "--buffer_size=2",
                       "--rounds=40", "--eval_every=10"]
  # Its own --rounds wins: nothing is scaled.
  args = compare.algorithm_args([f"--flagfile={SMOKE}"], ["fedasync"],
                                ["fedasync:--rounds=7"])["fedasync"]
  assert args[-1] == "--rounds=7" and "--eval_every=5" in args


def test_for_algorithm_replaces_what_the_preset_pins():
  from launch import flags as flags_lib
  base = [f"--flagfile={SMOKE}", "--algorithm=fedbuff"]
  args = flags_lib.for_algorithm(base, "fedasync")
  assert "--buffer_size=4" not in args and "--algorithm=fedbuff" not in args
  assert args[-2:] == ["--algorithm=fedasync", "--buffer_size=1"]
  config = flags_lib.resolve_args(args).config
  assert (config.engine.buffer_size, config.engine.concurrency) == (1, 8)
  # The algorithm's own flags are kept, and win, even against a pin.
  args = flags_lib.for_algorithm(base, "fedavg", ["--buffer_size=2"])
  assert args[-4:] == ["--algorithm=fedavg", "--concurrency=2",
                       "--refill=step", "--buffer_size=2"]
  args = flags_lib.for_algorithm(base, "fedavg", ["--concurrency=8"])
  assert args[-3:] == ["--algorithm=fedavg", "--refill=step",
                       "--concurrency=8"]
  with pytest.raises(ValueError, match=r"buffer_size \(4\) and refill must "
                     r"be 'step', got concurrency=8"):
    flags_lib.resolve_args(args)
  # A shared --refill=arrival (for the asynchronous presets) gives way to
  # fedavg's synchronous refill.
  args = flags_lib.for_algorithm([*base, "--refill=arrival"], "fedavg")
  assert "--refill=arrival" not in args and "--refill=step" in args
  assert flags_lib.for_algorithm(base, "ftte")[-1] == "--algorithm=ftte"


def test_checkpoint_flags_are_defined_once_and_passed_on():
  from absl import flags
  from launch import flags as flags_lib
  fv = flags.FlagValues()
  flags_lib.define_checkpoint_flags(fv)
  fv(["sweep", "--checkpoint_every=7", "--overwrite"])
  assert flags_lib.checkpoint_args(fv) == [
      "--checkpoint_every=7", "--keep_checkpoints=3", "--overwrite"]
