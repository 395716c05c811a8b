"""client_chunk=0: the step's memory from its compile, and the chunk chosen
to fit a budget (ftte_jax/experiment/memory_plan.py)."""

import dataclasses

import jax
import numpy as np
import pytest

import helpers
from ftte_jax import experiment
from ftte_jax.core import algorithms
from ftte_jax.core import engine
from ftte_jax.experiment import memory_plan as mp


def fake(peak):
  """A measure whose programs take ``peak(chunk)`` bytes, and its log."""
  calls = []

  def measure(batching, chunk):
    calls.append((batching, chunk))
    return mp.ProgramMemory(argument_bytes=0, output_bytes=0, alias_bytes=0,
                            temp_bytes=int(peak(batching, chunk)),
                            code_bytes=0)

  return measure, calls


def test_balanced_keeps_the_trips_and_evens_the_groups():
  assert mp.balanced(10_000, 3190) == 2500  # 4 trips either way
  assert mp.balanced(10, 4) == 4  # 3 trips: 4, 4, 2
  assert mp.balanced(10, 3) == 3  # 4 trips
  assert mp.balanced(7, 100) == 7
  assert mp.balanced(7, 0) == 1


def test_a_straight_line_is_fitted_and_checked_once():
  # peak(c) = 100 + 10 c within 1000: c <= 90, so 3 trips of 67 for 200.
  measure, calls = fake(lambda b, c: 100 + 10 * c)
  chunk, (a, b), log = mp.choose_chunk(measure, "stream", 200, 1000.0)
  assert chunk == 67
  assert (a, b) == pytest.approx((100, 10))
  assert sorted(c for _, c in calls) == [8, 32, 67]
  assert [r["peak_bytes"] for r in log if r["chunk"] == 67] == [770]


def test_a_shared_buffer_is_refitted_until_the_chunk_fits():
  # The [K, ...] buffer (1000 bytes) holds small groups' temporaries, so
  # the probes see no slope; the line past it is 500 + 10 c.
  measure, calls = fake(lambda b, c: max(1000, 500 + 10 * c))
  chunk, _, _ = mp.choose_chunk(measure, "map", 200, 1500.0)
  # Probes 8, 32 (flat: all 200 predicted to fit), 200 measured over
  # (2500), then the secants through (32, 1000)-(200, 2500) -> 67 and
  # (67, 1170)-(200, 2500) -> 100, which is exactly the budget.
  assert [c for _, c in calls] == [8, 32, 200, 67, 100]
  assert chunk == 100


def test_the_chunk_returned_was_measured_to_fit():
  # A step that jumps past the line: the chunk the line picks is over.
  measure, calls = fake(lambda b, c: 10 * c + (5000 if c > 50 else 0))
  chunk, _, log = mp.choose_chunk(measure, "stream", 400, 2000.0)
  peaks = {r["chunk"]: r["peak_bytes"] for r in log}
  assert peaks[chunk] <= 2000
  assert chunk == max(c for c, p in peaks.items() if p <= 2000)


def test_nothing_fits_names_the_budget():
  measure, _ = fake(lambda b, c: 5000 + c)
  with pytest.raises(ValueError, match="device_memory_budget.*stream"):
    mp.choose_chunk(measure, "stream", 100, 1000.0)


def test_narrowest_measures_one_client_only():
  measure, calls = fake(lambda b, c: 100 + 10 * c)
  assert mp.choose_chunk(measure, "stream", 100, 1000.0, widest=False)[0] == 1
  assert calls == [("stream", 1)]


def _accelerator(monkeypatch):
  """Trace-time choices as off the CPU (extensions.resolve_batching: vmap)."""
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")


@pytest.mark.parametrize("algorithm,chunked", [("fedbuff", "stream"),
                                               ("ftte", "map")])
def test_vmap_falls_back_to_chunks_when_all_k_do_not_fit(monkeypatch,
                                                         algorithm, chunked):
  _accelerator(monkeypatch)
  config = algorithms.preset(algorithm, concurrency=200, buffer_size=100,
                             client_chunk=0)
  measure, calls = fake(lambda b, c: 50 * 100 if b == "vmap" else 10 * c)
  plan = mp.plan_clients(config, measure, 1, budget=1000.0, widest=True)
  assert calls[0] == ("vmap", 1)
  assert plan.batching == chunked
  # 900 usable bytes: 90 a group, balanced over 100 clients -> 2 x 50.
  assert plan.chunk == 50 and plan.usable_bytes == pytest.approx(900)
  assert plan.measured[0]["batching"] == "vmap"


def test_vmap_is_kept_where_it_fits(monkeypatch):
  _accelerator(monkeypatch)
  config = algorithms.preset("fedbuff", concurrency=20, buffer_size=10,
                             client_chunk=0)
  measure, calls = fake(lambda b, c: 100)
  plan = mp.plan_clients(config, measure, 2, budget=1000.0, widest=True)
  assert (plan.batching, plan.chunk, plan.clients_per_device) == ("vmap", 1, 5)
  assert calls == [("vmap", 1)]


def test_explicit_vmap_that_does_not_fit_is_an_error():
  config = algorithms.preset("fedbuff", concurrency=20, buffer_size=10,
                             client_batching="vmap", client_chunk=0)
  measure, _ = fake(lambda b, c: 10_000)
  with pytest.raises(ValueError, match="client_batching=vmap.*client_chunk=0"):
    mp.plan_clients(config, measure, 1, budget=1000.0, widest=True)


def test_no_budget_on_the_cpu_is_one_client_without_a_compile():
  config = algorithms.preset("fedbuff", concurrency=20, buffer_size=10,
                             client_chunk=0)
  measure, calls = fake(lambda b, c: 1)
  plan = mp.plan_clients(config, measure, 1, budget=None, widest=False)
  assert (plan.batching, plan.chunk, calls) == ("stream", 1, [])


def test_budget_needs_auto_chunk():
  config = helpers.tiny_config("fedbuff", device_memory_budget=1e9)
  with pytest.raises(ValueError, match="device_memory_budget.*client_chunk=0"):
    experiment.validate(config)


@pytest.fixture(scope="module")
def tiny_setup():
  """A tiny FedBuff experiment (K = 8) and ``step_memory`` compiling each
  (batching, chunk) once for the whole module (compiles are seconds)."""
  config = helpers.tiny_config("fedbuff", engine_kw=dict(
      client_batching="stream", buffer_size=8, concurrency=8))
  exp = experiment.build(config)
  s = exp.setup
  args = (s.model.apply_fn, exp.env, s.model.params, s.plan,
          int(np.asarray(exp.env.num_steps).max()), s.model.tx)
  compiled, real = {}, mp.step_memory

  def step_memory(cfg, *a, **kw):
    key = (cfg.client_batching, cfg.client_chunk)
    if key not in compiled:
      compiled[key] = real(cfg, *a, **kw)
    return compiled[key]

  with pytest.MonkeyPatch.context() as m:
    m.setattr(mp, "step_memory", step_memory)
    yield config, args, compiled


def test_compiled_temporaries_grow_with_the_chunk(tiny_setup):
  config, args, _ = tiny_setup
  mem = {c: mp.step_memory(dataclasses.replace(config.engine, client_chunk=c),
                           *args)[0] for c in (1, 8)}
  assert mem[8].temp_bytes > mem[1].temp_bytes > 0
  # Donated state: the outputs are written into it.
  assert mem[1].alias_bytes > 0 and mem[1].argument_bytes > 0
  assert mem[1].peak_bytes == (mem[1].argument_bytes + mem[1].output_bytes -
                               mem[1].alias_bytes + mem[1].temp_bytes +
                               mem[1].code_bytes)
  assert mem[1].flops > 0


def test_plan_engine_picks_a_chunk_that_compiles_within_budget(tiny_setup):
  config, args, compiled = tiny_setup
  auto = dataclasses.replace(config.engine, client_chunk=0)
  one, eight = (mp.step_memory(dataclasses.replace(auto, client_chunk=c),
                               *args)[0] for c in (1, 8))
  # A budget between one and eight clients at a time.
  budget = (one.peak_bytes + eight.peak_bytes) / 2 / mp.USABLE_FRACTION
  resolved, plan = mp.plan_engine(auto, *args, budget=budget, widest=True)
  assert resolved.client_batching == "stream"
  assert 1 <= resolved.client_chunk < 8 == plan.clients_per_device
  chosen = [r for r in plan.measured if r["chunk"] == resolved.client_chunk]
  assert chosen and chosen[0]["peak_bytes"] <= plan.usable_bytes
  assert ("stream", resolved.client_chunk) in compiled
  # Everything fits: all 8 clients in one group.
  resolved, _ = mp.plan_engine(auto, *args, budget=1e12, widest=True)
  assert resolved.client_chunk == 8
  # A given chunk is not planned.
  assert mp.plan_engine(config.engine, *args) == (config.engine, None)


@pytest.mark.slow  # two experiments built, compiled and run
def test_auto_on_the_cpu_is_the_default_path_bit_for_bit():
  base = helpers.tiny_config("fedbuff", rounds=2, eval_every=2)
  auto = helpers.replace_engine(base, client_chunk=0)
  runs = []
  for config in (base, auto):
    exp = experiment.build(config)
    state, _, _ = exp.run()
    runs.append((exp, state))
  assert runs[0][0].client_plan is None
  plan = runs[1][0].client_plan
  assert (plan["batching"], plan["chunk"], plan["measured"]) == (
      "stream", 1, [])
  summary = runs[1][0].summary(runs[1][1], *runs[1][0].run(runs[1][1])[1:])
  assert summary["client_plan"] == plan
  # Every compiled run records its step's memory and XLA's FLOP count.
  memory = summary["step_memory"]
  assert memory["temp_bytes"] > 0 and memory["flops"] > 0
  assert memory == runs[0][0].step_memory
  helpers.assert_bit_identical(runs[0][1].params, runs[1][1].params)


def test_the_engine_alone_refuses_an_unresolved_chunk():
  config = algorithms.preset("fedbuff", concurrency=20, buffer_size=10,
                             client_chunk=0)
  with pytest.raises(ValueError, match="client_chunk=0.*experiment.build.*"
                     "plan_engine"):
    engine.make_simulator(config, lambda p, x: x)
