"""Natural-client datasets end to end, from the command line (slow).

FEMNIST on generated writers learns above chance, and Shakespeare on a
generated corpus lowers its token loss below a unigram baseline, both under
FTTE's default: a memory-budgeted subset searched for the smallest device
tier (memory_tier_fractions 0.2,1.1,2.0 of full training).

FEMNIST is classification: the engine's classification loss and evaluation
run it as they are. Shakespeare's sequences need the engine to train and
evaluate through ``core/losses.py`` (issue 28): ``Setup.test`` as a batch
dict with its "mask", and ``losses.sequence``'s metrics; until then its test
fails at the first evaluation.
"""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
import natural_files as nf  # noqa: E402  (tests/ on the path)

REPO = Path(__file__).resolve().parents[1]
# A small run: 12 devices, 4 in flight, 2 per server step.
SMALL = ["--num_clients=12", "--concurrency=4", "--buffer_size=2",
         "--local_steps=4", "--batch_size=8", "--eval_every=10",
         "--compilation_cache=off", "--cpu_devices=1"]


def launch_main(*args, timeout=900):
  p = subprocess.run([sys.executable, "-m", "launch.main", *args], cwd=REPO,
                     capture_output=True, text=True, timeout=timeout)
  return p.returncode, p.stdout, p.stderr


def rows(workdir):
  return [json.loads(line) for line in
          (Path(workdir) / "metrics.jsonl").read_text().splitlines()]


def subset_was_searched(workdir) -> bool:
  """The smallest tier trains a subset that fits its budget."""
  s = json.loads((Path(workdir) / "summary.json").read_text())
  config = json.loads((Path(workdir) / "config.json").read_text())
  assert config["experiment"]["engine"]["mask"] == "search"
  full = s["full_model_memory_bytes"]
  # Within 20% of full training's memory, uploading less than the model.
  return min(s["tier_memory_bytes"]) <= 0.2 * full and (
      s["upload_bytes_per_update"] < s["download_bytes_per_update"])


@pytest.mark.slow
def test_femnist_learns_above_chance_under_ftte(tmp_path):
  data = tmp_path / "data"
  # 12 writers, 10 of the 62 classes (chance 0.1 on the test set).
  nf.write_leaf_dataset(data, "femnist", nf.femnist_users(12, 40, seed=0))
  wd = tmp_path / "run"
  code, _, err = launch_main(
      "--dataset=femnist", "--model=femnist_cnn",
      '--model_options={"dense": 64}', f"--data_dir={data}", *SMALL,
      "--rounds=150", "--client_lr=0.1", f"--workdir={wd}")
  assert code == 0, err
  history = rows(wd)
  print([round(r["test_accuracy"], 3) for r in history])
  assert max(r["test_accuracy"] for r in history) > 0.5
  assert subset_was_searched(wd)


@pytest.mark.slow
def test_shakespeare_learns_under_ftte(tmp_path):
  data = tmp_path / "data"
  users = nf.shakespeare_users(12, 60, seed=0)
  nf.write_leaf_dataset(data, "shakespeare", users)
  # The unigram baseline: training characters' frequencies, scored on the
  # test targets (the next character at every position).
  train, test = nf.split_users(users)
  chars = "".join("".join(x[0] for x in xs) + "".join(ys)
                  for xs, ys in train.values())
  freq = {c: chars.count(c) / len(chars) for c in set(chars)}
  targets = "".join(x[1:] + y for xs, ys in test.values()
                    for x, y in zip(xs, ys))
  unigram = -np.mean([np.log(freq.get(c, 1e-9)) for c in targets])
  wd = tmp_path / "run"
  code, _, err = launch_main(
      "--dataset=shakespeare", "--model=char_lstm",
      '--model_options={"hidden": 32, "layers": 1}', f"--data_dir={data}",
      *SMALL, "--rounds=100", "--client_lr=1.0", f"--workdir={wd}")
  assert code == 0, err
  history = rows(wd)
  losses = [r["test_loss"] for r in history]
  print(f"token loss {[round(l, 3) for l in losses]}, unigram "
        f"{unigram:.3f}")
  # In-process with losses.sequence on the same data and options (the
  # engine's steps, this evaluation by hand): 4.44 -> 1.97 against 2.79.
  assert losses[-1] < losses[0] and losses[-1] < unigram - 0.3
  assert subset_was_searched(wd)
