"""Extension points: the pieces of an algorithm a user may supply.

Everything the engine runs is one of these pure callables; the command
line's presets build them from an ``EngineConfig`` (``bind``), so the same
mechanism runs every experiment. A user passes any of them, in an
``Extensions``, to ``engine.make_simulator`` or ``experiment.build``:

=================  ========================================================
``staleness_fn``   ``tau [K] int32 -> [K] float32`` age weight (replaces
                   the config's named staleness function).
``aggregator``     ``transforms.Aggregator``: weigh the buffer, then reduce
                   it to the aggregate (replaces the config's composition).
``server_optimizer`` any ``optax.GradientTransformation``; it receives the
                   aggregate as a pseudo-gradient ``-Delta`` (FedAdam,
                   FedYogi: ``optax.adam``, ``optax.yogi``).
``loss_fn``        ``(params, batch) -> (loss, aux)`` (``losses``): what the
                   default client update minimizes.
``metrics_fn``     ``(params, batch) -> {name: (sum, count)}``: the held-out
                   evaluation (``losses``).
``client_update``  ``(key, params, mask, data, state) -> ClientResult``
                   (``client``): replaces local training altogether.
``device_state``   ``client.DeviceState``: per-device state kept between a
                   device's tasks, passed to the client update.
=================  ========================================================

``check`` traces each one on abstract values (``jax.eval_shape``) and
raises a ValueError naming the extension point and the shape it expected,
before anything is compiled.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from ftte_jax.core import algorithms
from ftte_jax.core import client as client_lib
from ftte_jax.core import losses
from ftte_jax.core import transforms
from ftte_jax.core.typing import PyTree


@dataclasses.dataclass(frozen=True)
class Extensions:
  """User-supplied pieces of an algorithm; None: built from the config.

  ``name`` identifies the combination in a run's config.json and
  configuration hash, so a workdir of one algorithm is never resumed as
  another.
  """

  name: str = "none"
  staleness_fn: Callable[[jnp.ndarray], jnp.ndarray] | None = None
  aggregator: transforms.Aggregator | None = None
  server_optimizer: optax.GradientTransformation | None = None
  loss_fn: losses.LossFn | None = None
  metrics_fn: losses.MetricsFn | None = None
  client_update: client_lib.ClientUpdate | None = None
  device_state: client_lib.DeviceState | None = None

  def __post_init__(self):
    if self.staleness_fn is not None and self.aggregator is not None:
      raise ValueError("staleness_fn: give it or an aggregator, not both (an "
                       "aggregator weighs by age itself: "
                       "transforms.weight_by_age(staleness_fn))")
    for field in dataclasses.fields(self):
      value = getattr(self, field.name)
      if field.name != "name" and value is not None:
        _check_callable(field.name, value)

  @property
  def given(self) -> tuple[str, ...]:
    """Names of the extension points set."""
    return tuple(f.name for f in dataclasses.fields(self)
                 if f.name != "name" and getattr(self, f.name) is not None)


# What each extension point must be: (kind, positional arity).
_SHAPES = {
    "staleness_fn": ("callable", 1), "loss_fn": ("callable", 2),
    "metrics_fn": ("callable", 2), "client_update": ("callable", 5),
    "aggregator": (transforms.Aggregator, None),
    "server_optimizer": (optax.GradientTransformation, None),
    "device_state": (client_lib.DeviceState, None),
}


def _check_callable(name: str, value: Any) -> None:
  """Type and arity of one extension point (ValueError naming it)."""
  kind, arity = _SHAPES[name]
  if kind != "callable":
    if not isinstance(value, kind):
      raise ValueError(f"{name}: expected a {kind.__module__.split('.')[-1]}."
                       f"{kind.__name__}, got {type(value).__name__}")
    return
  if not callable(value):
    raise ValueError(f"{name}: expected a callable, got "
                     f"{type(value).__name__}")
  try:
    inspect.signature(value).bind(*range(arity))
  except TypeError as e:
    raise ValueError(f"{name}: must accept {arity} positional arguments "
                     f"({_SIGNATURES[name]}); {e}") from None
  except ValueError:  # no signature (a builtin): checked when traced.
    pass


_SIGNATURES = {
    "staleness_fn": "tau",
    "loss_fn": "params, batch",
    "metrics_fn": "params, batch",
    "client_update": "key, params, mask, data, state",
}


@dataclasses.dataclass(frozen=True)
class Components:
  """The pure pieces one engine config binds to, derived once (``bind``).

  Every phase of the step reads what it needs from here, so their
  signatures say what each uses.
  """

  config: algorithms.EngineConfig
  client_update: client_lib.ClientUpdate
  # What the default client update minimizes (None: a custom client update
  # without a loss_fn); per-device fine-tuning trains on it too.
  loss_fn: losses.LossFn | None
  aggregator: transforms.Aggregator
  server_optimizer: optax.GradientTransformation
  metrics_fn: losses.MetricsFn
  device_state: client_lib.DeviceState | None
  batching: str  # vmap | map | stream: how a step's K clients are trained.
  mesh: Mesh | None  # the clients mesh; None: one device.
  extensions: Extensions = Extensions()


def resolve_batching(config: algorithms.EngineConfig,
                     streamable: bool) -> str:
  """How the K clients of a step are trained.

  ``auto``: on CPU ``stream`` when the aggregator allows it (its
  transforms need no update values), else ``map``; ``vmap`` on
  accelerators. Measured with ``experiments/benchmarks/throughput.py``.
  """
  batching = config.client_batching
  if batching == "stream" and not streamable:
    raise ValueError(
        "client_batching='stream' needs an aggregator whose transforms all "
        "allow streaming (no variance weight, clipping, robust mean or DP "
        "noise): they read every update of the buffer; use map, vmap or auto")
  if batching == "auto":
    if jax.default_backend() != "cpu":
      return "vmap"
    return "stream" if streamable else "map"
  return batching


def bind(config: algorithms.EngineConfig, apply_fn: Callable | None,
         max_local_steps: int, client_tx: optax.GradientTransformation,
         kinds: PyTree | None, mesh: Mesh | None,
         extensions: Extensions | None = None,
         task: losses.Task | None = None) -> Components:
  """Fills every piece ``extensions`` leaves out from ``config``.

  The default loss and metrics are ``task``'s (the dataset's, e.g.
  ``losses.sequence``), else the classification task of ``apply_fn``;
  ``apply_fn`` may be None when ``extensions`` gives both (and, for
  training, a loss or a client update).
  """
  ext = extensions or Extensions()
  if task is None and apply_fn is not None:
    task = losses.classification(apply_fn)
  loss_fn = ext.loss_fn or (task.loss if task else None)
  metrics_fn = ext.metrics_fn or (task.metrics if task else None)
  if ext.client_update is None and loss_fn is None:
    raise ValueError("loss_fn: no apply_fn to build the default loss from; "
                     "pass apply_fn, a loss_fn or a client_update")
  if metrics_fn is None:
    raise ValueError("metrics_fn: no apply_fn to build the default metrics "
                     "from; pass apply_fn or a metrics_fn")
  client_update = ext.client_update or client_lib.sgd(
      loss_fn, config.batch_size, client_tx, max_local_steps,
      unroll=True if config.unroll_local_steps else 1, kinds=kinds,
      compute_dtype=config.compute_dtype)
  agg = ext.aggregator or algorithms.aggregator_from_config(
      config, ext.staleness_fn)
  server_opt = ext.server_optimizer or algorithms.server_optimizer(config)
  return Components(
      config=config, client_update=client_update, loss_fn=loss_fn,
      aggregator=agg, server_optimizer=server_opt, metrics_fn=metrics_fn,
      device_state=ext.device_state,
      batching=resolve_batching(config, agg.streamable), mesh=mesh,
      extensions=ext)


def _abstract(tree: PyTree) -> PyTree:
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(jnp.shape(x),
                                                     jnp.result_type(x)),
                      tree)


def _trace(name: str, fn: Callable, *args) -> Any:
  """``jax.eval_shape(fn, *args)``, a failure re-raised naming ``name``."""
  try:
    return jax.eval_shape(fn, *args)
  except ValueError as e:
    if str(e).startswith(name):
      raise
    raise ValueError(f"{name}: failed on abstract inputs: "
                     f"{' '.join(str(e).split())[:300]}") from e
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(f"{name}: failed on abstract inputs "
                     f"({type(e).__name__}): "
                     f"{' '.join(str(e).split())[:300]}") from e


def _scalar(x) -> bool:
  return getattr(x, "shape", None) == () and jnp.issubdtype(
      getattr(x, "dtype", jnp.int32), jnp.floating)


# Every extension point checked in one pass, in the order the step calls
# them, so each error names its point before anything compiles.
def check(comp: Components, params: PyTree, masks: PyTree, data,
          test: dict | None = None) -> None:
  """Traces every user-supplied piece on abstract values.

  Args:
    comp: from ``bind``.
    params: the global parameters (or their shapes).
    masks: the plan's tier masks, leaves [T, ...].
    data: the ``ClientData`` (or its shapes).
    test: one evaluation batch's worth of the test set (or its shapes).

  Raises:
    ValueError: naming the extension point, what it returned and what it
      must return.
  """
  ext = comp.extensions
  k = comp.config.buffer_size
  params = _abstract(params)
  if ext.staleness_fn is not None:
    out = _trace("staleness_fn", ext.staleness_fn,
                 jax.ShapeDtypeStruct((k,), jnp.int32))
    if getattr(out, "shape", None) != (k,) or not jnp.issubdtype(
        out.dtype, jnp.floating):
      raise ValueError(f"staleness_fn: must map tau [K={k}] int32 to weights "
                       f"[{k}] float, got {_describe(out)}")
  batch = jax.tree.map(
      lambda a: jax.ShapeDtypeStruct((comp.config.batch_size,) + a.shape[1:],
                                     a.dtype),
      {"x": data.x, "y": data.y, **data.extras})
  if ext.loss_fn is not None:
    out = _trace("loss_fn", ext.loss_fn, params, batch)
    if not (isinstance(out, tuple) and len(out) == 2 and _scalar(out[0])
            and isinstance(out[1], dict)):
      raise ValueError("loss_fn: must return (loss, aux) with loss a float "
                       f"scalar and aux a dict, got {_describe(out)}")
  if ext.metrics_fn is not None and test is not None:
    tb = dict(_abstract(test))
    b = jax.tree.leaves(tb)[0].shape[0]
    tb["weight"] = jax.ShapeDtypeStruct((b,), jnp.float32)
    out = _trace("metrics_fn", ext.metrics_fn, params, tb)
    ok = isinstance(out, dict) and {"loss", "accuracy"} <= set(out) and all(
        isinstance(v, tuple) and len(v) == 2 and all(
            getattr(x, "shape", None) == () for x in v) for v in out.values())
    if not ok:
      raise ValueError("metrics_fn: must return {name: (sum, count)} of "
                       "scalars with at least 'loss' and 'accuracy', got "
                       f"{_describe(out)}")
  own = None
  if comp.device_state is not None:
    own = _trace("device_state", comp.device_state.init, params)
  if ext.client_update is not None or own is not None:
    mask = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape[1:], m.dtype),
                        _abstract(masks))
    i32 = jax.ShapeDtypeStruct((), jnp.int32)
    local = client_lib.LocalData(source=_abstract(data), offset=i32,
                                 count=i32, num_steps=i32)
    state = None if own is None else client_lib.PerDevice(own=own,
                                                          fleet_mean=own)
    out = _trace("client_update", comp.client_update,
                 jax.ShapeDtypeStruct((2,), jnp.uint32), params, mask, local,
                 state)
    client_lib.check_result(out, params, own)
  if ext.server_optimizer is not None:
    opt = comp.server_optimizer
    st = _trace("server_optimizer", opt.init, params)
    out = _trace("server_optimizer", opt.update, params, st, params)
    client_lib.check_like("server_optimizer", "updates", out[0], params)
  if ext.aggregator is not None:
    _check_aggregator(comp.aggregator, params, _abstract(masks), k)


def _check_aggregator(agg: transforms.Aggregator, params, masks, k: int
                      ) -> None:
  """The aggregator on an abstract buffer of K updates."""
  deltas = jax.tree.map(lambda p: jax.ShapeDtypeStruct((k,) + p.shape,
                                                       p.dtype), params)

  def run(deltas):
    buf = transforms.Buffer.start(jnp.ones((k,), bool), jnp.zeros((k,),
                                                                  jnp.int32),
                                  jnp.ones((k,), jnp.int32),
                                  jnp.zeros((k,), jnp.int32),
                                  jnp.zeros((k,), jnp.int32))
    buf = buf.replace(deltas=deltas, loss=jnp.zeros((k,)))
    ctx = transforms.Context(masks=jax.tree.map(jnp.ones_like, masks),
                             key=jax.random.PRNGKey(0),
                             params=jax.tree.map(jnp.zeros_like, params))
    buf, _ = agg.transform.update(buf, agg.init(ctx.params), ctx)
    return buf, agg.reduction.reduce(buf, ctx, None)

  buf, out = _trace("aggregator", run, deltas)
  if getattr(buf.weights, "shape", None) != (k,):
    raise ValueError(f"aggregator: the weights must stay [K={k}], got "
                     f"{_describe(buf.weights)}")
  client_lib.check_like("aggregator", "aggregate", out, params)


def _describe(x: Any) -> str:
  if hasattr(x, "shape"):
    return f"shape {tuple(x.shape)} {x.dtype}"
  if isinstance(x, (tuple, list)):
    return f"{type(x).__name__} of {len(x)}: " + ", ".join(
        _describe(v) for v in x)
  if isinstance(x, dict):
    return "dict with keys " + str(sorted(x))
  return type(x).__name__
