"""Importance of parameter groups: diagonal Fisher information.

A client (or the server, on public proxy data) computes the diagonal Fisher
``F = sum_b g_b ** 2`` of its loss, where ``g_b`` is the gradient of one
example (``microbatch_size=1``) or of one microbatch, and reduces it to group
scores ``[T, K+1]``: the Fisher mass of each tensor's first ``sizes[t, k]``
output channels (cumulative, matching the nested levels of
``groups.GroupSpec``). Everything here is pure and jit/vmap-compatible, so a
probe round maps ``fisher_diagonal`` over the clients' batches and averages
the trees (``experiment.planning.importance``).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from ftte_jax.core.typing import PyTree
from ftte_jax.search import groups as groups_lib


def fisher_diagonal(loss_fn: Callable[[PyTree, PyTree], jnp.ndarray],
                    params: PyTree, batch: PyTree,
                    microbatch_size: int = 1) -> PyTree:
  """Sum of squared per-example (or per-microbatch) gradients.

  Args:
    loss_fn: ``loss_fn(params, batch) -> scalar`` mean loss of a batch whose
      leaves share a leading example axis.
    params: parameters to differentiate (any pytree).
    batch: pytree of arrays with leading axis ``n``.
    microbatch_size: examples per gradient; 1 gives the empirical Fisher of
      single examples, ``n`` the squared full-batch gradient. Must divide n.

  Returns:
    A tree like ``params`` with the diagonal Fisher.
  """
  n = jax.tree.leaves(batch)[0].shape[0]
  if microbatch_size < 1 or n % microbatch_size:
    raise ValueError(f"microbatch_size must be >= 1 and divide the batch size "
                     f"{n}, got {microbatch_size}")
  chunks = jax.tree.map(
      lambda x: x.reshape((n // microbatch_size, microbatch_size)
                          + x.shape[1:]), batch)
  grads = jax.vmap(jax.grad(loss_fn), in_axes=(None, 0))(params, chunks)
  return jax.tree.map(lambda g: jnp.sum(jnp.square(g), axis=0), grads)


def group_importance(spec: groups_lib.GroupSpec, fisher: PyTree) -> jnp.ndarray:
  """Cumulative Fisher mass per tensor and level, ``[T, K+1]`` float32.

  Entry ``[t, k]`` sums the Fisher over tensor ``t``'s first
  ``spec.sizes[t, k]`` output channels (0 at level 0).
  """
  flat = groups_lib.flat_params(fisher)
  rows = []
  for t, path in enumerate(spec.paths):
    f = flat[path]
    per_channel = jnp.sum(f.reshape(-1, f.shape[-1]), axis=0)
    cum = jnp.concatenate([jnp.zeros(1, per_channel.dtype),
                           jnp.cumsum(per_channel)])
    rows.append(cum[jnp.asarray(spec.sizes[t])])
  return jnp.stack(rows).astype(jnp.float32)
