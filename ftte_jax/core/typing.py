"""Type aliases shared across the package."""

from typing import Callable

import chex
import jax.numpy as jnp

PyTree = chex.ArrayTree
# apply_fn(params, x) -> logits.
ApplyFn = Callable[[PyTree, jnp.ndarray], jnp.ndarray]
