r"""A loss of one's own: label-smoothed cross-entropy (Szegedy et al. 2016)
for client training; the evaluation keeps plain accuracy and loss.

  python examples/label_smoothing.py --flagfile=experiments/smoke.flags \
      --smoothing=0.1 --workdir=/tmp/smoothing

A ``loss_fn(params, batch) -> (loss, aux)`` replaces the default loss in the
built-in client update of any algorithm (FTTE's masks and search included).
"""

import jax
import optax
from absl import flags

import ftte_jax as fj
from launch import main as launch

SMOOTHING = flags.DEFINE_float("smoothing", 0.1, "label smoothing alpha")


def label_smoothing(alpha: float):
  """A factory ``(config, model) -> Extensions`` for ``experiment.build``."""

  def make(config, model):
    def loss_fn(params, batch):
      logits = model.apply_fn(params, batch["x"])
      target = optax.smooth_labels(
          jax.nn.one_hot(batch["y"], logits.shape[-1]), alpha)
      return optax.softmax_cross_entropy(logits, target).mean(), {}

    return fj.Extensions(name=f"label_smoothing({alpha})", loss_fn=loss_fn)

  return make


if __name__ == "__main__":
  launch.run(extensions=lambda c, m: label_smoothing(SMOOTHING.value)(c, m),
             name=lambda: f"label_smoothing({SMOOTHING.value})")
