"""A diverging run is stopped (or, on request, carried on) and counted."""

import jax
import numpy as np

from ftte_jax import experiment
from helpers import tiny_config


def test_huge_server_lr_stops_the_run_with_finite_parameters():
  exp = experiment.build(tiny_config("fedbuff", rounds=30, eval_every=3,
                                     engine_kw={"server_lr": 1e30}))
  state, history, timing = exp.run()
  assert timing["stopped_by"] == "divergence"
  assert int(state.version) < 30
  summary = exp.summary(state, history, timing)
  assert summary["stopped_by"] == "divergence"
  # The refused step kept the last good (finite) model.
  assert all(np.isfinite(np.asarray(x)).all()
             for x in jax.tree.leaves(state.params))


def test_skip_goes_on_and_counts_refused_steps():
  exp = experiment.build(tiny_config("fedbuff", rounds=12, eval_every=3,
                                     on_divergence="skip",
                                     engine_kw={"server_lr": 1e37}))
  state, history, timing = exp.run()
  assert timing["stopped_by"] == "rounds" and int(state.version) == 12
  # What 'stop' reacts to was there: the test loss blew up; the clients'
  # non-finite updates were rejected and counted, so the model stays finite.
  assert not all(np.isfinite(r["test_loss"]) for r in history)
  assert int(state.counters.updates_nonfinite) > 0
  assert all(np.isfinite(np.asarray(x)).all()
             for x in jax.tree.leaves(state.params))
