"""Presets: what each pins (``algorithms.pinned``), and ``preset``."""

import pytest

from ftte_jax.core import algorithms


@pytest.mark.parametrize("name, overrides, pins", [
    ("fedasync", {}, {"buffer_size": 1}),
    ("fedasync", {"buffer_size": 4, "concurrency": 8}, {"buffer_size": 1}),
    ("fedavg", {}, {"concurrency": algorithms.EngineConfig.buffer_size,
                    "refill": "step"}),
    ("fedavg", {"buffer_size": 4, "concurrency": 8},
     {"concurrency": 4, "refill": "step"}),
    ("fedbuff", {"buffer_size": 4}, {}),
    ("ftte", {"buffer_size": 4}, {}),
])
def test_pinned(name, overrides, pins):
  assert algorithms.pinned(name, overrides) == pins


def test_pinned_unknown_preset():
  with pytest.raises(ValueError, match="algorithm must be one of"):
    algorithms.pinned("sgd", {})


@pytest.mark.parametrize("name", algorithms.PRESETS)
@pytest.mark.parametrize("shared", [{}, {"concurrency": 8, "buffer_size": 4},
                                    {"buffer_size": 2}])
def test_shared_overrides_with_pins_make_a_valid_preset(name, shared):
  # What a launcher running several presets on one setup relies on.
  pins = algorithms.pinned(name, shared)
  config = algorithms.preset(name, **{**shared, **pins})
  for key, value in pins.items():
    assert getattr(config, key) == value
  for key, value in shared.items():
    if key not in pins:
      assert getattr(config, key) == value


def test_preset_applies_and_enforces_pins():
  assert algorithms.preset("fedasync").buffer_size == 1
  assert algorithms.preset("fedavg", buffer_size=4).concurrency == 4
  assert algorithms.preset("fedavg", buffer_size=4,
                           concurrency=4).concurrency == 4
  with pytest.raises(ValueError, match="^fedasync .*buffer_size must be 1, "
                     "got buffer_size=4"):
    algorithms.preset("fedasync", buffer_size=4)
  with pytest.raises(ValueError, match=r"^fedavg is synchronous: concurrency "
                     r"must equal buffer_size \(4\) and refill must be "
                     r"'step', got concurrency=8"):
    algorithms.preset("fedavg", buffer_size=4, concurrency=8)
  # Synchronous rounds refill together: arrival refill would run it
  # asynchronously under FedAvg's name.
  assert algorithms.preset("fedavg").refill == "step"
  with pytest.raises(ValueError, match=r"^fedavg is synchronous: .* refill "
                     r"must be 'step', got refill='arrival'"):
    algorithms.preset("fedavg", refill="arrival")


def test_preset_ring_size_follows_c_over_k():
  assert algorithms.preset("fedasync", concurrency=100).ring_size == 400
  assert algorithms.preset("fedbuff", concurrency=8, buffer_size=4
                           ).ring_size == 16
  assert algorithms.preset("fedbuff", ring_size=5).ring_size == 5


@pytest.mark.parametrize("overrides, message", [
    (dict(buffer_size=20, concurrency=10), r"buffer_size \(K=20\) must be <="),
    (dict(client_lr=float("nan")), "client_lr must be a positive finite"),
    (dict(nope=1), "unknown engine option"),
])
def test_preset_validates(overrides, message):
  with pytest.raises(ValueError, match=message):
    algorithms.preset("fedbuff", **overrides)
