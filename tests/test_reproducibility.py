"""Pinned results: the final parameters' SHA-256 of fixed runs.

Refactoring must not change what the simulator computes. These hashes were
recorded before the package was reorganized (issue 8); a change that moves
one of them changes behaviour and must say why in its commit message, and
update the pin.
"""

from pathlib import Path

import pytest

from ftte_jax import experiment
from launch import flags as flags_lib

REPO = Path(__file__).resolve().parents[1]
SMOKE = f"--flagfile={REPO / 'experiments' / 'smoke.flags'}"

PINNED = {
    "smoke-ftte": ([SMOKE, "--algorithm=ftte"],
                   "f5392e3db7d260262556f902a8d71083465735ce97d251881860fd3d59937d11"),
    "smoke-fedbuff": ([SMOKE, "--algorithm=fedbuff"],
                      "90d1f2c7aa0eabafdc52ca2e086fdf086e2bdfefc852f1fc134bf0f571699c83"),
    "smoke-fedavg": ([SMOKE, "--algorithm=fedavg", "--concurrency=4"],
                     "625c37814e9e408d3e79cca04bc04a93cc64f349387484d8e27c1b457ac66fea"),
    "smoke-fedasync": ([SMOKE, "--algorithm=fedasync", "--buffer_size=1"],
                       "41d8c65a5cfa01ed1a8359c8ea63399bf9608e09a2742e3d962c708d0cdaa553"),
    # The launcher's default: FTTE, LeNet-5 on the real MNIST split.
    "default": ([],
                "333153f1fa56ad7e5359fc2dc7533c1ce154fb2d45355e021e1a7e652e48f201"),
}


def final_sha(args):
  config = flags_lib.resolve_args(args).config
  exp = experiment.build(config)
  state, history, timing = exp.run()
  return exp.summary(state, history, timing)["params_sha256"]


@pytest.mark.parametrize("name", sorted(PINNED))
def test_params_sha256_pinned(name, mnist_available):
  args, expected = PINNED[name]
  if name == "default" and not mnist_available:
    pytest.skip("the default run needs the real MNIST split")
  assert final_sha(args) == expected
