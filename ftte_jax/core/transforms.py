"""Server aggregation as a chain of small pure transforms over a step's buffer.

A server step holds K updates (the buffer). What the server does with them
is a composition, in the style of optax: each ``BufferTransform`` is an
``init``/``update`` pair that reads the ``Buffer`` (the updates, their
metadata and the weights decided so far) and returns a new one;
``chain`` composes them; a ``Reduction`` turns the weighted buffer into the
aggregate, which the server optimizer (any ``optax.GradientTransformation``)
then applies. The four presets are such compositions
(``ftte_jax.core.algorithms``), and so is anything a user writes.

Streaming. When every transform of a chain is ``streamable`` (it reads no
update values and treats each update on its own), the engine weighs the
buffer before training and streams the clients, keeping only the running
weighted sum, never the K deltas (``engine.train_and_sum``). A transform
that needs the updates (variance weight, clipping, robust means, DP noise)
makes the chain non-streamable, and the engine materializes the buffer.

Contract of a ``BufferTransform.update(buffer, state, context)``:
* it returns ``(buffer, state)``, the buffer changed with ``.replace``;
* weights stay ``>= 0`` and are 0 wherever ``buffer.valid`` is False;
* a streamable transform reads only ``weights``, ``base``, ``valid``,
  ``tau``, ``counts``, ``tier`` and ``clients``, each update's new weight
  depending on that update alone: the engine applies it before training and
  zeroes updates that turn out non-finite afterwards.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
from flax import struct

from ftte_jax.core import aggregation
from ftte_jax.core import privacy
from ftte_jax.core import robust
from ftte_jax.core import staleness as staleness_lib
from ftte_jax.core.typing import PyTree


@struct.dataclass
class Buffer:
  """A step's K buffered updates and what the transforms decided so far."""

  weights: jnp.ndarray  # [K] float32: a_i, the weight of each update.
  # [K] float32: the weights without the age and variance factors: data
  # size x validity (the 'damped' normalization's denominator).
  base: jnp.ndarray
  valid: jnp.ndarray  # [K] bool: arrived, fresh (in the ring) and finite.
  tau: jnp.ndarray  # [K] int32: staleness, server version minus pulled.
  counts: jnp.ndarray  # [K] int32: each client's training examples n_i.
  tier: jnp.ndarray  # [K] int32: each update's mask tier.
  clients: jnp.ndarray  # [K] int32: which device sent each update.
  # Leaves [K, ...]: w_local - w_pulled, zero off each mask and on
  # non-finite rows; None while weighing before training (streamed).
  deltas: PyTree = None
  loss: jnp.ndarray | None = None  # [K] float32 mean local loss, or None.
  # Leaves [K, ...] in {0, 1}: values a robust mean keeps (None: all).
  keep: PyTree = None
  noise: PyTree = None  # leaves like one delta: added to the weighted sum.
  # Counters the defences report, summed into ``Counters``.
  updates_clipped: jnp.ndarray = struct.field(
      default_factory=lambda: jnp.zeros((), jnp.int32))  # [] int32.
  values_trimmed: jnp.ndarray = struct.field(
      default_factory=lambda: jnp.zeros((), jnp.float32))  # [] float32.
  values_robust: jnp.ndarray = struct.field(
      default_factory=lambda: jnp.zeros((), jnp.float32))  # [] float32.

  @classmethod
  def start(cls, valid: jnp.ndarray, tau: jnp.ndarray, counts: jnp.ndarray,
            tier: jnp.ndarray, clients: jnp.ndarray) -> Buffer:
    """A buffer before any transform: weight 1 per valid update, else 0."""
    w = valid.astype(jnp.float32)
    return cls(weights=w, base=w, valid=valid, tau=tau, counts=counts,
               tier=tier, clients=clients)

  def invalidate(self, bad: jnp.ndarray) -> Buffer:
    """The buffer with updates ``bad`` [K] made invalid and weight 0."""
    return self.replace(valid=self.valid & ~bad,
                        weights=jnp.where(bad, 0.0, self.weights),
                        base=jnp.where(bad, 0.0, self.base))


@struct.dataclass
class Context:
  """What a step's transforms may read besides the buffer."""

  masks: PyTree  # leaves [T, ...] in {0, 1}: the coordinates each tier trains.
  key: jax.Array  # this step's aggregation key (DP noise).
  params: PyTree  # the global model before the step.


class BufferTransform(NamedTuple):
  """A pure transform of a step's buffer (optax style).

  Attributes:
    init: ``init(params) -> state``: the transform's state at the start of
      a run (``()`` for a stateless one); it is checkpointed with the run.
    update: ``update(buffer, state, context) -> (buffer, state)``.
    streamable: whether it may run before training (see the module
      docstring); False makes the engine keep every update of the buffer.
  """

  init: Callable[[PyTree], Any]
  update: Callable[[Buffer, Any, Context], tuple[Buffer, Any]]
  streamable: bool = False


def stateless(fn: Callable[[Buffer, Context], Buffer],
              streamable: bool = False) -> BufferTransform:
  """A ``BufferTransform`` from ``fn(buffer, context) -> buffer``."""
  return BufferTransform(init=lambda params: (),
                         update=lambda b, s, c: (fn(b, c), s),
                         streamable=streamable)


def chain(*transforms: BufferTransform) -> BufferTransform:
  """Applies ``transforms`` in order; streamable iff every one is."""

  def init(params):
    return tuple(t.init(params) for t in transforms)

  def update(buffer, state, context):
    new_state = []
    for t, s in zip(transforms, state):
      buffer, s = t.update(buffer, s, context)
      new_state.append(s)
    return buffer, tuple(new_state)

  return BufferTransform(init=init, update=update,
                         streamable=all(t.streamable for t in transforms))


# -- Weights -----------------------------------------------------------------


def weight_by_data(exponent: float = 1.0) -> BufferTransform:
  """``a_i *= n_i^gamma`` (and the base weight too): FedAvg's data weight."""

  def fn(b, c):
    n = b.counts.astype(jnp.float32) ** exponent
    return b.replace(base=n * b.base, weights=n * b.weights)

  return stateless(fn, streamable=True)


def weight_by_age(staleness_fn: Callable[[jnp.ndarray], jnp.ndarray]
                  ) -> BufferTransform:
  """``a_i *= s(tau_i)`` for any ``staleness_fn(tau [K] int32) -> [K]``."""
  return stateless(
      lambda b, c: b.replace(weights=b.weights * staleness_fn(b.tau)),
      streamable=True)


def weight_by_variance(beta: float = 1.0) -> BufferTransform:
  """FTTE's variance weight: ``a_i *= s_var(d_i)``, scaled to mean 1.

  ``d_i = ||m_i (D_i - mean)||^2 / ||m_i mean||^2`` against the buffer's
  weighted consensus (``aggregation.deviation``); ``s_var = 1/(1+beta d)``
  (``staleness.buffer_variance_weight``). Needs the updates.
  """

  def fn(b, c):
    # d_i is a ratio, so scaling every update by one power of two changes
    # no bit of it, and huge (finite) updates no longer overflow squares.
    _, e = jnp.frexp(jnp.max(jnp.stack(
        [jnp.max(jnp.abs(d)) for d in jax.tree.leaves(b.deltas)])))
    scaled = jax.tree.map(lambda d: d * jnp.ldexp(1.0, -e), b.deltas)
    consensus = aggregation.weighted_mean(scaled, c.masks, b.tier, b.weights)
    dev = aggregation.deviation(scaled, c.masks, b.tier, consensus)
    return b.replace(weights=b.weights * staleness_lib.buffer_variance_weight(
        dev, b.valid, beta))

  return stateless(fn)


# -- Defences and privacy -----------------------------------------------------


def clip(mode: str = "fixed", bound: float = 1.0) -> BufferTransform:
  """Scales each valid update to L2 norm at most a bound: ``fixed`` or the
  ``median`` norm of the step's valid updates (``robust.clip_updates``)."""

  def fn(b, c):
    deltas, clipped = robust.clip_updates(b.deltas, b.valid, mode, bound)
    return b.replace(deltas=deltas, updates_clipped=b.updates_clipped +
                     jnp.sum(clipped).astype(jnp.int32))

  return stateless(fn)


def robust_mean(mode: str = "trimmed_mean",
                trim_fraction: float = 0.1) -> BufferTransform:
  """Per coordinate, keeps the middle values only: a trimmed mean or the
  median (``robust.keep_mask``); the reduction then applies the weights and
  normalization to what is kept."""

  def fn(b, c):
    keep, trimmed, values = robust.keep_mask(b.deltas, c.masks, b.tier,
                                             b.valid, mode, trim_fraction)
    return b.replace(keep=keep, values_trimmed=b.values_trimmed + trimmed,
                     values_robust=b.values_robust + values)

  return stateless(fn)


def dp_noise(noise_multiplier: float, clip_norm: float) -> BufferTransform:
  """Client-level DP: ``N(0, (z S)^2)`` on every coordinate a valid update
  could change, added to the weighted sum (``privacy``). Sound only after
  ``clip('fixed', S)`` and with weights in [0, 1] (``algorithms.validate``
  checks the presets)."""
  std = privacy.noise_std(noise_multiplier, clip_norm)

  def fn(b, c):
    return b.replace(noise=privacy.gaussian_noise(
        c.key, privacy.coverage(c.masks, b.tier, b.valid), std))

  # Not streamable: the coverage reads which updates ended up valid.
  return stateless(fn)


# -- Reduction ----------------------------------------------------------------


class Reduction(NamedTuple):
  """Turns a weighted buffer into the aggregate update.

  ``reduce(buffer, context, total)``: ``total`` is the streamed weighted sum
  ``sum_i a_i D_i`` (None: compute it from ``buffer.deltas``).
  """

  reduce: Callable[[Buffer, Context, PyTree], PyTree]


def normalize(kind: str = "coordinate", eps: float = 1e-12) -> Reduction:
  """The coordinate-wise aggregate ``aggregation.aggregate`` computes.

  ``coordinate``: each coordinate over the weights of the updates that
  trained it; ``damped``: over their base weights, so age and variance
  factors shrink the step; ``buffer``: over the number of valid updates.
  A robust mean's ``keep`` and DP's ``noise`` are honoured.
  """
  if kind not in aggregation.NORMALIZATIONS:
    raise ValueError(f"normalization must be one of "
                     f"{aggregation.NORMALIZATIONS}, got {kind!r}")

  def reduce(b: Buffer, c: Context, total: PyTree = None) -> PyTree:
    if total is None:
      return aggregation.aggregate(b.deltas, c.masks, b.tier, b.weights, kind,
                                   eps, base_weights=b.base, keep=b.keep,
                                   noise=b.noise)
    if b.noise is not None:
      total = jax.tree.map(jnp.add, total, b.noise)
    return aggregation.normalize(total, c.masks, b.tier, b.weights, kind,
                                 eps, base_weights=b.base)

  return Reduction(reduce=reduce)


class Aggregator(NamedTuple):
  """What the server does with a buffer: weigh (a chain), then reduce."""

  transform: BufferTransform
  reduction: Reduction

  @property
  def streamable(self) -> bool:
    return self.transform.streamable

  def init(self, params: PyTree) -> Any:
    return self.transform.init(params)


def aggregator(*transforms: BufferTransform,
               normalization: str = "coordinate") -> Aggregator:
  """``Aggregator(chain(*transforms), normalize(normalization))``."""
  return Aggregator(chain(*transforms), normalize(normalization))
