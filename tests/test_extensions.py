"""Extension points: bad callables are refused up front, naming the point
and the shape it must have; good ones run; per-device state is written as
the devices kept it."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import helpers
from ftte_jax import experiment
from ftte_jax.core import client
from ftte_jax.core import engine
from ftte_jax.core import fleet as fleet_lib
from ftte_jax.core import losses
from ftte_jax.core import transforms as tx
from ftte_jax.core.extensions import Extensions


def _build(**ext):
  config = helpers.tiny_config("fedbuff")
  return experiment.build(config, Extensions(name="t", **ext))


@pytest.mark.parametrize("ext,match", [
    (dict(staleness_fn=lambda tau, b: tau), r"staleness_fn: must accept 1"),
    (dict(staleness_fn=lambda tau: jnp.sum(tau) * 1.0),
     r"staleness_fn: must map tau \[K=4\] int32 to weights \[4\] float, "
     r"got shape \(\)"),
    (dict(staleness_fn=lambda tau: tau), r"staleness_fn: .*got shape \(4,\) "
     r"int32"),
    (dict(loss_fn=lambda p, b: 0.0 * jnp.sum(b["y"])),
     r"loss_fn: must return \(loss, aux\)"),
    (dict(loss_fn=lambda p: 0.0), r"loss_fn: must accept 2"),
    (dict(metrics_fn=lambda p, b: {"loss": (jnp.zeros(()), jnp.ones(()))}),
     r"metrics_fn: .*'loss' and 'accuracy'"),
    (dict(client_update=lambda k, p, m, d, s: (p, 0.0)),
     r"client_update: must return ClientResult"),
    (dict(client_update=lambda k, p, m, d, s: client.ClientResult(
        jax.tree.map(lambda x: x[:1], p), jnp.zeros(()))),
     r"client_update: params leaves must keep their shapes"),
    (dict(client_update=lambda k, p, m, d, s: client.ClientResult(
        p, jnp.zeros((3,)))), r"client_update: ClientResult.loss must be a "
     r"scalar"),
    (dict(server_optimizer=lambda g: g), r"server_optimizer: expected"),
    (dict(aggregator=tx.Aggregator(
        tx.stateless(lambda b, c: b.replace(weights=b.weights[:2])),
        tx.normalize("buffer"))), r"aggregator: "),
    (dict(device_state=client.DeviceState(init=lambda p: p),
          client_update=lambda k, p, m, d, s: client.ClientResult(
              p, jnp.zeros(()), state={"other": jnp.zeros(())})),
     r"client_update: state must have the structure"),
])
def test_bad_extensions_are_refused_before_any_step_compiles(ext, match,
                                                             monkeypatch):
  # Tracing the step would call step_state; nothing may get that far.
  monkeypatch.setattr(engine, "step_state", lambda *a: pytest.fail("traced"))
  with pytest.raises(ValueError, match=match):
    _build(**ext)


def test_staleness_fn_and_aggregator_exclude_each_other():
  with pytest.raises(ValueError, match="staleness_fn: give it or an "
                     "aggregator"):
    Extensions(staleness_fn=lambda t: t * 1.0,
               aggregator=tx.aggregator(tx.weight_by_data()))


def test_stream_refused_for_an_aggregator_that_needs_the_updates():
  config = helpers.tiny_config("fedbuff",
                               engine_kw=dict(client_batching="stream"))
  with pytest.raises(ValueError, match="client_batching='stream' needs an "
                     "aggregator"):
    experiment.build(config, Extensions(aggregator=tx.aggregator(
        tx.clip("fixed", 1.0), normalization="buffer")))


def test_a_custom_aggregator_runs_and_auto_picks_its_path():
  # A trimmed mean without the data weight: not streamable, so on the CPU
  # auto batching materializes the buffer ("map").
  agg = tx.aggregator(tx.weight_by_age(lambda t: 1.0 / (1.0 + t)),
                      tx.robust_mean("trimmed_mean", 0.25),
                      normalization="buffer")
  exp = experiment.build(helpers.tiny_config("fedbuff"),
                         Extensions(name="trim", aggregator=agg))
  assert exp.sim.components.batching == "map"
  state, history, _ = exp.run()
  assert int(state.counters.values_trimmed[0]) > 0
  assert np.isfinite(history[-1]["test_loss"])


def test_last_write_wins_for_a_device_twice_in_one_buffer():
  clients = jnp.asarray([3, 1, 3, 0, 1])
  write = jnp.asarray([True, True, True, False, False])
  keep = engine._last_writes(clients, write)  # pylint: disable=protected-access
  # Client 3's later row (2) wins; client 1's only written row (1) stays;
  # unwritten rows are never kept.
  np.testing.assert_array_equal(keep, [False, True, True, False, False])
  table = {"c": jnp.zeros((5,))}
  rows = {"c": jnp.asarray([10.0, 11.0, 12.0, 13.0, 14.0])}
  out = engine._write_device_state(table, clients, rows, write)  # pylint: disable=protected-access
  np.testing.assert_array_equal(out["c"], [0.0, 11.0, 0.0, 12.0, 0.0])


def test_device_state_counts_completed_tasks():
  """A per-device counter: each device's row counts the tasks it completed
  (dropped tasks do not count); their total equals the engine's uploads.
  With step refill a device holds at most one task at a time; with arrival
  refill one that completes two tasks within one step trains both from the
  state the step began with and keeps the later (_last_writes)."""

  def make(config, model):
    base = client.sgd(losses.classification(model.apply_fn).loss,
                      config.engine.batch_size, model.tx)

    def update(key, params, mask, data, state):
      return base(key, params, mask, data)._replace(state=state.own + 1)

    return Extensions(name="count", client_update=update,
                      device_state=client.DeviceState(
                          init=lambda p: jnp.zeros((), jnp.int32)))

  config = helpers.tiny_config("fedbuff", engine_kw=dict(refill="step"),
                               fleet=fleet_lib.FleetConfig(dropout=0.3))
  exp = experiment.build(config, make)
  state, _, _ = exp.run()
  assert state.device_state.shape == (16,)
  assert int(state.counters.updates_dropped) > 0
  assert int(state.device_state.sum()) == int(state.counters.uploads)
