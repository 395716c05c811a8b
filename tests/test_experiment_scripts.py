"""Smoke tests of the experiment scripts: tiny settings, seconds on a CPU.

They check the scripts' plumbing (arguments, runs, table, JSON), not the
figures; the full-size runs are reported in the issue.
"""

import json

import pytest
from absl import flags

import cli
from experiments import mnist_cnn, synthetic_heterogeneity


def parse(script, *args):
  """The script's flags, defined on a fresh FlagValues and parsed."""
  fv = flags.FlagValues()
  script.define_flags(fv)
  fv([script.__name__, *args])
  return fv


@pytest.mark.slow  # runs long: a whole experiment script
def test_mnist_cnn_main_runs_and_writes_json(tmp_path, capsys):
  out = tmp_path / "mnist.json"
  # 'tiny' generated images and a small MLP stand in for MNIST + LeNet-5.
  result = mnist_cnn.run_all(parse(
      mnist_cnn, "--dataset=tiny", "--model=mlp", "--num_clients=8",
      "--algorithms=fedbuff", "--partitions=iid,dirichlet",
      "--buffer_size=2", "--concurrency=4", "--local_steps=1",
      "--batch_size=8", "--rounds=2", "--eval_every=1",
      "--target_accuracy=0.01", "--quiet", f"--out={out}"))
  printed = capsys.readouterr().out
  assert {"machine", "args", "table", "runs"} <= set(result)
  assert len(result["runs"]) == 2
  for run in result["runs"]:
    assert {"algorithm", "partition", "rounds", "final_accuracy",
            "virtual_time_s", "history"} <= set(run)
    assert run["rounds"] == 2
    assert [r["round"] for r in run["history"]] == [0, 1, 2]
    assert 0.0 <= run["final_accuracy"] <= 1.0
    assert run["virtual_time_s"] > 0
  assert "final_acc" in printed and "dirichlet(0.5)" in printed
  assert json.loads(out.read_text())["table"] == result["table"]


@pytest.mark.slow  # runs long: a whole experiment script
def test_synthetic_heterogeneity_main_runs_and_writes_json(tmp_path, capsys):
  out = tmp_path / "synthetic.json"
  result = synthetic_heterogeneity.run_all(parse(
      synthetic_heterogeneity, "--settings=0,0;1,1", "--num_clients=6",
      "--buffer_size=2", "--local_steps=2", "--rounds=2", "--eval_every=1",
      "--report_rounds=1,2", "--seeds=0", f"--out={out}"))
  printed = capsys.readouterr().out
  assert {"table", "settings", "train_loss_at_round", "gap_at_round",
          "monotone_at_round", "central_train_loss",
          "rounds_to_loss", "heterogeneity_slows_fedavg"} <= set(result)
  assert [s["name"] for s in result["settings"]] == [
      "Synthetic(0,0)", "Synthetic(1,1)"]
  for s in result["settings"]:
    assert [r["round"] for r in s["mean"]] == [0, 1, 2]
    for r in s["mean"]:
      assert set(synthetic_heterogeneity.METRICS) <= set(r)
  assert set(result["train_loss_at_round"]) == {"1", "2"}
  assert isinstance(result["heterogeneity_slows_fedavg"], bool)
  assert "train_loss" in printed and "heterogeneity slows FedAvg" in printed
  assert json.loads(out.read_text())["table"] == result["table"]


def test_mnist_cnn_default_configs_are_the_scripts_setting():
  from ftte_jax import experiment
  from ftte_jax.core import algorithms, fleet
  configs = mnist_cnn.make_configs(parse(mnist_cnn))
  assert [(a, p) for a, p, _ in configs] == [
      ("fedavg", "iid"), ("fedavg", "dirichlet"), ("fedbuff", "iid"),
      ("fedbuff", "dirichlet")]
  shared = dict(buffer_size=10, local_steps=10, batch_size=32,
                client_lr=0.1, client_momentum=0.0)
  for alg, part, cfg in configs:
    # As the launcher resolves it ('auto' options take the dataset's values).
    assert cfg == experiment.resolve(experiment.ExperimentConfig(
        engine=algorithms.preset(
            alg, **shared, **({} if alg == "fedavg" else {"concurrency": 20})),
        data=experiment.DataConfig(dataset="mnist", num_clients=100,
                                   partition=part, dirichlet_alpha=0.5,
                                   proxy_examples=0),
        search=experiment.SearchConfig(max_micro_batches=1,
                                       max_upload_fraction=1.0),
        pretrain=experiment.PretrainConfig(steps=0), frozen_weights="ram",
        fleet=fleet.FleetConfig(speed_sigma=0.5, straggler_fraction=0.1,
                                straggler_slowdown=5.0, task_sigma=0.1),
        memory_tier_fractions=None, model="lenet5", rounds=100,
        eval_every=10, target_accuracy=0.95, seed=0))
  # A preset's pins replace the shared values (fedasync: K = 1).
  (_, _, cfg), = mnist_cnn.make_configs(parse(
      mnist_cnn, "--algorithms=fedasync", "--partitions=iid"))
  assert (cfg.engine.buffer_size, cfg.engine.concurrency) == (1, 20)


def test_synthetic_default_config_is_fedprox_setting():
  from ftte_jax.core import algorithms
  configs = synthetic_heterogeneity.make_configs(parse(
      synthetic_heterogeneity, "--settings=0.5,0.5", "--seeds=3"))
  (key, cfg), = configs.items()
  assert key == (0.5, 0.5, 3)
  assert cfg.engine == algorithms.preset(
      "fedavg", buffer_size=10, local_steps=20, batch_size=10,
      client_lr=0.01, unroll_local_steps=False)
  assert (cfg.data.dataset, cfg.data.num_clients, cfg.data.synthetic_alpha,
          cfg.data.synthetic_beta, cfg.seed) == ("synthetic", 30, 0.5, 0.5, 3)
  assert (cfg.model, cfg.model_options, cfg.rounds, cfg.eval_every) == (
      "mlp", {"hidden": []}, 200, 10)
  # Options the script sets itself are not flags.
  fv = parse(synthetic_heterogeneity)
  assert "seed" not in fv and "dataset" not in fv and "rounds" in fv


@pytest.mark.slow
def test_script_bad_flag_exits_2_in_one_line():
  code, _, stderr = cli.run(["--client_lr=-1"], timeout=120,
                            module="experiments.mnist_cnn")
  assert code == 2
  assert "Traceback" not in stderr
  lines = [l for l in stderr.splitlines() if "error:" in l]
  assert len(lines) == 1 and "--client_lr must be a positive" in lines[0]


def test_scaling_devices_changes_only_the_device_count():
  from experiments import scaling_devices
  given = ["--rounds=5", "--target_accuracy=0.3"]
  a, b = (scaling_devices.study_args(given, n) for n in (100, 10000))
  # Same shared setup at every N; the given flags win over the study's.
  assert [x for x in a if not x.startswith("--num_clients")] == [
      x for x in b if not x.startswith("--num_clients")]
  assert a[-1] == "--num_clients=100" and b[-1] == "--num_clients=10000"
  assert "--rounds=5" in a and "--rounds=300" not in a
  assert "--partition=sampled" in a and "--examples_per_client=32" in a
  # Fewer devices than tasks in flight is refused before any run.
  with pytest.raises(ValueError, match="concurrency"):
    scaling_devices.study_args(given, 50)
  row = scaling_devices.rows_of({"rows": [
      {"algorithm": "ftte", "final_accuracy": 0.5, "time_to_target_s": 2.0,
       "speedup_vs_fedavg": 0.8, "memory_ratio_vs_fedavg": 0.2,
       "upload_ratio_vs_fedavg": 0.1},
      {"algorithm": "fedavg", "final_accuracy": 0.6,
       "time_to_target_s": 10.0}]}, 100)
  assert row["ftte_reduction_vs_fedavg"] == 0.8
  assert row["fedbuff_reduction_vs_fedavg"] is None
  assert row["fedavg_time_to_target_s"] == 10.0


@pytest.mark.slow  # runs long: every cell of the study
def test_robustness_runs_each_cell_and_tables_them():
  from experiments import robustness
  cells = robustness.cells(["fedbuff"], ["scale"], ["0.25"], ["none", "median"])
  assert [(c["fraction"], c["defence"]) for c in cells] == [
      (0.0, "none"), (0.0, "median"), (0.25, "none"), (0.25, "median")]
  tiny = ["--dataset=tiny", "--partition=iid", "--num_clients=16",
          "--concurrency=8", "--buffer_size=4", "--rounds=4", "--eval_every=2",
          "--proxy_examples=0", "--pretrain_steps=0"]
  args = robustness.cell_args(tiny, cells[3])
  assert "--malicious_behavior=scale" in args
  assert "--robust_aggregation=median" in args
  rows = [{**c, **robustness.run_cell(robustness.cell_args(tiny, c))}
          for c in cells[2:]]
  assert all(r["finite"] for r in rows)
  assert rows[0]["malicious_clients"] == 4 and rows[1]["values_trimmed"] > 0
  md = robustness.table(rows, ["none", "median"])
  assert "| fedbuff | 25% scale |" in md and "every final model finite: yes" in md


def test_personalization_tables_algorithms_and_tiers():
  from experiments import personalization
  tier = {"tier": 0, "devices": 3, "eligible_devices": 0, "update_share": 0.0,
          "mean_staleness": None}
  summaries = {"fedavg": {"final_accuracy": 0.9, "time_to_target_s": 5.0,
                          "personal_tuned_mean": 0.8,
                          "personal_tuned_p10": 0.5,
                          "tier_fairness": [tier]}}
  rows, tiers = personalization.rows_of(summaries)
  assert rows[0]["tuned_mean"] == 0.8 and rows[0]["mixed_mean"] is None
  assert tiers == [{"algorithm": "fedavg", "tier": 0, "devices": 3,
                    "eligible": 0, "update_share": 0.0,
                    "mean_staleness": None, "global": None, "tuned": None,
                    "mixed": None}]
