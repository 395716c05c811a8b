"""FedAvg on FedProx's Synthetic(alpha, beta): does heterogeneity slow it?

Reproduces the qualitative picture of Li et al. (FedProx, 2020, Fig. 2 top
row, FedAvg curves): on Synthetic(0,0), Synthetic(0.5,0.5) and
Synthetic(1,1) -- 30 devices, natural partition, multinomial logistic
regression, 10 devices per round, 20 local SGD steps of batch 10 at lr 0.01
-- more statistical heterogeneity should leave FedAvg further from the
optimum at equal rounds. The raw training loss mixes that with how
separable each set is (larger beta spreads the input means, so the pooled
optimum is lower), so the verdict uses the gap to the pooled (centralized)
optimum, fitted per dataset by full-batch Adam. Several data/model seeds are
averaged, since one draw of the generator can reorder neighbouring settings.

The script assembles the engine from ``planning.load_data``,
``masks.full_plan``, ``fleet.make_fleet`` and ``engine.make_simulator``
directly rather than through ``experiment.build``: it evaluates on every
device's training data and fits the pooled optimum on it, and it seeds the
model with ``PRNGKey(seed)``. The fleet is homogeneous, so FedAvg's virtual
time is just rounds times one task.

Training loss and accuracy are over every device's training examples (equal
weight per example, as FedProx reports); test figures over the union of the
devices' held-out 10%.

The config flags of ``launch.main`` that apply here (engine, fleet,
``--num_clients``, ``--model``, ``--model_options``, ``--rounds``,
``--eval_every``) are this script's flags too, with its defaults
(``DEFAULTS``; ``--buffer_size`` is FedAvg's devices per round);
``--settings`` and ``--seeds`` take the place of ``--synthetic_alpha``,
``--synthetic_beta`` and ``--seed``.

Run: python -m experiments.synthetic_heterogeneity [--out=results.json]
"""

from __future__ import annotations

import json
import os
import tempfile
import time

from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments.benchmarks.common import machine
from ftte_jax import experiment
from ftte_jax import models as models_lib
from ftte_jax.core import engine
from ftte_jax.core import fleet as fleet_lib
from ftte_jax.core import masks as masks_lib
from ftte_jax.experiment import planning
from launch import flags as flags_lib

FLAGS = flags.FLAGS
METRICS = ("train_loss", "gap", "train_accuracy", "test_loss", "test_accuracy")
# FedProx's setting, where it differs from the library's defaults.
DEFAULTS = {
    "algorithm": "fedavg",
    "num_clients": 30,
    "local_steps": 20,
    "batch_size": 10,
    "client_lr": 0.01,
    # 20 tiny steps: a rolled loop compiles faster than an unrolled one.
    "unroll_local_steps": False,
    # No hidden layer: multinomial logistic regression.
    "model": "mlp",
    "model_options": '{"hidden": []}',
    "rounds": 200,
}
# Config flags this script sets itself (settings, seeds) or does not use.
UNUSED = ((flags_lib.section_flags("data") - {"num_clients"}) |
          flags_lib.section_flags("search") |
          {"mask", "last_n_tensors", "seed", "memory_tier_fractions",
           "target_accuracy", "max_virtual_time"})
_OWN_FLAGS = ("settings", "report_rounds", "loss_threshold", "central_steps",
              "seeds", "out")


def define_flags(fv: flags.FlagValues = flags.FLAGS) -> None:
  """Registers the config flags that apply (with ``DEFAULTS``) and its own."""
  flags_lib.define_config_flags(fv, defaults=DEFAULTS, exclude=UNUSED)
  flags.DEFINE_string("settings", "0,0;0.5,0.5;1,1",
                      "';'-separated alpha,beta pairs of Synthetic(alpha, "
                      "beta)", flag_values=fv)
  flags.DEFINE_list("report_rounds", ["20", "50", "100", "200"],
                    "rounds shown in the table (those <= --rounds)",
                    flag_values=fv)
  flags.DEFINE_float("loss_threshold", None, "train loss for rounds-to-loss; "
                     "default: the largest final mean loss among settings, "
                     "times 1.1", flag_values=fv)
  flags.DEFINE_integer("central_steps", 2000, "full-batch Adam steps for the "
                       "pooled optimum", lower_bound=1, flag_values=fv)
  flags.DEFINE_list("seeds", ["0", "1", "2"], "data/model seeds averaged",
                    flag_values=fv)
  flags.DEFINE_string("out", os.path.join(
      tempfile.gettempdir(), "ftte_synthetic_heterogeneity.json"),
                      "JSON file for the results ('' for none)",
                      flag_values=fv)


def make_config(fv: flags.FlagValues, alpha: float, beta: float,
                seed: int) -> experiment.ExperimentConfig:
  """The config of one run on Synthetic(alpha, beta).

  Raises:
    ValueError: an invalid option (the message names it).
  """
  # Synthetic devices have no common pool for a proxy set: from scratch.
  return flags_lib.resolve_args([*flags_lib.SCRATCH_ARGS] +
                                flags_lib.given_args(fv) + [
      "--dataset=synthetic", "--partition=natural",
      f"--synthetic_alpha={alpha}", f"--synthetic_beta={beta}",
      f"--seed={seed}"]).config


def run_one(cfg: experiment.ExperimentConfig,
            central_steps: int) -> tuple[list[dict], dict]:
  """One run on Synthetic(alpha, beta); returns its evaluation rows."""
  seed = cfg.seed
  fed = planning.load_data(cfg)
  data, info = fed.train, fed.info
  x_test, y_test = fed.test["x"], fed.test["y"]
  model = models_lib.get_model(cfg.model, info.num_classes,
                               **cfg.model_options)
  params = model.init(jax.random.PRNGKey(seed),
                      jnp.zeros((1,) + info.input_shape))["params"]
  apply_fn = lambda p, x: model.apply({"params": p}, x)
  fleet = fleet_lib.make_fleet(cfg.fleet, data.num_clients, seed)
  plan = masks_lib.full_plan(params, data.num_clients)
  env = engine.make_environment(cfg.engine, data, fleet, plan)
  sim = engine.make_simulator(cfg.engine, apply_fn,
                              int(np.asarray(env.num_steps).max()))
  step = jax.jit(sim.step, donate_argnums=1)
  evaluate = jax.jit(sim.evaluate)
  x_test, y_test = jnp.asarray(x_test), jnp.asarray(y_test)
  state = jax.jit(sim.init)(jax.random.PRNGKey(seed + 1), env, params, plan)
  # The pooled (centralized) optimum: datasets differ in how separable they
  # are, so the gap to it, not the raw loss, measures FedAvg's slowdown.
  x_all, y_all = env.data.x, env.data.y
  loss_fn = lambda p: optax.softmax_cross_entropy_with_integer_labels(
      apply_fn(p, x_all), y_all).mean()
  opt = optax.adam(0.01)

  @jax.jit
  def fit(p):
    def body(_, c):
      p, o = c
      g = jax.grad(loss_fn)(p)
      u, o = opt.update(g, o, p)
      return optax.apply_updates(p, u), o
    p, _ = jax.lax.fori_loop(0, central_steps, body, (p, opt.init(p)))
    return loss_fn(p)

  central = float(fit(params))
  rows = []

  def log(state):
    tr = evaluate(state.params, {"x": env.data.x, "y": env.data.y})
    te = evaluate(state.params, {"x": x_test, "y": y_test})
    rows.append({"round": int(state.version),
                 "virtual_time_s": float(state.clock),
                 "train_loss": float(tr["test_loss"]),
                 "gap": float(tr["test_loss"]) - central,
                 "train_accuracy": float(tr["test_accuracy"]),
                 "test_loss": float(te["test_loss"]),
                 "test_accuracy": float(te["test_accuracy"])})

  log(state)
  for r in range(1, cfg.rounds + 1):
    state, _ = step(env, state)
    if r % cfg.eval_every == 0 or r == cfg.rounds:
      log(state)
  return rows, {"central_train_loss": central,
                "num_train": info.num_train, "num_test": info.num_test,
                "client_sizes": [int(c) for c in np.asarray(data.counts)]}


def mean_rows(per_seed: list[list[dict]]) -> list[dict]:
  """Averages evaluation rows over seeds (same rounds in every seed)."""
  out = []
  for rows in zip(*per_seed):
    out.append({"round": rows[0]["round"],
                **{m: float(np.mean([r[m] for r in rows])) for m in METRICS}})
  return out


def rounds_to_loss(rows: list[dict], threshold: float) -> int | None:
  """First evaluated round whose training loss is <= threshold."""
  for r in rows:
    if r["train_loss"] <= threshold:
      return r["round"]
  return None


def format_table(settings: list[dict], report_rounds: list[int]) -> str:
  head = (f"{'dataset':<20} {'round':>5} {'train_loss':>10} {'gap':>7} "
          f"{'train_acc':>9} "
          f"{'test_loss':>9} {'test_acc':>8}")
  lines = [head, "-" * len(head)]
  for s in settings:
    for r in s["mean"]:
      if r["round"] in report_rounds:
        lines.append(f"{s['name']:<20} {r['round']:>5d} "
                     f"{r['train_loss']:>10.4f} {r['gap']:>7.4f} "
                     f"{r['train_accuracy']:>9.4f} "
                     f"{r['test_loss']:>9.4f} {r['test_accuracy']:>8.4f}")
  return "\n".join(lines)


def make_configs(
    fv: flags.FlagValues
) -> dict[tuple[float, float, int], experiment.ExperimentConfig]:
  """(alpha, beta, seed) -> config of every run, in the order given.

  Raises:
    ValueError: an invalid option (the message names it).
  """
  try:
    pairs = [tuple(float(v) for v in pair.split(","))
             for pair in fv.settings.split(";")]
  except ValueError:
    pairs = []
  if not pairs or any(len(p) != 2 for p in pairs):
    raise ValueError(f"settings must be ';'-separated alpha,beta pairs, got "
                     f"{fv.settings!r}")
  try:
    seeds = [int(s) for s in fv.seeds]
  except ValueError:
    raise ValueError(f"seeds must be integers, got {fv.seeds}") from None
  return {(a, b, seed): make_config(fv, a, b, seed)
          for a, b in pairs for seed in seeds}


def run_settings(
    fv: flags.FlagValues) -> tuple[list[dict], experiment.ExperimentConfig]:
  """Runs every setting and seed; returns per-setting rows and a config."""
  configs = make_configs(fv)
  pairs = list(dict.fromkeys((a, b) for a, b, _ in configs))
  seeds = list(dict.fromkeys(seed for _, _, seed in configs))
  settings = []
  t0 = time.perf_counter()
  for alpha, beta in pairs:
    name = f"Synthetic({alpha:g},{beta:g})"
    per_seed, data_info = [], []
    for seed in seeds:
      rows, dinfo = run_one(configs[alpha, beta, seed], fv.central_steps)
      per_seed.append(rows)
      data_info.append(dinfo)
      print(f"  {name} seed {seed}: train_loss {rows[0]['train_loss']:.3f} "
            f"-> {rows[-1]['train_loss']:.3f}, test_acc "
            f"{rows[-1]['test_accuracy']:.3f} "
            f"({time.perf_counter() - t0:.0f}s)", flush=True)
    settings.append({"name": name, "alpha": alpha, "beta": beta,
                     "mean": mean_rows(per_seed), "per_seed": per_seed,
                     "data": data_info})
  return settings, next(iter(configs.values()))


def run_all(fv: flags.FlagValues = flags.FLAGS) -> dict:
  """Runs FedAvg on every setting and seed; prints and returns the results."""
  t0 = time.perf_counter()
  settings, cfg = run_settings(fv)
  seeds = [int(s) for s in fv.seeds]
  rounds = cfg.rounds

  # Heterogeneity slows FedAvg if, at every reported round, the mean gap to
  # the pooled optimum rises with (alpha, beta) in the order given; the raw
  # loss ordering is reported too but mixes in how separable each set is.
  report_rounds = [int(r) for r in fv.report_rounds
                   if int(r) <= rounds] + [rounds]
  loss_at = {r: [next(x["train_loss"] for x in s["mean"] if x["round"] == r)
                 for s in settings] for r in sorted(set(report_rounds))
             if any(x["round"] == r for x in settings[0]["mean"])}
  monotone = {r: bool(all(a < b for a, b in zip(v, v[1:])))
              for r, v in loss_at.items()}
  gap_at = {r: [next(x["gap"] for x in s["mean"] if x["round"] == r)
                for s in settings] for r in loss_at}
  gap_monotone = {r: bool(all(a < b for a, b in zip(v, v[1:])))
                  for r, v in gap_at.items()}
  central = {s["name"]: float(np.mean([d["central_train_loss"]
                                       for d in s["data"]]))
             for s in settings}
  threshold = fv.loss_threshold
  if threshold is None:
    threshold = 1.1 * max(s["mean"][-1]["train_loss"] for s in settings)
  to_loss = {s["name"]: rounds_to_loss(s["mean"], threshold)
             for s in settings}
  # Per-seed check at the last round: does every seed show the ordering?
  last = [[s["per_seed"][i][-1]["train_loss"] for s in settings]
          for i in range(len(seeds))]
  per_seed_monotone = [bool(all(a < b for a, b in zip(v, v[1:])))
                       for v in last]
  slows = all(gap_monotone.values())
  table = format_table(settings, report_rounds)
  e = cfg.engine
  steps = (f"{e.local_steps} local steps" if e.local_epochs is None
           else f"{e.local_epochs:g} local epochs")
  print(machine())
  print(f"{e.algorithm}, {cfg.data.num_clients} devices, {e.buffer_size}/"
        f"round, {steps} x batch {e.batch_size}, lr {e.client_lr}, model "
        f"{cfg.model} {json.dumps(cfg.model_options)}; mean of seeds {seeds}")
  print(table)
  print("train loss at round  " + "  ".join(
      f"{r}: " + " < ".join(f"{v:.3f}" for v in vals) +
      (" (monotone)" if monotone[r] else " (NOT monotone)")
      for r, vals in loss_at.items()))
  print("gap to pooled optimum at round  " + "  ".join(
      f"{r}: " + " < ".join(f"{v:.3f}" for v in vals) +
      (" (monotone)" if gap_monotone[r] else " (NOT monotone)")
      for r, vals in gap_at.items()))
  print("pooled-optimum train loss: " + ", ".join(
      f"{k}: {v:.3f}" for k, v in central.items()))
  print(f"rounds to train loss <= {threshold:.3f}: " + ", ".join(
      f"{k}: {v if v is not None else '>' + str(rounds)}"
      for k, v in to_loss.items()))
  print(f"per-seed ordering at round {rounds}: {per_seed_monotone}")
  print(f"heterogeneity slows FedAvg (mean gap to pooled optimum monotone at "
        f"every reported round): {'YES' if slows else 'NO'}   "
        f"wall {time.perf_counter() - t0:.0f}s")
  result = {"machine": machine(),
            "args": flags_lib.flag_values(fv, _OWN_FLAGS), "table": table,
            "settings": settings,
            "train_loss_at_round": {str(r): v for r, v in loss_at.items()},
            "monotone_at_round": {str(r): v for r, v in monotone.items()},
            "gap_at_round": {str(r): v for r, v in gap_at.items()},
            "gap_monotone_at_round": {str(r): v
                                      for r, v in gap_monotone.items()},
            "central_train_loss": central,
            "loss_threshold": threshold, "rounds_to_loss": to_loss,
            "per_seed_monotone_final": per_seed_monotone,
            "heterogeneity_slows_fedavg": slows,
            "wall_s": time.perf_counter() - t0}
  if fv.out:
    os.makedirs(os.path.dirname(os.path.abspath(fv.out)), exist_ok=True)
    with open(fv.out, "w") as f:
      json.dump(result, f, indent=1)
    print(f"wrote {fv.out}")
  return result


main = flags_lib.checked_main(make_configs, run_all)


if __name__ == "__main__":
  flags_lib.run_app(define_flags, main)
