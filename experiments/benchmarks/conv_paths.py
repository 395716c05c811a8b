"""Measures convolution paths for one SGD step: XLA conv vs. im2col.

For each zoo CNN and each conv implementation it times one jitted gradient
step (batch 32) three ways: a single client; C clients vmapped, each with its
own weights; and the same C clients through lax.map. It also checks that the
implementations agree (max |difference| of the updated params). Prints a
table and the machine it ran on. Timing only; nothing here is asserted.

Run: python -m experiments.benchmarks.conv_paths [model ...]
"""

from __future__ import annotations

import os
import platform
import sys
import time

import jax
import jax.numpy as jnp
import optax

from ftte_jax import models

BATCH = 32
CLIENTS = 10
SHAPES = {"lenet5": (28, 28, 1), "resnet8": (32, 32, 3),
          "mobilenetv2": (32, 32, 3)}


def _step_fn(model):
  def step(params, x, y):
    def loss(p):
      logits = model.apply({"params": p}, x)
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    g = jax.grad(loss)(params)
    return jax.tree.map(lambda p, d: p - 0.1 * d, params, g)
  return step


def _time(fn, *args, min_time=1.0):
  out = fn(*args)
  jax.block_until_ready(out)  # compile + warm up
  n, t0 = 0, time.perf_counter()
  while time.perf_counter() - t0 < min_time:
    out = fn(*args)
    jax.block_until_ready(out)
    n += 1
  return (time.perf_counter() - t0) / n, out


def bench(name: str):
  shape = SHAPES[name]
  key = jax.random.key(0)
  x = jax.random.normal(key, (CLIENTS, BATCH, *shape))
  y = jax.random.randint(jax.random.key(1), (CLIENTS, BATCH), 0, 10)
  rows, outs = [], {}
  for impl in ("xla", "im2col"):
    model = models.get_model(name, 10, conv_impl=impl)
    p0 = model.init(jax.random.key(2), x[0])["params"]
    ps = jax.tree.map(lambda a: jnp.stack([a + 0.01 * i for i in range(
        CLIENTS)]), p0)
    step = _step_fn(model)
    single = jax.jit(step)
    vmapped = jax.jit(jax.vmap(step))
    mapped = jax.jit(lambda p, xx, yy: jax.lax.map(lambda a: step(*a),
                                                   (p, xx, yy)))
    t1, o1 = _time(single, p0, x[0], y[0])
    tv, ov = _time(vmapped, ps, x, y)
    tm, om = _time(mapped, ps, x, y)
    outs[impl] = (o1, ov, om)
    rows.append((name, impl, BATCH / t1, CLIENTS * BATCH / tv,
                 CLIENTS * BATCH / tm))
  # Per path: max |xla - im2col| over updated params, and the largest |param|.
  diffs = [max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(
      jax.tree.leaves(outs["xla"][k]), jax.tree.leaves(outs["im2col"][k])))
           for k in range(3)]
  return rows, diffs


def main(argv):
  names = argv[1:] or list(SHAPES)
  cpu = "?"
  try:
    with open("/proc/cpuinfo") as f:
      cpu = next(l.split(":", 1)[1].strip() for l in f if "model name" in l)
  except (OSError, StopIteration):
    pass
  print(f"machine: {platform.platform()} | {cpu} | {os.cpu_count()} cores | "
        f"python {platform.python_version()} | jax {jax.__version__} | "
        f"devices {jax.devices()}")
  print(f"one SGD step, batch {BATCH}; vmap / lax.map over {CLIENTS} clients "
        "with their own weights; examples/s (higher is better)")
  hdr = f"{'model':<12} {'conv':<7} {'single':>9} {'vmap':>9} {'lax.map':>9}"
  print(hdr)
  print("-" * len(hdr))
  for name in names:
    rows, diffs = bench(name)
    for r in rows:
      print(f"{r[0]:<12} {r[1]:<7} {r[2]:>9.0f} {r[3]:>9.0f} {r[4]:>9.0f}")
    print(f"{'':<12} {'|diff|':<7} " + " ".join(f"{d:>9.1e}" for d in diffs)
          + "  (max |params_xla - params_im2col| after the step)")
  print(f"default conv_impl='auto' resolves to "
        f"{models.resolve_conv_impl('auto')!r} on {jax.default_backend()}")


if __name__ == "__main__":
  main(sys.argv)
