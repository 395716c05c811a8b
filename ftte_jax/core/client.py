"""Local client training: a pure function of (key, base params, mask, data).

Each client runs up to ``max_steps`` SGD steps on its own examples; steps
beyond its own ``num_steps`` are no-ops (``jnp.where``), so clients with
different amounts of work share one fixed-shape computation. Only masked
coordinates move: gradients are multiplied by the client's 0/1 mask.

Batches come from a per-client random permutation of its examples, walked in
order and wrapped around (epoch-style sampling without replacement). Padded
index slots sort last in that permutation, so they are never drawn.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from ftte_jax.core.typing import ApplyFn, PyTree


def cross_entropy(apply_fn: ApplyFn, params: PyTree, x: jnp.ndarray,
                  y: jnp.ndarray) -> jnp.ndarray:
  """Mean softmax cross-entropy of integer labels."""
  logits = apply_fn(params, x)
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def batch_positions(key: jax.Array, count: jnp.ndarray, max_n: int,
                    step: jnp.ndarray, batch_size: int) -> jnp.ndarray:
  """Positions (into a client's padded index row) of local batch ``step``.

  A random permutation of the ``count`` real positions is walked in order,
  wrapping around; the padded positions ``>= count`` are never returned.
  """
  scores = jax.random.uniform(key, (max_n,))
  scores = jnp.where(jnp.arange(max_n) < count, scores, 2.0)
  order = jnp.argsort(scores)
  pos = (step * batch_size + jnp.arange(batch_size)) % count
  return order[pos]


def make_client_optimizer(lr: float, momentum: float = 0.0
                          ) -> optax.GradientTransformation:
  """The client optimizer: SGD, with heavy-ball momentum when ``momentum > 0``.

  One object serves training (``make_client_update``) and the memory model,
  which charges its per-parameter state (``memory.optimizer_slots``).
  """
  return optax.sgd(lr, momentum=momentum if momentum > 0 else None)


def make_client_update(apply_fn: ApplyFn, batch_size: int,
                       tx: optax.GradientTransformation, max_steps: int,
                       unroll: int | bool = 1):
  """Builds ``client_update(key, base, mask, x, y, row, count, num_steps)``.

  Args:
    apply_fn: ``apply_fn(params, x) -> logits``.
    batch_size: local batch size.
    tx: the client optimizer (``make_client_optimizer``); its state starts
      fresh on every task.
    max_steps: static number of loop iterations (the largest step count).
    unroll: unroll factor of the local-step loop; ``True`` unrolls fully,
      which on CPU avoids XLA's slow convolution-in-loop path
      (docs/design.md, Performance).

  Returns:
    A pure function returning the client's locally trained parameters and its
    mean training loss over the steps it took.
  """
  grad_fn = jax.value_and_grad(lambda p, x, y: cross_entropy(apply_fn, p, x, y))

  def client_update(key, base, mask, x_all, y_all, row, count, num_steps):
    max_n = row.shape[0]

    def body(i, carry):
      params, opt_state, loss_sum = carry
      idx = row[batch_positions(key, count, max_n, i, batch_size)]
      loss, grads = grad_fn(params, x_all[idx], y_all[idx])
      grads = jax.tree.map(jnp.multiply, grads, mask)
      updates, new_opt_state = tx.update(grads, opt_state, params)
      new_params = optax.apply_updates(params, updates)
      active = i < num_steps
      return (optax.tree_utils.tree_where(active, new_params, params),
              optax.tree_utils.tree_where(active, new_opt_state, opt_state),
              loss_sum + jnp.where(active, loss, 0.0))

    init = (base, tx.init(base), jnp.zeros((), jnp.float32))
    params, _, loss_sum = jax.lax.fori_loop(0, max_steps, body, init,
                                            unroll=unroll)
    return params, loss_sum / jnp.maximum(num_steps, 1)

  return client_update
