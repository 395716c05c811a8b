"""Smoke tests of the experiment scripts: tiny settings, seconds on a CPU.

They check the scripts' plumbing (arguments, runs, table, JSON), not the
figures; the full-size runs are reported in the issue.
"""

import json

from experiments import mnist_cnn, synthetic_heterogeneity


def test_mnist_cnn_main_runs_and_writes_json(tmp_path, capsys):
  out = tmp_path / "mnist.json"
  # 'tiny' generated images and a small MLP stand in for MNIST + LeNet-5.
  result = mnist_cnn.main([
      "--dataset", "tiny", "--model", "mlp", "--num_clients", "8",
      "--algorithms", "fedbuff", "--partitions", "iid,dirichlet",
      "--buffer_size", "2", "--concurrency", "4", "--local_steps", "1",
      "--batch_size", "8", "--rounds", "2", "--eval_every", "1",
      "--target_accuracy", "0.01", "--quiet", "--out", str(out)])
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


def test_synthetic_heterogeneity_main_runs_and_writes_json(tmp_path, capsys):
  out = tmp_path / "synthetic.json"
  result = synthetic_heterogeneity.main([
      "--settings", "0,0;1,1", "--num_clients", "6",
      "--clients_per_round", "2", "--local_steps", "2", "--rounds", "2",
      "--eval_every", "1", "--report_rounds", "1,2", "--seeds", "0",
      "--out", str(out)])
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
