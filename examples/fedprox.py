r"""FedProx (Li et al., MLSys 2020): local steps on the loss plus a proximal
term (mu / 2) ||w - w_global||^2 that keeps a device near the model it pulled.

  python examples/fedprox.py --flagfile=experiments/smoke.flags \
      --algorithm=fedavg --mu=0.01 --workdir=/tmp/fedprox

Every launch.main flag works (checkpoints, resume, --algorithm for the
server side); only the client update is FedProx's.
"""

import jax
import jax.numpy as jnp
from absl import flags

import ftte_jax as fj
from launch import main as launch

MU = flags.DEFINE_float("mu", 0.01, "FedProx's proximal strength mu")


def fedprox(mu: float):
  """A factory ``(config, model) -> Extensions`` for ``experiment.build``."""

  def make(config, model):
    loss = fj.losses.classification(model.apply_fn).loss
    e = config.engine

    def client_update(key, params, mask, data, state):
      def prox_loss(w, batch):
        value, aux = loss(w, batch)
        sq = sum(jnp.sum((a - b) ** 2) for a, b in
                 zip(jax.tree.leaves(w), jax.tree.leaves(params)))
        return value + 0.5 * mu * sq, aux

      return fj.client.sgd(prox_loss, e.batch_size, model.tx)(
          key, params, mask, data, state)

    return fj.Extensions(name=f"fedprox(mu={mu})",
                         client_update=client_update)

  return make


if __name__ == "__main__":
  launch.run(extensions=lambda c, m: fedprox(MU.value)(c, m),
             name=lambda: f"fedprox(mu={MU.value})")
