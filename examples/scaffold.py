r"""SCAFFOLD (Karimireddy et al., ICML 2020) with per-device control variates.

Each device keeps its control variate c_i between tasks (per-device state:
one row a device, checkpointed with the run). It corrects every local
gradient by c - c_i, where c, the server's variate, is the fleet's mean of
the c_i (SCAFFOLD's server update keeps exactly that mean when all start at
zero), and after K local steps of learning rate eta sets
c_i+ = c_i - c + (w_pulled - w_local) / (K eta)   (option II).

  python examples/scaffold.py --flagfile=experiments/smoke.flags \
      --algorithm=fedavg --workdir=/tmp/scaffold
"""

import jax
import jax.numpy as jnp

import ftte_jax as fj
from launch import main as launch


def _dot(a, b):
  return sum(jnp.sum(x * y) for x, y in zip(jax.tree.leaves(a),
                                            jax.tree.leaves(b)))


def scaffold(config, model) -> fj.Extensions:
  """A factory ``(config, model) -> Extensions`` for ``experiment.build``."""
  loss = fj.losses.classification(model.apply_fn).loss
  e = config.engine

  def client_update(key, params, mask, data, state):
    c_i, c = state.own, state.fleet_mean
    fix = jax.tree.map(jnp.subtract, c, c_i)
    # The gradient of <c - c_i, w> is c - c_i: the corrected gradient.
    corrected = lambda w, b: (loss(w, b)[0] + _dot(fix, w), {})
    out = fj.client.sgd(corrected, e.batch_size, model.tx)(
        key, params, mask, data)
    scale = 1.0 / (data.num_steps * e.client_lr)
    c_new = jax.tree.map(lambda ci, cc, p, w: ci - cc + (p - w) * scale,
                         c_i, c, params, out.params)
    return out._replace(state=c_new)

  return fj.Extensions(
      name="scaffold", client_update=client_update,
      device_state=fj.DeviceState(
          init=lambda params: jax.tree.map(jnp.zeros_like, params)))


if __name__ == "__main__":
  launch.run(extensions=scaffold, name="scaffold")
