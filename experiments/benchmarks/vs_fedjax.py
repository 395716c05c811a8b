r"""Peer benchmark: ftte_jax's synchronous FedAvg against FedJAX's fed_avg.

  python -m experiments.benchmarks.vs_fedjax \
      --fedjax_python=/path/to/fedjax-venv/bin/python

Workload (both sides): real MNIST (the t10k file split by ftte_jax into an
8,000-image pool and 2,000 held-out images), Dirichlet(0.5) partition over
1,000 clients, 100 clients per round sampled uniformly without replacement
from the devices ftte_jax's fleet lets train, 5 local SGD steps of batch 32
(client lr 0.05), data-size-weighted mean of the deltas, server SGD lr 1.0,
10 rounds (1,000 client updates), held-out evaluation at rounds 0 and 10.
ftte_jax's side is exactly ``python -m launch.main --algorithm=fedavg
--model=M --num_clients=1000 --concurrency=100 --buffer_size=100
--rounds=10``; every hyperparameter the FedJAX side uses is read from the
config that command resolves to (its default ``--cpu_devices=auto``
splits the CPU into a device per core and the clients across them;
``--ftte_cpu_devices`` sets it for the steady worker and the e2e runs
alike), and the FedJAX side re-implements the
pool split and the partition in numpy (its interpreter need not have
ftte_jax); the parent checks that both sides hold the same split.

Measured, each in its own fresh subprocess and in one run of this script:
  * steady: updates/s over rounds 2..R (round 1 compiles). ftte_jax: the
    library in-process (``experiment.build`` of the resolved config, the
    jitted server step, block_until_ready after each step); FedJAX: its
    ``fed_avg`` round loop. Each worker also times a jitted f32 matmul
    (2 n^3 FLOPs) and reports its achieved FLOP/s as a fraction of that.
  * end to end: wall time from subprocess start to exit for R rounds,
    first with an empty JAX persistent compilation cache (cold), then with
    the cache the cold run filled (warm). ftte_jax: the launch.main command
    above (it also writes config, metrics, summary and checkpoints);
    FedJAX: a script doing the same training and the two evaluations.
    ``--e2e_repeats`` cold+warm pairs per side (default 3), interleaved,
    each from an emptied cache; the table shows the median wall time (a
    single process on this shared 2-core machine moves by a second or two)
    and the phase lines the run that had it. Before any run, the script
    writes the bytecode of ftte_jax and launch (``compileall``), as pip
    does at install for every package of the FedJAX side: an editable
    install under ``PYTHONDONTWRITEBYTECODE=1`` (this machine's setting)
    would otherwise compile the package's sources in every process.

Cache: ``--cache_dir`` (default ``$JAX_COMPILATION_CACHE_DIR``, else a
temporary directory); each side and model gets its own subdirectory there,
which this script empties before the cold run (it removes nothing else).

Without FedJAX importable by ``--fedjax_python`` the script prints how to
install it and runs only ftte_jax's side (``--side=fedjax``: nothing).
This file runs under both interpreters: only the standard library, absl and
numpy at import time.
"""

# Imports of jax, ftte_jax and fedjax sit inside the functions of the
# interpreter that has them.
# pylint: disable=import-outside-toplevel
from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

from absl import app
from absl import flags
import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))
MODELS = ("mlp", "lenet5")
INSTALL_HINT = (
    "fedjax not importable by {python}: install it in a separate virtual "
    "environment (never into ftte_jax's), e.g.\n"
    "  python3 -m venv ~/fedjax-venv && ~/fedjax-venv/bin/pip install "
    "fedjax==0.0.17 dm-haiku jax\n"
    "then pass --fedjax_python=~/fedjax-venv/bin/python")
_MARK = "VS_FEDJAX_RESULT "  # prefix of a worker's one JSON result line.

FLAGS = flags.FLAGS


# ----------------------------------------------------------------------------
# Shared by both interpreters.


def macs_per_example(model: str) -> int:
  """Multiply-accumulates of one forward pass (28x28x1 input, 'SAME' convs)."""
  if model == "mlp":
    dims = [784, 200, 200, 10]
    return sum(a * b for a, b in zip(dims, dims[1:]))
  if model == "lenet5":
    conv = 28 * 28 * 5 * 5 * 1 * 6 + 14 * 14 * 5 * 5 * 6 * 16
    return conv + 784 * 120 + 120 * 84 + 84 * 10
  raise ValueError(f"model must be one of {MODELS}, got {model!r}")


def flops_per_update(model: str, local_steps: int, batch_size: int) -> int:
  """FLOPs of one client update: steps x batch x 3 passes x 2 x MACs."""
  return local_steps * batch_size * 3 * 2 * macs_per_example(model)


def matmul_peak(n: int, dtype: str = "float32") -> float:
  """FLOP/s of a jitted [n, n] x [n, n] matmul in ``dtype``, best of 10."""
  import jax
  import jax.numpy as jnp
  a = jax.random.normal(jax.random.PRNGKey(0), (n, n), dtype)
  f = jax.jit(jnp.dot)
  f(a, a).block_until_ready()
  best = float("inf")
  for _ in range(10):
    t = time.perf_counter()
    f(a, a).block_until_ready()
    best = min(best, time.perf_counter() - t)
  return 2.0 * n ** 3 / best


def split_digest(clients, y_test) -> str:
  """SHA-256 over every client's examples (as a set) and the test labels.

  Args:
    clients: per client ``(x, y)`` arrays of its examples, in any order.
    y_test: held-out labels.
  """
  h = hashlib.sha256()
  for x, y in clients:
    x = np.asarray(x, np.float32).reshape(len(y), -1)
    rows = sorted(hashlib.sha256(xi.tobytes() + np.int32(yi).tobytes()
                                 ).digest() for xi, yi in zip(x, y))
    h.update(b"".join(rows) + b"|")
  h.update(np.asarray(y_test, np.int32).tobytes())
  return h.hexdigest()


def _steady(times: list[float], k: int) -> float:
  """Updates/s over rounds 2..R (round 1 includes compilation)."""
  rest = times[1:]
  return k * len(rest) / sum(rest) if rest else float("nan")


def _emit(result: dict) -> None:
  print(_MARK + json.dumps(result), flush=True)


# ----------------------------------------------------------------------------
# FedJAX worker (FedJAX's interpreter; ftte_jax not needed).


def _read_idx(path: str, header: int) -> np.ndarray:
  with gzip.open(path, "rb") as f:
    return np.frombuffer(f.read(), np.uint8, offset=header)


def load_split(spec: dict):
  """ftte_jax's MNIST 'pool' split and Dirichlet partition, in numpy.

  Mirrors ``datasets.load_federated`` of mnist: t10k file, hold out
  ``num_test`` images by ``default_rng(seed).permutation``, then
  ``partition.dirichlet`` with seed + 7919 and its empty-client fill.
  """
  root = os.path.join(spec["data_dir"], "mnist")
  x = _read_idx(os.path.join(root, "t10k-images-idx3-ubyte.gz"), 16)
  y = _read_idx(os.path.join(root, "t10k-labels-idx1-ubyte.gz"), 8)
  x = x.reshape(-1, 28, 28, 1).astype(np.float32) / 255.0
  y = y.astype(np.int32)
  perm = np.random.default_rng(spec["seed"]).permutation(len(x))
  te, tr = np.sort(perm[:spec["num_test"]]), np.sort(perm[spec["num_test"]:])
  xtr, ytr, xte, yte = x[tr], y[tr], x[te], y[te]
  n, alpha = spec["num_clients"], spec["dirichlet_alpha"]
  rng = np.random.default_rng(spec["seed"] + 7919)
  parts = [[] for _ in range(n)]
  for c in np.unique(ytr):
    idx = rng.permutation(np.flatnonzero(ytr == c))
    props = rng.dirichlet(np.full(n, float(alpha)))
    cuts = (np.cumsum(props)[:-1] * len(idx)).astype(np.int64)
    for i, chunk in enumerate(np.split(idx, cuts)):
      parts[i].append(chunk)
  parts = [np.concatenate(p).astype(np.int64) for p in parts]
  sizes = np.array([len(p) for p in parts])
  for i in np.flatnonzero(sizes == 0):  # partition._fill_empty
    donor = int(np.argmax(sizes))
    take = int(rng.integers(sizes[donor]))
    parts[i] = parts[donor][take:take + 1]
    parts[donor] = np.delete(parts[donor], take)
    sizes[i], sizes[donor] = 1, sizes[donor] - 1
  return xtr, ytr, [np.sort(p) for p in parts], xte, yte


def _haiku_net(model: str):
  """The model written for FedJAX (haiku), layer for layer ftte_jax's."""
  import haiku as hk
  import jax

  def mlp(x):
    x = hk.Flatten()(x)
    x = jax.nn.relu(hk.Linear(200)(x))
    x = jax.nn.relu(hk.Linear(200)(x))
    return hk.Linear(10)(x)

  def lenet5(x):
    pool = hk.MaxPool((2, 2), (2, 2), "VALID")
    x = pool(jax.nn.relu(hk.Conv2D(6, 5, padding="SAME")(x)))
    x = pool(jax.nn.relu(hk.Conv2D(16, 5, padding="SAME")(x)))
    x = hk.Flatten()(x)
    x = jax.nn.relu(hk.Linear(120)(x))
    x = jax.nn.relu(hk.Linear(84)(x))
    return hk.Linear(10)(x)

  return {"mlp": mlp, "lenet5": lenet5}[model]


def fedjax_worker(spec: dict) -> dict:
  """FedJAX's fed_avg on the spec's workload; times every round."""
  t_start = time.perf_counter()
  import jax
  jax.tree_map = jax.tree_util.tree_map  # FedJAX 0.0.17 on current JAX.
  import fedjax
  import haiku as hk
  t_import = time.perf_counter()
  xtr, ytr, parts, xte, yte = load_split(spec)
  digest = split_digest([(xtr[p], ytr[p]) for p in parts], yte)
  # ftte_jax samples only the devices its fleet lets train: FedJAX gets
  # exactly those clients.
  ids = spec.get("eligible") or list(range(len(parts)))
  fd = fedjax.InMemoryFederatedData({
      f"{i:05d}".encode(): {"x": xtr[parts[i]], "y": ytr[parts[i]]}
      for i in ids})
  net = _haiku_net(spec["model"])
  model = fedjax.create_model_from_haiku(
      hk.transform(lambda batch: net(batch["x"])),
      {"x": xtr[:1], "y": ytr[:1]},
      lambda batch, preds: fedjax.metrics.unreduced_cross_entropy_loss(
          batch["y"], preds),
      {"loss": fedjax.metrics.CrossEntropyLoss(),
       "accuracy": fedjax.metrics.Accuracy()})
  algorithm = fedjax.algorithms.fed_avg.federated_averaging(
      fedjax.model_grad(model), fedjax.optimizers.sgd(spec["client_lr"]),
      fedjax.optimizers.sgd(spec["server_lr"]),
      fedjax.ShuffleRepeatBatchHParams(batch_size=spec["batch_size"],
                                       num_epochs=None,
                                       num_steps=spec["local_steps"]))
  sampler = fedjax.client_samplers.UniformGetClientSampler(
      fd, spec["clients_per_round"], seed=spec["seed"])
  test = fedjax.ClientDataset({"x": xte, "y": yte})
  evaluate = lambda p: {k: float(v) for k, v in fedjax.evaluate_model(
      model, p, test.padded_batch(batch_size=spec["eval_batch_size"])).items()}
  state = algorithm.init(model.init(jax.random.PRNGKey(spec["seed"])))
  jax.block_until_ready(state.params)
  t_build = time.perf_counter()
  first_eval = evaluate(state.params)  # launch.main evaluates round 0 too.
  times = []
  for _ in range(spec["rounds"]):
    t = time.perf_counter()
    state, _ = algorithm.apply(state, sampler.sample())
    jax.block_until_ready(state.params)
    times.append(time.perf_counter() - t)
  final = evaluate(state.params)
  t_end = time.perf_counter()
  return {"side": "fedjax", "jax": jax.__version__,
          "backend": jax.default_backend(), "split_digest": digest,
          "round_s": times, "import_s": t_import - t_start,
          "build_s": t_build - t_import, "loop_s": t_end - t_build,
          "accuracy_round0": first_eval["accuracy"],
          "final_accuracy": final["accuracy"], "final_loss": final["loss"]}


# ----------------------------------------------------------------------------
# ftte_jax (its own interpreter).


def ftte_args(model: str) -> list[str]:
  """The launch.main flags of ftte_jax's side."""
  from launch import flags as flags_lib
  k = FLAGS.clients_per_round
  return (["--algorithm=fedavg", f"--model={model}",
           f"--num_clients={FLAGS.num_clients}", f"--concurrency={k}",
           f"--buffer_size={k}", f"--rounds={FLAGS.rounds}",
           # FedJAX trains from scratch on every pool example.
           *flags_lib.SCRATCH_ARGS] +
          list(FLAGS.ftte_extra))


def ftte_worker(spec: dict) -> dict:
  """The resolved launch.main config, built and stepped in-process."""
  t_start = time.perf_counter()
  from launch import flags as flags_lib
  # As launch.main does before JAX starts: the same devices as e2e's runs.
  flags_lib.set_cpu_devices(spec["cpu_devices"])
  import jax
  from ftte_jax import experiment
  t_import = time.perf_counter()
  exp = experiment.build(flags_lib.resolve_args(spec["ftte_args"]).config)
  t_build = time.perf_counter()
  state = exp.init_state()
  jax.block_until_ready(state)
  t_init = time.perf_counter()
  compile_s = exp.compile(state)
  first_eval = exp.evaluate(state.params)
  times = []
  for _ in range(spec["rounds"]):
    t = time.perf_counter()
    state, _ = exp.step_fn(exp.env, state)
    jax.block_until_ready(state)
    times.append(time.perf_counter() - t)
  final = exp.evaluate(state.params)
  t_end = time.perf_counter()
  return {"side": "ftte", "jax": jax.__version__,
          "backend": jax.default_backend(), "round_s": times,
          "mesh_devices": exp.num_devices,
          "import_s": t_import - t_start, "build_s": t_build - t_import,
          "init_s": t_init - t_build, "compile_s": compile_s,
          "loop_s": t_end - t_init - compile_s,
          "accuracy_round0": first_eval["test_accuracy"],
          "final_accuracy": final["test_accuracy"],
          "final_loss": final["test_loss"]}


def workload_spec(model: str) -> dict:
  """Resolves ftte_jax's config for ``model``: the FedJAX side's settings."""
  from ftte_jax import experiment
  from ftte_jax.data import datasets
  from launch import flags as flags_lib
  args = ftte_args(model)
  config = flags_lib.resolve_args(args).config
  e, d = config.engine, config.data
  spec = {"model": model, "ftte_args": args,
          "cpu_devices": FLAGS.ftte_cpu_devices, "rounds": config.rounds,
          "clients_per_round": e.buffer_size, "local_steps": e.local_steps,
          "batch_size": e.batch_size, "client_lr": e.client_lr,
          "server_lr": e.server_lr, "eval_batch_size": e.eval_batch_size,
          "num_clients": d.num_clients, "num_test": d.num_test,
          "dirichlet_alpha": d.dirichlet_alpha, "seed": config.seed,
          "data_dir": str(datasets.default_data_dir(d.data_dir)),
          "flops_per_update": flops_per_update(model, e.local_steps,
                                               e.batch_size)}
  same = (e.algorithm == "fedavg" and e.concurrency == e.buffer_size and
          e.client_momentum == 0 and e.server_optimizer == "sgd" and
          e.local_epochs is None and d.dataset == "mnist" and
          d.proxy_examples == 0 and config.pretrain.steps == 0 and
          d.partition == "dirichlet" and e.data_weight_exponent == 1.0 and
          e.mask == "full" and e.variance_beta == 0)
  if not same:
    spec["mismatch"] = ("the FedJAX side reproduces only FedAvg with plain "
                        "SGD on the MNIST pool split, Dirichlet partition")
    return spec
  exp = experiment.build(config)  # no compilation: data, fleet, plan.
  data = exp.setup.data
  x, y = np.asarray(data.x), np.asarray(data.y)
  clients = [(x[data.rows(i)], y[data.rows(i)])
             for i in range(data.num_clients)]
  spec["eligible"] = [int(i) for i in np.flatnonzero(
      np.asarray(exp.env.eligible))]
  spec["split_digest"] = split_digest(clients, np.asarray(exp.setup.test["y"]))
  return spec


# ----------------------------------------------------------------------------
# Parent: subprocesses and the report.


def _env(cache: str | None) -> dict:
  env = dict(os.environ)
  env.pop("JAX_COMPILATION_CACHE_DIR", None)
  if cache:
    env["JAX_COMPILATION_CACHE_DIR"] = cache
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = str(
        FLAGS.cache_min_compile_s)
    env["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
  return env


def _run(cmd: list[str], env: dict) -> tuple[float, str, float]:
  """Runs ``cmd`` from the repository root.

  Returns:
    (wall seconds, stdout, 1-minute load average at exit): the load says
    how much other work shared the machine (2 cores here) during the run.
  """
  t = time.perf_counter()
  p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True,
                     timeout=FLAGS.timeout_s, check=False)
  wall = time.perf_counter() - t
  if p.returncode:
    raise RuntimeError(f"{' '.join(cmd)} exited {p.returncode}:\n"
                       f"{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
  return wall, p.stdout, os.getloadavg()[0]


def _worker(python: str, side: str, spec_path: str, peak: bool,
            cache: str | None) -> tuple[float, dict, float]:
  cmd = [python, os.path.abspath(__file__), f"--worker={side}",
         f"--spec={spec_path}", f"--peak={peak}",
         f"--matmul_n={FLAGS.matmul_n}"]
  wall, out, load = _run(cmd, _env(cache))
  line = [l for l in out.splitlines() if l.startswith(_MARK)][-1]
  return wall, json.loads(line[len(_MARK):]), load


def _cache_files(path: str) -> int:
  return len(os.listdir(path)) if os.path.isdir(path) else 0


def _fresh(path: str) -> str:
  shutil.rmtree(path, ignore_errors=True)
  os.makedirs(path)
  return path


def fedjax_importable(python: str) -> bool:
  code = ("import jax; jax.tree_map = jax.tree_util.tree_map; "
          "import fedjax, haiku")
  try:
    return subprocess.run([python, "-c", code], capture_output=True,
                          timeout=300, check=False).returncode == 0
  except OSError:
    return False


def bench_model(model: str, sides: list[str], cache_root: str,
                tmp: str) -> dict:
  """Steady (both sides, with matmul peak) then cold and warm end to end."""
  spec = workload_spec(model)
  if "mismatch" in spec and "fedjax" in sides:
    print(f"[{model}] {spec['mismatch']}; FedJAX side skipped", flush=True)
    sides = [s for s in sides if s != "fedjax"]
  spec_path = os.path.join(tmp, f"spec-{model}.json")
  with open(spec_path, "w") as f:
    json.dump(spec, f)
  k, n_upd = spec["clients_per_round"], spec["clients_per_round"] * spec[
      "rounds"]
  python = {"ftte": sys.executable, "fedjax": FLAGS.fedjax_python}
  out = {"model": model, "spec": {k_: v for k_, v in spec.items()
                                  if k_ != "eligible"},
         "eligible_clients": len(spec.get("eligible", [])),
         "client_updates": n_upd, "sides": {}}
  for rep in range(FLAGS.repeats):
    for side in sides:  # interleaved, so drift in machine load hits both.
      wall, r, load = _worker(python[side], side, spec_path, True, None)
      r["steady_updates_per_s"] = _steady(r["round_s"], k)
      r["steady_process_wall_s"], r["load1"] = wall, load
      print(f"[{model}] {side} steady (repeat {rep + 1}) "
            f"{r['steady_updates_per_s']:.1f} upd/s; matmul peak "
            f"{r['matmul_peak_flops_per_s'] / 1e9:.1f} GFLOP/s", flush=True)
      best = out["sides"].get(side)
      peaks = (best or {}).get("matmul_peaks", []) + [
          r["matmul_peak_flops_per_s"]]
      steadies = (best or {}).get("steady_repeats", []) + [
          r["steady_updates_per_s"]]
      if best is None or r["steady_updates_per_s"] > best[
          "steady_updates_per_s"]:
        best = r
      best.update(matmul_peaks=peaks, steady_repeats=steadies)
      out["sides"][side] = best
  for side, r in out["sides"].items():
    r["steady_flops_per_s"] = r["steady_updates_per_s"] * spec[
        "flops_per_update"]
    if side == "fedjax" and "split_digest" in spec:
      r["same_split"] = r["split_digest"] == spec["split_digest"]
      if not r["same_split"]:
        print(f"[{model}] WARNING: FedJAX's split differs from ftte_jax's",
              flush=True)
  if not FLAGS.e2e:
    return out
  caches = {s: os.path.join(cache_root, f"{s}-{model}") for s in sides}
  runs = {(s, p): [] for s in sides for p in ("cold", "warm")}
  for rep in range(FLAGS.e2e_repeats):
    for s in sides:
      _fresh(caches[s])  # each repeat starts cold.
    for phase in ("cold", "warm"):
      for side in sides:  # interleaved, so drift in machine load hits both.
        e = _e2e_once(side, phase, spec, spec_path, python[side],
                      caches[side], os.path.join(tmp, f"run-{model}-{phase}"))
        runs[(side, phase)].append(e)
        print(f"[{model}] {side} end to end ({phase} cache, repeat "
              f"{rep + 1}) {e['wall_s']:.1f} s = {e['updates_per_s']:.1f} "
              "upd/s", flush=True)
  for (side, phase), rs in runs.items():
    # The run of median wall time, so its phases are one real run's.
    med = sorted(rs, key=lambda e: e["wall_s"])[(len(rs) - 1) // 2]
    out["sides"][side][f"e2e_{phase}"] = {
        **med, "walls_s": [e["wall_s"] for e in rs]}
  return out


def _e2e_once(side: str, phase: str, spec: dict, spec_path: str,
              python: str, cache: str, workdir: str) -> dict:
  """One end-to-end process of ``side`` with the compilation cache at
  ``cache``: its wall time and phases."""
  n_upd = spec["clients_per_round"] * spec["rounds"]
  before = _cache_files(cache)
  if side == "ftte":
    workdir = _fresh(workdir)
    wall, _, load = _run([sys.executable, "-m", "launch.main"] +
                         spec["ftte_args"] +
                         [f"--cpu_devices={spec['cpu_devices']}",
                          f"--workdir={workdir}"],
                         _env(cache))
    with open(os.path.join(workdir, "summary.json")) as f:
      s = json.load(f)
    # summary.json: build_s (data, model, fleet, plan), run_s (compile,
    # evaluations and the R steps); the rest of the wall is interpreter
    # start, imports, the round-0 state, checkpoint and output writing.
    extra = {"build_s": s["build_s"], "run_s": s["wall_s"],
             "compile_s": s["compile_s"],
             "summary_updates_per_s": s["client_updates_per_s"],
             "final_accuracy": s["final_accuracy"],
             "compilation_cache": ",".join(
                 f"{k} {v}" for k, v in s["compilation_cache"].items())}
    extra["other_s"] = wall - extra["build_s"] - extra["run_s"]
  else:
    wall, r, load = _worker(python, side, spec_path, False, cache)
    extra = {k_: r[k_] for k_ in ("import_s", "build_s", "loop_s",
                                  "final_accuracy")}
    # interpreter start and exit.
    extra["other_s"] = wall - r["import_s"] - r["build_s"] - r["loop_s"]
  return {"wall_s": wall, "updates_per_s": n_upd / wall, "load1": load,
          "cache_entries_before": before,
          "cache_entries_after": _cache_files(cache), **extra}


def _ratio(a, b):
  return a / b if a and b else None


def table(results: list[dict]) -> str:
  """The README-ready markdown table."""
  head = ("| model | side | steady upd/s | % of matmul peak | end-to-end cold "
          "s (upd/s) | end-to-end warm s (upd/s) | final acc |\n"
          "|---|---|---:|---:|---:|---:|---:|")
  lines = [head]
  fmt = lambda e: (f"{e['wall_s']:.1f} ({e['updates_per_s']:.1f})" if e
                   else "-")
  for res in results:
    sides = res["sides"]
    for side, r in sides.items():
      lines.append(
          f"| {res['model']} | {'ftte_jax' if side == 'ftte' else 'FedJAX'} "
          f"| {r['steady_updates_per_s']:.1f} | {100 * r['peak_fraction']:.2f}"
          f" | {fmt(r.get('e2e_cold'))} | {fmt(r.get('e2e_warm'))} | "
          f"{r['final_accuracy']:.3f} |")
    if len(sides) == 2:
      a, b = sides["ftte"], sides["fedjax"]
      rat = lambda key: _ratio((a.get(key) or {}).get("updates_per_s"),
                               (b.get(key) or {}).get("updates_per_s"))
      cell = lambda x: f"**{x:.2f}x**" if x else "-"
      steady = _ratio(a["steady_updates_per_s"], b["steady_updates_per_s"])
      lines.append(
          f"| {res['model']} | **ftte_jax / FedJAX** | {cell(steady)} | | "
          f"{cell(rat('e2e_cold'))} | {cell(rat('e2e_warm'))} | |")
  return "\n".join(lines)


def phases(results: list[dict]) -> str:
  """Where each side's end-to-end time goes (seconds, from the workers)."""
  lines = []
  for res in results:
    for side, r in res["sides"].items():
      keys = [k for k in ("import_s", "build_s", "init_s", "compile_s",
                          "loop_s") if k in r]
      first, rest = r["round_s"][0], sum(r["round_s"][1:])
      lines.append(f"{res['model']:7} {side:6} " + "  ".join(
          f"{k[:-2]} {r[k]:.2f}" for k in keys) +
                   f"  round1 {first:.2f}  rounds2..R {rest:.2f}  load1 "
                   f"{r['load1']:.1f}")
      for phase in ("e2e_cold", "e2e_warm"):
        e = r.get(phase)
        if e:
          detail = "  ".join(f"{k} {v:.2f}" for k, v in e.items()
                             if isinstance(v, float) and k not in (
                                 "wall_s", "updates_per_s", "load1"))
          walls = "/".join(f"{w:.1f}" for w in e.get("walls_s", []))
          lines.append(f"{'':15}{phase}: wall {e['wall_s']:.2f} (of "
                       f"{walls})  {detail}  cache entries "
                       f"{e['cache_entries_before']}->"
                       f"{e['cache_entries_after']}  load1 {e['load1']:.1f}"
                       + (f"  programs {e['compilation_cache']}"
                          if "compilation_cache" in e else ""))
  return "\n".join(lines)


def _workload_line(res: dict) -> str:
  sp, sides = res["spec"], res["sides"]
  line = (f"{res['model']}: {sp['num_clients']} clients, "
          f"{res['eligible_clients'] or sp['num_clients']} eligible, "
          f"{sp['clients_per_round']} per round, {sp['rounds']} rounds, "
          f"{sp['local_steps']} steps x batch {sp['batch_size']}, client lr "
          f"{sp['client_lr']}, server lr {sp['server_lr']}; steady repeats "
          "(upd/s): " + ", ".join(
              f"{s} " + "/".join(f"{v:.1f}" for v in r["steady_repeats"])
              for s, r in sides.items()))
  if "ftte" in sides:
    line += (f"; ftte's clients on {sides['ftte'].get('mesh_devices', 1)} "
             f"CPU device(s) (--cpu_devices={sp['cpu_devices']})")
  if "fedjax" in sides:
    line += (", same split on both sides" if sides["fedjax"].get(
        "same_split") else ", SPLITS DIFFER")
  return line


def parent() -> int:
  for m in FLAGS.models:
    if m not in MODELS:
      raise app.UsageError(f"--models: {m!r} is not one of {list(MODELS)}")
  sides = ["ftte", "fedjax"] if FLAGS.side == "both" else [FLAGS.side]
  fedjax_ok = "fedjax" in sides and fedjax_importable(FLAGS.fedjax_python)
  if "fedjax" in sides and not fedjax_ok:
    print(INSTALL_HINT.format(python=FLAGS.fedjax_python), flush=True)
    sides.remove("fedjax")
    if not sides:
      return 0
  from experiments.benchmarks.common import machine
  import compileall
  for package in ("ftte_jax", "launch"):
    compileall.compile_dir(os.path.join(REPO, package), quiet=1)
  tmp = tempfile.mkdtemp(prefix="vs_fedjax-")
  cache_root = FLAGS.cache_dir or os.path.join(tmp, "jax-cache")
  try:
    results = [bench_model(m, sides, cache_root, tmp) for m in FLAGS.models]
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  # One denominator for every fraction: the best matmul any worker timed
  # (a shared, noisy machine only ever makes a measurement slower).
  peak = max([p for res in results for r in res["sides"].values()
              for p in r["matmul_peaks"]], default=float("nan"))
  for res in results:
    for r in res["sides"].values():
      r["peak_fraction"] = r["steady_flops_per_s"] / peak
  report = {"machine": machine(), "argv": sys.argv[1:],
            "matmul_peak_flops_per_s": peak, "matmul_n": FLAGS.matmul_n,
            "fedjax_python": FLAGS.fedjax_python if fedjax_ok else None,
            "fedjax_importable": fedjax_ok, "results": results,
            "table": table(results)}
  text = "\n".join([
      f"machine: {report['machine']}",
      f"command: python -m experiments.benchmarks.vs_fedjax "
      f"{' '.join(sys.argv[1:])}", "",
      report["table"], "",
      f"% of matmul peak: steady FLOP/s (steps x batch x 3 x 2 x MACs per "
      f"update: " + ", ".join(
          f"{res['model']} {res['spec']['flops_per_update'] / 1e6:.1f} MFLOP"
          for res in results) + f") over the best jitted f32 "
      f"{FLAGS.matmul_n}^2 matmul any worker timed, {peak / 1e9:.1f} "
      "GFLOP/s.", "",
      "Workload per model: " + "; ".join(_workload_line(res)
                                         for res in results), "",
      "Seconds per phase (steady workers; e2e from launch.main's summary or "
      "the FedJAX worker); load1: 1-minute load average as the subprocess "
      f"exited (this machine has {os.cpu_count()} cores; more means other "
      "work competed):", phases(results)])
  print("\n" + text, flush=True)
  if FLAGS.out:
    os.makedirs(os.path.dirname(os.path.abspath(FLAGS.out)), exist_ok=True)
    with open(FLAGS.out + ".txt", "w") as f:
      f.write(text + "\n")
    with open(FLAGS.out + ".json", "w") as f:
      json.dump(report, f, indent=1)
  return 0


def define_flags() -> None:
  """Registers the flags; only when run, so importing this module (tests)
  does not clash with launch.main's --rounds and --num_clients."""
  flags.DEFINE_enum("side", "both", ["ftte", "fedjax", "both"],
                    "which side(s) to run")
  flags.DEFINE_list("models", list(MODELS), f"models, of {list(MODELS)}")
  flags.DEFINE_integer("num_clients", 1000, "clients N")
  flags.DEFINE_integer("clients_per_round", 100, "K = C of ftte's fedavg")
  flags.DEFINE_integer("rounds", 10, "rounds R (R * K client updates)")
  flags.DEFINE_list("ftte_extra", [], "extra launch.main flags, e.g. "
                    "--ftte_extra=--dataset=tiny (tests; ftte side only)")
  flags.DEFINE_string("ftte_cpu_devices", "auto", "launch.main's "
                      "--cpu_devices for ftte's side (steady and e2e)")
  flags.DEFINE_string("fedjax_python", sys.executable,
                      "interpreter that can import fedjax")
  flags.DEFINE_string("cache_dir",
                      os.environ.get("JAX_COMPILATION_CACHE_DIR"),
                      "parent of the per-side persistent compilation caches")
  flags.DEFINE_float("cache_min_compile_s", 0.0, "JAX persistent cache: "
                     "cache compilations longer than this (both sides)")
  flags.DEFINE_integer("repeats", 1, "steady runs per side (interleaved); "
                       "the best is reported", lower_bound=1)
  flags.DEFINE_bool("e2e", True, "also run cold and warm end-to-end runs")
  flags.DEFINE_integer("e2e_repeats", 3, "cold+warm end-to-end pairs per "
                       "side (interleaved, each from an empty cache); the "
                       "table shows the median wall time")
  flags.DEFINE_integer("matmul_n", 2048, "size of the peak-FLOP/s matmul")
  flags.DEFINE_string("out", os.path.join(REPO, "experiments", "benchmarks",
                                          "results", "vs_fedjax_cpu"),
                      "write <out>.txt and <out>.json ('' : don't)")
  flags.DEFINE_integer("timeout_s", 1800, "per-subprocess time limit")
  # Internal: a worker process.
  flags.DEFINE_enum("worker", None, ["ftte", "fedjax"], "internal")
  flags.DEFINE_string("spec", None, "internal: workload JSON file")
  flags.DEFINE_bool("peak", True, "internal: time the matmul peak")


def main(argv: list[str]) -> int:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  if FLAGS.worker is None:
    return parent()
  with open(FLAGS.spec) as f:
    spec = json.load(f)
  if FLAGS.worker == "ftte":
    sys.path.insert(0, REPO)
    result = ftte_worker(spec)
  else:
    result = fedjax_worker(spec)
  result["flops_per_update"] = spec["flops_per_update"]
  if FLAGS.peak:
    result["matmul_peak_flops_per_s"] = matmul_peak(FLAGS.matmul_n)
  _emit(result)
  return 0


if __name__ == "__main__":
  define_flags()
  app.run(main)
