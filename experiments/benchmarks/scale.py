r"""Scaling benchmark: clients N x clients per step K, FedBuff and FTTE.

  python -m experiments.benchmarks.scale            # the full table
  python -m experiments.benchmarks.scale --num_clients=1000,10000 --ks=10
  python -m experiments.benchmarks.scale --checks   # the issue's two runs

Every row runs in its own fresh process, so its peak host RSS
(``ru_maxrss``) is its own. A row is FedProx Synthetic(1, 1) with
``--examples`` training examples in total, spread evenly over N clients
(``--synthetic_samples_per_client``, at least 2 per client, one of them
held out, so a million clients hold 1M training examples), an MLP
60-200-200-10, C = 2K tasks in flight (rows with 3K > N are skipped),
5 local steps of batch 32, FTTE with memory tiers at 0.5 and 1.0 of full
training (the MLP's smallest trainable subset needs about 28%). It reports the build (data, model,
plan), the compile of the step and the evaluation, then the mean seconds of
``--steps`` server steps after one warm-up step, the client updates per
second (K / seconds per step), and the process's peak RSS.

``--checks`` runs instead: FedBuff with 1,000,000 clients (2 examples each)
for 200 server steps, and FedBuff on Synthetic(1, 1) with its own lognormal
sizes and 10,000 clients, C = 100, K = 10, for its peak RSS.

Results go to ``experiments/benchmarks/results/scale_<backend>.{md,json}``
with the machine line.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time

from absl import app
from absl import flags

REPO = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))
_MARK = "SCALE_ROW "

flags.DEFINE_list("num_clients", ["1000", "10000", "100000", "1000000"],
                  "N values")
flags.DEFINE_list("ks", ["10", "100", "1000"], "K values (C = 2K)")
flags.DEFINE_list("algorithms", ["fedbuff", "ftte"], "presets")
flags.DEFINE_integer("examples", 300_000, "examples in total per row "
                     "(before the per-client hold-out)", lower_bound=1)
flags.DEFINE_integer("steps", 5, "timed server steps per row", lower_bound=1)
flags.DEFINE_bool("checks", False, "run the 1M-client 200-step run and the "
                  "10k-client peak-RSS run instead of the table")
flags.DEFINE_string("out", None, "results prefix; default "
                    "experiments/benchmarks/results/scale_<backend>")
flags.DEFINE_string("worker", None, "internal: JSON of one row to run")
FLAGS = flags.FLAGS


def _row_args(alg: str, n: int, k: int, per_client: int | None,
              rounds: int) -> list[str]:
  args = [f"--algorithm={alg}", "--dataset=synthetic", "--model=mlp",
          f"--num_clients={n}", f"--concurrency={2 * k}",
          f"--buffer_size={k}", "--local_steps=5", "--batch_size=32",
          f"--rounds={rounds}", f"--eval_every={rounds}",
          "--memory_policy=ignore", "--importance=proxy",
          *flags_lib.SCRATCH_ARGS]
  if per_client is not None:
    args.append(f"--synthetic_samples_per_client={per_client}")
  if alg == "ftte":
    # The MLP's smallest trainable subset needs ~28% of full training.
    args.append("--memory_tier_fractions=0.5,1.0")
  return args


def _peak_rss_gib() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20


def work(spec: dict) -> dict:
  """One row in this process: build, compile, time ``steps`` steps."""
  import jax  # pylint: disable=g-import-not-at-top
  from ftte_jax import experiment  # pylint: disable=g-import-not-at-top
  from launch import flags as flags_lib  # pylint: disable=g-import-not-at-top
  t0 = time.perf_counter()
  config = flags_lib.resolve_args(spec["args"]).config
  exp = experiment.build(config)
  state = exp.init_state()
  jax.block_until_ready(state)
  build_s = time.perf_counter() - t0
  compile_s = exp.compile(state)
  state, _ = exp.step_fn(exp.env, state)  # warm-up
  jax.block_until_ready(state)
  t = time.perf_counter()
  for _ in range(spec["steps"]):
    state, _ = exp.step_fn(exp.env, state)
  jax.block_until_ready(state)
  per_step = (time.perf_counter() - t) / spec["steps"]
  k = config.engine.buffer_size
  out = dict(spec, build_s=build_s, compile_s=compile_s,
             s_per_step=per_step, updates_per_s=k / per_step,
             examples=exp.setup.data_info.layout["num_examples"],
             num_devices=exp.num_devices)
  if spec.get("full_run"):
    t = time.perf_counter()
    state, history, timing = exp.run(state)
    out.update(run_s=time.perf_counter() - t, rounds=int(state.version),
               final_accuracy=history[-1]["test_accuracy"],
               stopped_by=timing["stopped_by"])
  out["peak_rss_gib"] = _peak_rss_gib()
  return out


def _spawn(spec: dict) -> dict:
  p = subprocess.run(
      [sys.executable, "-m", "experiments.benchmarks.scale",
       f"--worker={json.dumps(spec)}"], cwd=REPO, capture_output=True,
      text=True)
  lines = [l for l in p.stdout.splitlines() if l.startswith(_MARK)]
  if p.returncode != 0 or not lines:
    return dict(spec, error=(p.stderr.strip().splitlines() or ["?"])[-1])
  return json.loads(lines[-1][len(_MARK):])


def _specs() -> list[dict]:
  if FLAGS.checks:
    return [
        {"name": "1M clients, 200 steps", "algorithm": "fedbuff",
         "n": 1_000_000, "k": 10, "steps": 5, "full_run": True,
         "args": _row_args("fedbuff", 1_000_000, 10, 2, 200)},
        {"name": "10k clients, FedProx sizes", "algorithm": "fedbuff",
         "n": 10_000, "k": 10, "steps": 5,
         "args": [*_row_args("fedbuff", 10_000, 10, None, 20),
                  "--concurrency=100"]}]
  specs = []
  for alg in FLAGS.algorithms:
    for n in map(int, FLAGS.num_clients):
      for k in map(int, FLAGS.ks):
        if 3 * k > n:  # C = 2K tasks plus K to start: needs N >= 3K.
          continue
        per = max(2, round(FLAGS.examples / n))
        specs.append({"name": f"{alg} N={n} K={k}", "algorithm": alg,
                      "n": n, "k": k, "steps": FLAGS.steps,
                      "args": _row_args(alg, n, k, per, 1_000)})
  return specs


def _table(rows: list[dict]) -> str:
  head = ("| run | N | K | examples | build s | compile s | s/step | "
          "updates/s | peak RSS GiB |")
  lines = [head, "|" + "---|" * 9]
  for r in rows:
    if "error" in r:
      lines.append(f"| {r['name']} | {r['n']} | {r['k']} | error: "
                   f"{r['error']} | | | | | |")
      continue
    lines.append(
        f"| {r['name']} | {r['n']:,} | {r['k']:,} | {r['examples']:,} | "
        f"{r['build_s']:.1f} | {r['compile_s']:.1f} | {r['s_per_step']:.3f} |"
        f" {r['updates_per_s']:.0f} | {r['peak_rss_gib']:.2f} |")
  return "\n".join(lines)


def main(argv: list[str]) -> None:
  del argv
  if FLAGS.worker:
    print(_MARK + json.dumps(work(json.loads(FLAGS.worker))), flush=True)
    return
  from experiments.benchmarks.common import machine  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  rows = []
  for spec in _specs():
    rows.append(_spawn(spec))
    print(_table(rows[-1:]).splitlines()[-1], flush=True)
  for r in rows:
    if r.get("full_run") and "error" not in r:
      print(f"{r['name']}: {r['rounds']} steps in {r['run_s']:.0f} s "
            f"(stopped by {r['stopped_by']}), accuracy "
            f"{r['final_accuracy']:.3f}")
  md = f"{machine()}\n\n{_table(rows)}\n"
  out = FLAGS.out or os.path.join(
      REPO, "experiments", "benchmarks", "results",
      f"scale_{'checks_' if FLAGS.checks else ''}{jax.default_backend()}")
  with open(out + ".md", "w") as f:
    f.write(md)
  with open(out + ".json", "w") as f:
    json.dump({"machine": machine(), "rows": rows}, f, indent=1)
  print(md)


if __name__ == "__main__":
  app.run(main)
