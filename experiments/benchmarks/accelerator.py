r"""The accelerator benchmark: one command on any backend, bounded in time.

  python -m experiments.benchmarks.accelerator --budget_s=300 \
      --out=experiments/benchmarks/results/accelerator_gpu.json
  python -m experiments.benchmarks.accelerator --smoke --out=/tmp/a.json

For the MLP and LeNet-5 at K = 100, 1,000 and 10,000 clients a step, over
N = 100,000 clients (and N = 1,000,000 for the MLP), it compiles and times
the engine's server step (synchronous FedAvg: C = K, 5 local SGD steps of
batch 32) and records, per row: seconds per step (median of ``--steps``
timed steps after one warm-up), client updates per second, compile
seconds, the step's device memory (``Compiled.memory_analysis``: the
program's arguments, fresh outputs and temporaries, exact for the program)
and the allocator's peak so far (``memory_stats``; cumulative over the
process, so it is the largest row so far, not this row alone).

Rows, in the order they run (``--budget_s`` stops the run between rows,
and shortens a row's timed steps, so that it ends in time and still writes
what it measured; the JSON is rewritten after every row):
  1. ``auto``: ``client_chunk=0``, the memory plan on the device's own
     memory (``ftte_jax/experiment/memory_plan.py``): vmap where all K
     fit, else streamed chunks; float32;
  2. FedJAX's ``fed_avg`` on the same workload (same model, K, steps,
     batch, learning rates, data shape), when ``--fedjax_python`` can
     import it (docs/accelerators.md: how to carry its wheels); else
     skipped;
  3. ``vmap`` (all K at once) and ``map`` (``lax.map``, one client at a
     time, the CPU's path), float32; a vmap row the plan measured over the
     device's memory is recorded as skipped, not run;
  4. the MLP at N = 1,000,000 (auto);
  5. bfloat16 (auto): ``compute_dtype=bfloat16``.

Data: a synthetic pool of 28x28x1 examples (``--pool`` of them); client i
holds the ``counts[i]`` rows from ``offsets[i]`` (windows of the pool that
may overlap), so a million clients cost two int32 vectors, and a client's
training costs what it would on its own data.

Roofline: the step's FLOPs against the device's peak. Two counts: the
model's (5 steps x 32 examples x 3 passes x 2 x multiply-adds, per update,
as ``vs_fedjax.py`` counts them) and XLA's (``cost_analysis`` of one
client's local step, loop-free, times steps and K; the step program's own
``cost_analysis`` counts each loop body once and is recorded raw). Peaks:
``PEAKS`` (datasheets, dense) where the device is known, and a jitted
matmul timed here (f32 and bf16) on every backend.

This file runs under FedJAX's interpreter too (``--worker=fedjax``): only
the standard library, absl and numpy at import time.
"""

# pylint: disable=import-outside-toplevel
from __future__ import annotations

import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time

from absl import app
from absl import flags
import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))
RESULTS = os.path.join(REPO, "experiments", "benchmarks", "results")
_MARK = "ACCELERATOR_ROW "
UNAVAILABLE_BF16 = "unavailable: compute_dtype not implemented"

# Dense peak FLOP/s per chip from the vendors' datasheets (sparsity
# figures halved away). f32 matmuls on NVIDIA tensor cores run as TF32
# when XLA is allowed to (JAX's default precision); the f32 column is the
# CUDA cores' rate. TPUs multiply f32 in bf16 passes: bf16 bounds them.
PEAKS = {
    "H100 SXM": dict(f32=67e12, tf32=494.7e12, bf16=989.4e12,
                     source="NVIDIA H100 Tensor Core GPU datasheet (SXM5)"),
    "H100 PCIe": dict(f32=51e12, tf32=378e12, bf16=756e12,
                      source="NVIDIA H100 Tensor Core GPU datasheet (PCIe)"),
    "H200": dict(f32=67e12, tf32=494.7e12, bf16=989.4e12,
                 source="NVIDIA H200 Tensor Core GPU datasheet (SXM)"),
    "A100": dict(f32=19.5e12, tf32=156e12, bf16=312e12,
                 source="NVIDIA A100 Tensor Core GPU datasheet (SXM)"),
    "TPU v4": dict(f32=None, tf32=None, bf16=275e12,
                   source="Google Cloud TPU v4 documentation (per chip)"),
    "TPU v5e": dict(f32=None, tf32=None, bf16=197e12,
                    source="Google Cloud TPU v5e documentation (per chip)"),
    "TPU v5p": dict(f32=None, tf32=None, bf16=459e12,
                    source="Google Cloud TPU v5p documentation (per chip)"),
    "TPU v6e": dict(f32=None, tf32=None, bf16=918e12,
                    source="Google Cloud TPU v6e (Trillium) documentation "
                    "(per chip)"),
}

FLAGS = flags.FLAGS


def peak_entry(device_kind: str) -> tuple[str, dict] | None:
  """``(name, PEAKS[name])`` for a ``Device.device_kind``, None if unknown.

  JAX names them e.g. "NVIDIA H100 80GB HBM3", "NVIDIA H100 PCIe",
  "NVIDIA H200", "NVIDIA A100-SXM4-80GB", "TPU v4", "TPU v5 lite" (v5e),
  "TPU v5" or "TPU v5p", "TPU v6 lite" (v6e).
  """
  k = device_kind.lower()
  if "h100" in k:
    name = "H100 PCIe" if "pcie" in k else "H100 SXM"
  elif "h200" in k:
    name = "H200"
  elif "a100" in k:
    name = "A100"
  elif "tpu" in k:
    if "v6" in k:
      name = "TPU v6e"
    elif "v5" in k:
      name = "TPU v5e" if ("lite" in k or "v5e" in k) else "TPU v5p"
    elif "v4" in k:
      name = "TPU v4"
    else:
      return None
  else:
    return None
  return name, PEAKS[name]


def has_compute_dtype() -> bool:
  """Whether the engine has mixed precision (``EngineConfig.compute_dtype``)."""
  from ftte_jax.core.algorithms import EngineConfig
  return "compute_dtype" in {f.name for f in dataclasses.fields(EngineConfig)}


def timed_steps(wanted: int, warm_s: float, remaining_s: float) -> int:
  """Steps to time after a warm-up step of ``warm_s`` seconds with
  ``remaining_s`` left: ``wanted``, fewer to end in time, at least 1."""
  if warm_s <= 0:
    return wanted
  return max(1, min(wanted, int(remaining_s / warm_s) - 1))


# ----------------------------------------------------------------------------
# Shared by both interpreters: the workload's data.


def synthetic_pool(pool: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """``pool`` 28x28x1 examples, labels from a fixed linear map."""
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(pool, 28, 28, 1)).astype(np.float32)
  w = rng.normal(size=(28 * 28, 10)).astype(np.float32)
  y = np.argmax(x.reshape(pool, -1) @ w, 1).astype(np.int32)
  return x, y


def client_layout(n: int, pool: int, seed: int
                  ) -> tuple[np.ndarray, np.ndarray]:
  """``(offsets, counts)`` of ``n`` clients: 16 to 64 rows each, windows
  of the pool."""
  rng = np.random.default_rng(seed + 1)
  counts = rng.integers(16, min(64, pool) + 1, n).astype(np.int32)
  offsets = (rng.random(n) * (pool - counts + 1)).astype(np.int32)
  return offsets, counts


def _emit(row: dict) -> None:
  print(_MARK + json.dumps(row), flush=True)


# ----------------------------------------------------------------------------
# FedJAX worker (FedJAX's interpreter; ftte_jax not needed).


def fedjax_worker(spec: dict) -> None:
  """FedJAX's fed_avg on each row of ``spec``; one result line per row."""
  import jax
  jax.tree_map = jax.tree_util.tree_map  # FedJAX 0.0.17 on current JAX.
  import fedjax
  import haiku as hk
  from experiments.benchmarks import vs_fedjax
  x, y = synthetic_pool(spec["pool"], spec["seed"])
  for row in spec["rows"]:
    t0 = time.perf_counter()
    net = vs_fedjax._haiku_net(row["model"])  # pylint: disable=protected-access
    model = fedjax.create_model_from_haiku(
        hk.transform(lambda batch, net=net: net(batch["x"])),
        {"x": x[:1], "y": y[:1]},
        lambda batch, preds: fedjax.metrics.unreduced_cross_entropy_loss(
            batch["y"], preds))
    algorithm = fedjax.algorithms.fed_avg.federated_averaging(
        fedjax.model_grad(model), fedjax.optimizers.sgd(spec["client_lr"]),
        fedjax.optimizers.sgd(spec["server_lr"]),
        fedjax.ShuffleRepeatBatchHParams(batch_size=spec["batch_size"],
                                         num_epochs=None,
                                         num_steps=spec["local_steps"]))
    state = algorithm.init(model.init(jax.random.PRNGKey(spec["seed"])))
    offsets, counts = client_layout(row["n"], spec["pool"], spec["seed"])
    rng = np.random.default_rng(spec["seed"] + 2)
    k, times = row["k"], []
    for r in range(row["rounds"]):
      if time.perf_counter() - t0 > row["time_limit_s"] and len(times) >= 2:
        break
      ids = rng.choice(row["n"], k, replace=False)
      clients = [(f"{c}".encode(), fedjax.ClientDataset(
          {"x": x[offsets[c]:offsets[c] + counts[c]],
           "y": y[offsets[c]:offsets[c] + counts[c]]}),
                  jax.random.PRNGKey(r * k + i)) for i, c in enumerate(ids)]
      t = time.perf_counter()
      state, _ = algorithm.apply(state, clients)
      jax.block_until_ready(state.params)
      times.append(time.perf_counter() - t)
    steady = times[1:]
    _emit({**row, "side": "fedjax", "status": "ok",
           "jax": jax.__version__, "backend": jax.default_backend(),
           "round_s": times, "first_round_s": times[0],
           "s_per_step": statistics.median(steady) if steady else None,
           "updates_per_s": k / statistics.median(steady) if steady
                            else None})


def fedjax_importable(python: str) -> bool:
  code = ("import jax; jax.tree_map = jax.tree_util.tree_map; "
          "import fedjax, haiku")
  try:
    return subprocess.run([python, "-c", code], capture_output=True,
                          timeout=300, check=False).returncode == 0
  except (OSError, subprocess.TimeoutExpired):
    return False


def run_fedjax(python: str, spec: dict, timeout_s: float) -> list[dict]:
  """FedJAX's rows in one subprocess; the rows it finished by the timeout
  (the others: "skipped: time budget")."""
  if timeout_s < 10:
    return [dict(r, side="fedjax", status="skipped: time budget")
            for r in spec["rows"]]
  # On a GPU this process holds most of the memory (JAX preallocates):
  # FedJAX's process allocates as it goes, from what is left.
  env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false")
  try:
    p = subprocess.run(
        [python, "-m", "experiments.benchmarks.accelerator",
         "--worker=fedjax", f"--spec={json.dumps(spec)}"], cwd=REPO,
        capture_output=True, text=True, timeout=timeout_s, env=env)
    out, err = p.stdout, p.stderr
  except subprocess.TimeoutExpired as e:
    out = e.stdout.decode() if isinstance(e.stdout, bytes) else e.stdout or ""
    err = "timed out"
  done = [json.loads(l[len(_MARK):]) for l in out.splitlines()
          if l.startswith(_MARK)]
  missing = spec["rows"][len(done):]
  why = (err.strip().splitlines() or ["?"])[-1][:300]
  return done + [dict(r, side="fedjax", status=f"error: {why}")
                 for r in missing]


# ----------------------------------------------------------------------------
# ftte_jax (this interpreter).


class Bench:
  """The workload's pieces, built once per (model, N) and K, and compiled
  programs cached by (model, N, K, batching, chunk, dtype)."""

  def __init__(self, args):
    import jax
    self.args, self.jax = args, jax
    self.t0 = time.perf_counter()
    self.pools = {}
    self.ctx = {}
    self.programs = {}
    self.measured = {}  # (model, N, K, config) -> its row.

  def remaining(self) -> float:
    return self.args.budget_s - (time.perf_counter() - self.t0)

  def context(self, model: str, n: int, k: int):
    """(engine config, env, params, plan, apply_fn, kinds, state0)."""
    key = (model, n, k)
    if key in self.ctx:
      return self.ctx[key]
    # One workload's data and state on the device at a time. Compiled
    # programs stay: they take any arrays of the shapes they were
    # compiled for, so a later row of this workload reuses them.
    self.ctx.clear()
    jax = self.jax
    from ftte_jax import models
    from ftte_jax.core import algorithms, engine, fleet, masks
    from ftte_jax.core.client import leaf_kinds
    from ftte_jax.data import client_data
    a = self.args
    if "pool" not in self.pools:
      self.pools["pool"] = synthetic_pool(a.pool, a.seed)
    x, y = self.pools["pool"]
    offsets, counts = client_layout(n, a.pool, a.seed)
    data = client_data.ClientData(
        x=jax.device_put(x), y=jax.device_put(y),
        offsets=jax.device_put(offsets), counts=jax.device_put(counts))
    module = models.get_model(model, 10)
    params = module.init(jax.random.PRNGKey(a.seed), x[:1])["params"]
    apply_fn = lambda p, xb: module.apply({"params": p}, xb)
    config = algorithms.preset(
        "fedavg", buffer_size=k, local_steps=a.local_steps,
        batch_size=a.batch_size, client_lr=a.client_lr,
        server_lr=a.server_lr)
    flt = fleet.make_fleet(fleet.FleetConfig(), n, a.seed)
    plan = masks.full_plan(params, n)
    env = engine.make_environment(config, data, flt, plan)
    sim = engine.make_simulator(config, apply_fn, a.local_steps,
                                kinds=leaf_kinds(plan.masks))
    state0 = jax.jit(sim.init)(jax.random.PRNGKey(a.seed), env, params, plan)
    jax.block_until_ready(state0)
    self.ctx[key] = (config, env, params, plan, apply_fn,
                     leaf_kinds(plan.masks), state0)
    return self.ctx[key]

  def compile(self, model, n, k, config):
    """``(ProgramMemory, Compiled, compile_s)`` of ``config``'s step."""
    from ftte_jax.experiment import memory_plan
    from ftte_jax.experiment import run as experiment_run
    key = (model, n, k, config)
    if key not in self.programs:
      _, env, params, plan, apply_fn, kinds, _ = self.context(model, n, k)
      t = time.perf_counter()
      mem, compiled = memory_plan.step_memory(
          config, apply_fn, env, params, plan, self.args.local_steps,
          kinds=kinds, compiler_options=experiment_run.step_compiler_options())
      self.programs[key] = (mem, compiled, time.perf_counter() - t)
    return self.programs[key]

  def row(self, model: str, n: int, k: int, variant: str, dtype: str
          ) -> dict:
    """One measured row (or why it was not measured)."""
    jax = self.jax
    from ftte_jax.core import engine
    from ftte_jax.experiment import memory_plan
    out = dict(side="ftte", model=model, n=n, k=k, variant=variant,
               dtype=dtype)
    if dtype == "bfloat16" and not has_compute_dtype():
      return dict(out, status=UNAVAILABLE_BF16)
    if self.remaining() < self.args.row_reserve_s:
      return dict(out, status="skipped: time budget")
    t_row = time.perf_counter()
    extra = {"compute_dtype": dtype} if dtype != "float32" else {}
    try:
      config = self.context(model, n, k)[0]
      if variant == "auto":
        cfg = dataclasses.replace(config, client_chunk=0, **extra)
        mesh = engine.client_mesh(cfg.mesh_devices, k)
        t = time.perf_counter()
        plan = memory_plan.plan_clients(
            cfg, lambda b, c: self.compile(model, n, k, dataclasses.replace(
                cfg, client_batching=b, client_chunk=c))[0],
            1 if mesh is None else mesh.devices.size, self.budget,
            widest=jax.default_backend() != "cpu")
        out["plan"] = dict(plan.as_dict(), seconds=time.perf_counter() - t)
        cfg = dataclasses.replace(cfg, client_batching=plan.batching,
                                  client_chunk=plan.chunk)
      else:
        cfg = dataclasses.replace(config, client_batching=variant,
                                  client_chunk=1, **extra)
      mem, compiled, compile_s = self.compile(model, n, k, cfg)
    except Exception as e:  # pylint: disable=broad-except
      return dict(out, status=_failure(e))
    out.update(batching=cfg.client_batching, chunk=cfg.client_chunk,
               compile_s=compile_s, program=mem.as_dict())
    same = self.measured.get((model, n, k, cfg))
    if same is not None:  # e.g. vmap, where auto took vmap: timed once.
      return dict(same, **{f: out[f] for f in ("variant", "dtype")},
                  same_program_as=same["variant"])
    limit = memory_plan.device_memory()
    if limit is not None and mem.peak_bytes > limit:
      return dict(out, status=f"skipped: needs {mem.peak_bytes / 2**30:.1f} "
                  f"GiB, the allocator has {limit / 2**30:.1f} GiB")
    env, state0 = self.context(model, n, k)[1], self.context(model, n, k)[6]
    state = jax.tree.map(lambda a: a.copy(), state0)
    try:
      t = time.perf_counter()
      state, _ = compiled(env, state)
      jax.block_until_ready(state)
      warm = time.perf_counter() - t
      steps = timed_steps(self.args.steps, warm,
                          self.remaining() - self.args.row_reserve_s / 2)
      times = []
      for _ in range(steps):
        t = time.perf_counter()
        state, _ = compiled(env, state)
        jax.block_until_ready(state)
        times.append(time.perf_counter() - t)
    except Exception as e:  # pylint: disable=broad-except
      return dict(out, status=_failure(e))
    per = statistics.median(times)
    flops = self.flops(model, k, per, dtype)
    stats = jax.devices()[0].memory_stats() or {}
    del state
    out = dict(out, status="ok", warmup_s=warm, step_s=times,
               s_per_step=per, updates_per_s=k / per,
               allocator_peak_bytes=stats.get("peak_bytes_in_use"),
               row_wall_s=time.perf_counter() - t_row, **flops)
    self.measured[(model, n, k, cfg)] = out
    return out

  def flops(self, model: str, k: int, per: float, dtype: str) -> dict:
    """The roofline numbers of a step of ``per`` seconds."""
    from experiments.benchmarks import vs_fedjax
    a = self.args
    analytic = k * vs_fedjax.flops_per_update(model, a.local_steps,
                                              a.batch_size)
    xla = self.client_step_flops(model) * a.local_steps * k
    out = {"flops_per_step_model": analytic, "flops_per_step_xla": xla,
           "achieved_flops_per_s": analytic / per}
    peaks = self.peaks
    for name in ("f32", "tf32", "bf16"):
      if peaks.get(name):
        out[f"fraction_of_{name}_peak"] = analytic / per / peaks[name]
    m = self.matmul["bf16" if dtype == "bfloat16" else "f32"]
    out["fraction_of_matmul_peak"] = analytic / per / m
    return out

  def client_step_flops(self, model: str) -> float:
    """XLA's FLOPs of one client's local SGD step (loop-free)."""
    key = ("client_step", model)
    if key not in self.programs:
      jax = self.jax
      import jax.numpy as jnp
      import optax
      from ftte_jax import models
      from ftte_jax.core.client import cross_entropy
      module = models.get_model(model, 10)
      x = jnp.zeros((self.args.batch_size, 28, 28, 1), jnp.float32)
      y = jnp.zeros((self.args.batch_size,), jnp.int32)
      params = module.init(jax.random.PRNGKey(0), x[:1])["params"]
      apply_fn = lambda p, xb: module.apply({"params": p}, xb)
      tx = optax.sgd(self.args.client_lr)

      def step(p, x, y):
        g = jax.grad(lambda q: cross_entropy(apply_fn, q, x, y))(p)
        u, _ = tx.update(g, tx.init(p), p)
        return optax.apply_updates(p, u)

      cost = jax.jit(step).lower(params, x, y).compile().cost_analysis()
      if isinstance(cost, (list, tuple)):
        cost = cost[0]
      self.programs[key] = float(cost["flops"])
    return self.programs[key]

  def device_facts(self) -> dict:
    """The device, its peaks, and matmuls timed here."""
    jax = self.jax
    from experiments.benchmarks import vs_fedjax
    from ftte_jax.experiment import memory_plan
    dev = jax.devices()[0]
    entry = peak_entry(dev.device_kind)
    self.peaks = entry[1] if entry else {}
    n = self.args.matmul_n
    self.matmul = {name: vs_fedjax.matmul_peak(n, dtype) for name, dtype in
                   (("f32", "float32"), ("bf16", "bfloat16"))}
    limit = memory_plan.device_memory()
    self.budget = self.args.device_memory_budget or limit
    return {"device_kind": dev.device_kind, "platform": dev.platform,
            "num_devices": jax.device_count(),
            "peak_name": entry[0] if entry else None, "peaks": self.peaks,
            "matmul_n": n, "matmul_flops_per_s": self.matmul,
            "allocator_limit_bytes": limit,
            "memory_budget_bytes": self.budget}


def _failure(e: Exception) -> str:
  """A row's status after ``e``: "oom: ..." or "error: ..."."""
  msg = (f"{type(e).__name__}: {e}".splitlines() or ["?"])[0][:300]
  oom = "RESOURCE_EXHAUSTED" in msg or "out of memory" in msg.lower()
  return ("oom: " if oom else "error: ") + msg


def _specs(a) -> list[tuple]:
  """The ftte_jax rows (model, N, K, variant, dtype) in priority order,
  with FedJAX's place among them as ("fedjax",)."""
  rows = [(m, a.n, k, "auto", "float32") for m in a.models for k in a.ks]
  rows.append(("fedjax",))
  rows += [(m, a.n, k, v, "float32") for m in a.models for k in a.ks
           for v in ("vmap", "map")]
  if a.n_large and "mlp" in a.models:
    rows += [("mlp", a.n_large, k, "auto", "float32") for k in a.ks]
  rows += [(m, a.n, k, "auto", "bfloat16") for m in a.models for k in a.ks]
  if a.n_large and "mlp" in a.models:
    rows += [("mlp", a.n_large, k, "auto", "bfloat16") for k in a.ks]
  return rows


def _roofline(row: dict, facts: dict) -> str:
  peak = facts["peaks"].get("bf16" if row["dtype"] == "bfloat16" else "tf32")
  parts = [f"roofline {row['model']} K={row['k']:,} {row['dtype']} "
           f"{row['batching']}/{row['chunk']}: "
           f"{row['flops_per_step_model'] / 1e9:.1f} GFLOP a step (model; "
           f"XLA {row['flops_per_step_xla'] / 1e9:.1f}) in "
           f"{row['s_per_step'] * 1e3:.1f} ms = "
           f"{row['achieved_flops_per_s'] / 1e12:.3f} TFLOP/s"]
  if peak:
    parts.append(f"{100 * row['achieved_flops_per_s'] / peak:.2f}% of "
                 f"{facts['peak_name']}'s {peak / 1e12:.0f} TFLOP/s")
  parts.append(f"{100 * row['fraction_of_matmul_peak']:.2f}% of the "
               "matmul timed here")
  return "; ".join(parts)


def _line(row: dict) -> str:
  head = (f"{row['side']:6} {row['model']:6} N={row['n']:>9,} "
          f"K={row['k']:>6,} {row.get('variant', 'fed_avg'):5} "
          f"{row.get('dtype', 'float32'):8}")
  if row["status"] != "ok":
    return f"{head} {row['status']}"
  mem = row.get("program", {}).get("peak_bytes")
  return (f"{head} {row.get('batching', '')}/{row.get('chunk', '')} "
          f"{row['s_per_step'] * 1e3:9.1f} ms/step "
          f"{row['updates_per_s']:10.0f} upd/s"
          + (f" compile {row['compile_s']:.1f} s" if 'compile_s' in row
             else f" first round {row['first_round_s']:.1f} s")
          + (f" step memory {mem / 2**30:.2f} GiB" if mem else ""))


def parent(a) -> int:
  import jax
  from experiments.benchmarks.common import machine
  bench = Bench(a)
  facts = bench.device_facts()
  print(f"device: {facts['device_kind']} ({jax.default_backend()}, "
        f"{facts['num_devices']} device(s)); {machine()}", flush=True)
  print(f"peaks: {facts['peak_name'] or 'not in the table'} "
        f"{facts['peaks']}; matmul {a.matmul_n}^2 here: " + ", ".join(
            f"{k} {v / 1e12:.2f} TFLOP/s"
            for k, v in facts["matmul_flops_per_s"].items()), flush=True)
  print(f"compute_dtype in the engine: {has_compute_dtype()}", flush=True)
  out = a.out or os.path.join(
      RESULTS, f"accelerator_{jax.default_backend()}"
      f"{'_smoke' if a.smoke else ''}.json")
  report = {"machine": machine(), "argv": sys.argv[1:], "device": facts,
            "compute_dtype_available": has_compute_dtype(),
            "budget_s": a.budget_s, "rows": [], "stopped_by": "done"}

  def save():
    report["wall_s"] = time.perf_counter() - bench.t0
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out + ".tmp", "w") as f:
      json.dump(report, f, indent=1)
    os.replace(out + ".tmp", out)

  for spec in _specs(a):
    if spec[0] == "fedjax":
      rows = fedjax_rows(a, bench)
    else:
      rows = [bench.row(*spec)]
    for row in rows:
      report["rows"].append(row)
      print(_line(row), flush=True)
      if row["status"] == "ok" and row["side"] == "ftte":
        print("  " + _roofline(row, facts), flush=True)
      if row["status"] == "skipped: time budget":
        report["stopped_by"] = "budget_s"
    save()
  report["table"] = table(report["rows"])
  save()
  print("\n" + report["table"], flush=True)
  print(f"wrote {out} ({len(report['rows'])} rows, "
        f"{report['wall_s']:.0f} s, stopped by {report['stopped_by']})",
        flush=True)
  return 0


def table(rows: list[dict]) -> str:
  """Updates/s per (model, N, K): each ftte_jax path and FedJAX."""
  cols = [("auto", "float32"), ("vmap", "float32"), ("map", "float32"),
          ("auto", "bfloat16")]
  cells = {}
  for r in rows:
    key = (r["model"], r["n"], r["k"])
    col = ("fedjax",) if r["side"] == "fedjax" else (r["variant"], r["dtype"])
    ok = r["status"] == "ok"
    cells.setdefault(key, {})[col] = (
        f"{r['updates_per_s']:,.0f}" if ok else r["status"].split(":")[0])
    if ok and r["side"] == "ftte" and col == cols[0]:
      cells[key]["path"] = f"{r['batching']}/{r['chunk']}"
  head = ("| model | N | K | auto f32 upd/s (path) | vmap f32 | map f32 | "
          "auto bf16 | FedJAX fed_avg |")
  lines = [head, "|---|---:|---:|---:|---:|---:|---:|---:|"]
  for (m, n, k), c in cells.items():
    lines.append(
        f"| {m} | {n:,} | {k:,} | {c.get(cols[0], '-')} "
        f"({c.get('path', '-')}) | " + " | ".join(
            c.get(col, "-") for col in cols[1:]) +
        f" | {c.get(('fedjax',), '-')} |")
  return "\n".join(lines)


def fedjax_rows(a, bench: Bench) -> list[dict]:
  rows = [dict(model=m, n=a.n, k=k, rounds=a.steps + 1,
               time_limit_s=max(10.0, bench.remaining() / 4))
          for m in a.models for k in a.fedjax_ks]
  if bench.remaining() < max(10.0, a.row_reserve_s):
    return [dict(r, side="fedjax", status="skipped: time budget")
            for r in rows]
  if not fedjax_importable(a.fedjax_python):
    return [dict(r, side="fedjax",
                 status=f"skipped: fedjax not importable by "
                 f"{a.fedjax_python} (docs/accelerators.md: its wheels)")
            for r in rows]
  spec = {"pool": a.pool, "seed": a.seed, "client_lr": a.client_lr,
          "server_lr": a.server_lr, "batch_size": a.batch_size,
          "local_steps": a.local_steps, "rows": rows}
  return run_fedjax(a.fedjax_python, spec,
                    bench.remaining() - a.row_reserve_s)


def define_flags() -> None:
  """Registers the flags (only when run: importing the module for its
  helpers defines none)."""
  flags.DEFINE_bool("smoke", False, "tiny K and N, the MLP alone: seconds on "
                    "the CPU (tests/test_accelerator_benchmark.py)")
  flags.DEFINE_list("models", ["mlp", "lenet5"], "models")
  flags.DEFINE_list("ks", ["100", "1000", "10000"], "clients per step K")
  flags.DEFINE_list("fedjax_ks", ["100", "1000"], "K of FedJAX's rows (its "
                    "round is a Python loop over clients)")
  flags.DEFINE_integer("n", 100_000, "clients N")
  flags.DEFINE_integer("n_large", 1_000_000, "the MLP's larger N (0: none)")
  flags.DEFINE_integer("pool", 60_000, "examples in the synthetic pool")
  flags.DEFINE_integer("steps", 3, "timed steps per row (after a warm-up)")
  flags.DEFINE_integer("local_steps", 5, "local SGD steps")
  flags.DEFINE_integer("batch_size", 32, "local batch")
  flags.DEFINE_float("client_lr", 0.05, "client SGD rate")
  flags.DEFINE_float("server_lr", 1.0, "server SGD rate")
  flags.DEFINE_integer("seed", 0, "seed of data, model and engine")
  flags.DEFINE_float("budget_s", 420.0, "wall seconds for the whole run: "
                     "no row starts with less than row_reserve_s left, and "
                     "a row times fewer steps to end in time")
  flags.DEFINE_float("row_reserve_s", 30.0, "seconds a row needs to start")
  flags.DEFINE_float("device_memory_budget", None, "bytes per device the "
                     "memory plan may use (default: the allocator's limit)")
  flags.DEFINE_integer("matmul_n", 4096, "size of the timed matmuls")
  flags.DEFINE_string("fedjax_python", sys.executable,
                      "interpreter that can import fedjax")
  flags.DEFINE_string("out", None, "results JSON; default experiments/"
                      "benchmarks/results/accelerator_<backend>[_smoke].json")
  flags.DEFINE_enum("worker", None, ["fedjax"], "internal")
  flags.DEFINE_string("spec", None, "internal: JSON of the FedJAX rows")


class _Args:
  """The flags as plain values (``--smoke`` applied)."""

  def __init__(self):
    f = FLAGS
    self.smoke = f.smoke
    self.models = list(f.models)
    self.ks = [int(k) for k in f.ks]
    self.fedjax_ks = [int(k) for k in f.fedjax_ks]
    self.n, self.n_large, self.pool = f.n, f.n_large, f.pool
    self.steps, self.local_steps, self.batch_size = (f.steps, f.local_steps,
                                                     f.batch_size)
    self.client_lr, self.server_lr, self.seed = (f.client_lr, f.server_lr,
                                                 f.seed)
    self.budget_s, self.row_reserve_s = f.budget_s, f.row_reserve_s
    self.device_memory_budget = f.device_memory_budget
    self.matmul_n, self.fedjax_python, self.out = (f.matmul_n,
                                                   f.fedjax_python, f.out)
    if f.smoke:
      self.models, self.ks, self.fedjax_ks = ["mlp"], [8], [8]
      self.n, self.n_large, self.pool = 64, 0, 256
      self.steps, self.matmul_n, self.row_reserve_s = 2, 256, 0.0
      # A budget, so that the plan compiles (and checks) on the CPU too.
      if self.device_memory_budget is None:
        self.device_memory_budget = 2.0 ** 31


def main(argv: list[str]) -> int:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  if FLAGS.worker == "fedjax":
    sys.path.insert(0, REPO)
    fedjax_worker(json.loads(FLAGS.spec))
    return 0
  return parent(_Args())


if __name__ == "__main__":
  define_flags()
  app.run(main)
