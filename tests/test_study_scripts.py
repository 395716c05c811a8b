"""The claims studies' pure parts: seeds, intervals, contrasts, verdicts,
the regime map's grid and outcomes, the scaling study's modes; one slow
end-to-end regime map on generated data."""

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from experiments import aggregate
from experiments import claims
from experiments import compare
from experiments import regime_map
from experiments import scaling_devices

REPO = Path(__file__).resolve().parents[1]
SMOKE = f"--flagfile={REPO / 'experiments' / 'smoke.flags'}"


def _run(acc, t, mem=100.0, up=10.0, end=50.0):
  return {"final_accuracy": acc, "best_accuracy": acc, "time_to_target_s": t,
          "time_to_target_sustained_s": t, "virtual_time_s": end,
          "peak_device_memory_bytes": mem, "upload_bytes_per_update": up,
          "download_bytes_per_update": up, "energy_j": 1.0,
          "energy_to_target_j": None, "mean_staleness": 1.0,
          "eligible_clients": 10}


def test_contrasts_are_paired_by_seed_and_count_unreached_seeds():
  per_seed = {
      0: {"ftte": _run(0.90, 10.0, 20.0, 2.0), "fedbuff": _run(0.92, 5.0),
          "fedavg": _run(0.93, 40.0)},
      1: {"ftte": _run(0.88, 20.0, 20.0, 2.0), "fedbuff": _run(0.91, 8.0),
          "fedavg": _run(0.92, 50.0)},
      2: {"ftte": _run(0.89, None, 20.0, 2.0), "fedbuff": _run(0.90, 9.0),
          "fedavg": _run(0.90, 45.0)}}
  c = aggregate.contrasts(per_seed, ["ftte", "fedbuff", "fedavg"])
  red = c["ftte"]["reduction_vs_fedavg"]
  # Seeds 0 and 1 only: 1 - 10/40 = 0.75 and 1 - 20/50 = 0.6.
  assert (red["seeds"], red["defined"]) == (3, 2)
  assert red["mean"] == pytest.approx(0.675)
  assert red["half_width"] == pytest.approx(
      12.7062047 * math.sqrt(2 * 0.075 ** 2) / math.sqrt(2), rel=1e-6)
  acc = c["ftte"]["accuracy_minus_fedbuff"]
  assert acc["mean"] == pytest.approx(-0.02) and acc["defined"] == 3
  assert c["ftte"]["memory_ratio_vs_fedavg"]["mean"] == pytest.approx(0.2)
  assert c["ftte"]["memory_ratio_vs_fedavg"]["half_width"] == pytest.approx(
      0.0, abs=1e-12)
  s = aggregate.summarize(per_seed, "ftte")
  assert (s["time_to_target_s"]["reached"], s["seeds"]) == (2, 3)
  assert s["time_to_target_s"]["lower_bound_mean"] == pytest.approx(80 / 3)
  assert aggregate.fmt(red, scale=100, unit="%").endswith("[2/3 seeds]")
  assert aggregate.fmt(s["time_to_target_s"]).endswith("(2/3 reached)")


def test_band_is_a_step_function_mean_with_t_interval():
  curves = [[{"virtual_time_s": 0.0, "test_accuracy": 0.1},
             {"virtual_time_s": 2.0, "test_accuracy": 0.5}],
            [{"virtual_time_s": 0.0, "test_accuracy": 0.3},
             {"virtual_time_s": 1.0, "test_accuracy": 0.7},
             {"virtual_time_s": 4.0, "test_accuracy": 0.9}]]
  grid, mean, lo, hi = aggregate.band(curves, points=5)
  np.testing.assert_allclose(grid, [0, 0.5, 1.0, 1.5, 2.0])
  np.testing.assert_allclose(mean, [0.2, 0.2, 0.4, 0.4, 0.6])
  # Two seeds 0.1 and 0.3: s = 0.1414, t_{0.975,1} = 12.706 -> hw 1.2706.
  assert hi[0] - mean[0] == pytest.approx(12.7062047 * 0.1, rel=1e-6)
  assert aggregate.band([])[0].size == 0


@pytest.mark.parametrize("ci,value,at_least,want", [
    ({"mean": 0.85, "low": 0.82, "high": 0.88}, 0.81, True, "held"),
    ({"mean": 0.5, "low": 0.4, "high": 0.6}, 0.81, True, "missed"),
    ({"mean": 0.8, "low": 0.7, "high": 0.9}, 0.81, True, "inconclusive"),
    ({"mean": 0.19, "low": 0.19, "high": 0.19}, 0.2, False, "held"),
    ({"mean": 0.5, "low": 0.45, "high": 0.55}, 0.31, False, "missed"),
    ({"mean": 0.9, "low": None, "high": None}, 0.5, True, "inconclusive"),
    ({"mean": 0.9, "low": 0.85, "high": 0.95, "defined": 2, "seeds": 3},
     0.81, True, "inconclusive"),
])
def test_claim_verdicts(ci, value, at_least, want):
  assert claims.verdict(ci, value, at_least) == want


def test_paper_cell_claims_from_a_cell():
  per_seed = {s: {"ftte": _run(0.90 + s / 100, 10.0, 20.0, 2.0),
                  "fedbuff": _run(0.905 + s / 100, 5.0),
                  "fedavg": _run(0.92, 60.0 + s)} for s in range(5)}
  algs = ["ftte", "fedbuff", "fedavg"]
  cell = {"summary": {a: aggregate.summarize(per_seed, a) for a in algs},
          "contrasts": aggregate.contrasts(per_seed, algs)}
  got = {r["claim"][:2]: r["verdict"]
         for r in claims.paper_cell_claims(cell, "here")}
  # 1 - 10/60 ... 1 - 10/64: 0.833-0.844, the interval above 0.81.
  assert got == {"1.": "held", "2a": "held", "2b": "held", "3.": "held"}
  md = claims.claims_markdown(claims.paper_cell_claims(cell, "here"))
  assert md.count("**held**") == 4


def test_growth_slope_per_seed():
  rows = [{"devices": n, "ftte_reduction_per_seed": {
      "0": 0.5 + 0.1 * math.log10(n / 100), "1": 0.6 + 0.1 * math.log10(
          n / 100)}} for n in (100, 1000, 10000)]
  g = scaling_devices.growth(rows)
  assert g["slope_per_decade"]["mean"] == pytest.approx(0.1)
  assert g["largest_minus_smallest"]["mean"] == pytest.approx(0.2)
  verdict = claims.growth_claim({"fraction": {"ftte": g, "fedbuff": g}})
  # Zero spread: the interval is the point, above 0.
  assert verdict["verdict"] == "held"
  flat = [{"devices": n, "ftte_reduction_per_seed": {"0": 0.5, "1": 0.4}}
          for n in (100, 1000)]
  f = scaling_devices.growth(flat)
  assert claims.growth_claim({"fixed": {"ftte": f, "fedbuff": f}})[
      "verdict"] == "missed"


def test_scaling_modes():
  assert scaling_devices.mode_args(500, "fixed") == []
  # K = 0.02 N, C = 10 K, 3000 updates.
  assert scaling_devices.mode_args(500, "fraction") == [
      "--buffer_size=10", "--concurrency=100", "--rounds=300",
      "--eval_every=10"]
  assert scaling_devices.mode_args(10000, "fraction")[:3] == [
      "--buffer_size=200", "--concurrency=2000", "--rounds=15"]
  # fraction_steps: the same K and C for the study's (or given) steps.
  assert scaling_devices.mode_args(10000, "fraction_steps") == [
      "--buffer_size=200", "--concurrency=2000"]
  b = scaling_devices.study_args([], 2000, "fraction_steps")
  assert "--rounds=300" in b and "--buffer_size=40" in b
  a = scaling_devices.study_args(["--rounds=5"], 2000, "fraction")
  assert "--buffer_size=40" in a and "--rounds=75" in a
  assert "--rounds=5" not in a and a[-1] == "--num_clients=2000"
  with pytest.raises(ValueError, match="modes"):
    scaling_devices.mode_args(100, "linear")


def test_compare_seed_args_and_variants():
  per_seed = compare.seed_args([SMOKE, "--seed=9"], ["ftte", "ftte_time",
                                                     "fedavg"], [], [0, 3])
  assert sorted(per_seed) == [0, 3]
  a = per_seed[3]
  assert "--seed=3" in a["ftte"] and "--seed=9" not in a["ftte"]
  assert "--search_objective=importance_per_time" in a["ftte_time"]
  assert "--algorithm=ftte" in a["ftte_time"]
  assert "--concurrency=4" in a["fedavg"]  # K = 4 in smoke.flags.
  note = compare.policy_note(a)
  assert "exclude" in note and "ftte/ftte_time/fedavg" in note
  with pytest.raises(ValueError, match="unknown 'ftte_fast'"):
    compare.algorithm_args([SMOKE], ["ftte_fast"], [])


def test_regime_map_grid_and_outcomes():
  assert regime_map.mix(0.6) == "mcu:0.6,phone_low:0.2,phone_high:0.2"
  assert regime_map.mix(0.0) == "phone_low:0.5,phone_high:0.5"

  class FV:
    mcu_fractions, straggler_fractions = ["0.2", "0.6"], ["0", "0.9"]
    links, correlations = ["wifi", "3g"], ["0", "0.5", "1"]
  grid = regime_map.cells(FV)
  assert len(grid) == 24 and grid[0] == regime_map.PAPER_CELL
  assert sum(regime_map.is_paper(c) for c in grid) == 1
  flags = regime_map.cell_flags(grid[0])
  assert "--fleet_profile=mcu:0.6,phone_low:0.2,phone_high:0.2" in flags
  assert "--device_correlation=0" in flags

  def summary(reached_f, reached_b):
    return {"ftte": {"time_to_target_s": {"reached": reached_f, "seeds": 3}},
            "fedbuff": {"time_to_target_s": {"reached": reached_b,
                                             "seeds": 3}}}

  def contrast(lt, acc):
    return {"ftte": {"log_time_ratio_vs_fedbuff": {
        "low": lt[0], "high": lt[1]}, "accuracy_minus_fedbuff": {
            "low": acc[0], "high": acc[1]}}}

  out = regime_map.outcome(summary(3, 3), contrast((0.5, 1.0), (0.1, 0.3)))
  assert out == {"time": "worse", "accuracy": "better",
                 "result": "trade-off"}
  out = regime_map.outcome(summary(3, 0), contrast((None, None), (-.1, .1)))
  assert out["time"] == "better" and out["result"] == "win"
  out = regime_map.outcome(summary(0, 0), contrast((None, None),
                                                   (-.3, -.1)))
  assert out == {"time": "neither reached", "accuracy": "worse",
                 "result": "lose"}


@pytest.mark.slow
def test_regime_map_end_to_end_on_generated_data(tmp_path):
  # One cell (the paper-like one) on 'tiny' generated data: runs, resumes
  # from its cache, and writes the report with the claims.
  args = [sys.executable, "-m", "experiments.regime_map",
          f"--out_dir={tmp_path / 'runs'}",
          f"--results={tmp_path / 'rm'}", "--mcu_fractions=0.6",
          "--straggler_fractions=0.9", "--links=wifi", "--correlations=0",
          "--paper_seeds=0,1", "--paper_algorithms=ftte,fedbuff,fedavg",
          "--parallel=2", "--dataset=tiny", "--num_clients=40",
          "--concurrency=8", "--buffer_size=4", "--rounds=4",
          "--eval_every=2", "--target_accuracy=0.3", "--proxy_examples=64",
          "--pretrain_steps=5", "--ring_size=16"]
  proc = subprocess.run(args, cwd=REPO, capture_output=True, text=True,
                        timeout=900)
  assert proc.returncode == 0, proc.stderr[-2000:]
  report = json.loads((tmp_path / "rm.json").read_text())
  (cell,) = report["cells"]
  assert cell["paper_cell"] and cell["runs_done"] == 6
  assert {r["claim"][:2] for r in report["claims"]} == {"1.", "2a", "2b",
                                                         "3.", "3'"}
  assert "## The paper's claims 1-3" in (tmp_path / "rm.md").read_text()
  # A second run finds every summary and runs nothing.
  again = subprocess.run(args, cwd=REPO, capture_output=True, text=True,
                         timeout=300)
  assert again.returncode == 0 and "start " not in again.stderr
