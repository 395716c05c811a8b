r"""A staleness weight of one's own: updates older than a cutoff are
dropped, younger ones decay as 1 / (1 + log(1 + tau)).

  python examples/staleness.py --flagfile=experiments/smoke.flags \
      --algorithm=fedbuff --cutoff=8 --workdir=/tmp/staleness

Any ``tau [K] int32 -> weights [K] float32`` function replaces the config's
named one (--staleness); the rest of the preset's aggregation is kept.
"""

import jax.numpy as jnp
from absl import flags

import ftte_jax as fj
from launch import main as launch

CUTOFF = flags.DEFINE_integer("cutoff", 8, "updates older than this count 0")


def log_cutoff(cutoff: int):
  """``s(tau) = 1 / (1 + log(1 + tau))`` for ``tau <= cutoff``, else 0."""

  def weight(tau):
    tau = jnp.asarray(tau, jnp.float32)
    return jnp.where(tau <= cutoff, 1.0 / (1.0 + jnp.log1p(tau)), 0.0)

  return weight


if __name__ == "__main__":
  launch.run(extensions=lambda c, m: fj.Extensions(
      name=f"log_cutoff({CUTOFF.value})",
      staleness_fn=log_cutoff(CUTOFF.value)),
             name=lambda: f"log_cutoff({CUTOFF.value})")
