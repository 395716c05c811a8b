r"""FedYogi (Reddi et al., ICLR 2021, "Adaptive Federated Optimization"):
the server applies the aggregate with Yogi (optax's, with Adam's bias
correction), or with any other optax transformation.

  python examples/fedyogi.py --flagfile=experiments/smoke.flags \
      --algorithm=fedavg --server_lr=0.01 --workdir=/tmp/fedyogi

The engine hands the server optimizer the aggregate as a pseudo-gradient
(minus the mean update), so optax.yogi here is FedYogi, optax.adam FedAdam
and optax.adagrad FedAdagrad.
"""

import optax
from absl import flags

import ftte_jax as fj
from launch import main as launch

TAU = flags.DEFINE_float("yogi_eps", 1e-3, "Yogi's adaptivity tau (eps)")


def fedyogi(lr: float, eps: float = 1e-3, b1: float = 0.9,
            b2: float = 0.99) -> fj.Extensions:
  """Extensions whose server optimizer is Yogi (Reddi et al.'s defaults)."""
  return fj.Extensions(name=f"fedyogi(lr={lr},eps={eps})",
                       server_optimizer=optax.yogi(lr, b1, b2, eps))


if __name__ == "__main__":
  launch.run(extensions=lambda c, m: fedyogi(c.engine.server_lr, TAU.value),
             name=lambda: f"fedyogi(eps={TAU.value})")
