"""Means with Student-t confidence intervals over seeds, without scipy.

Studies run each configuration over several seeds and report a figure as
its mean with a two-sided ``level`` (default 95%) interval
``mean +- t_{(1+level)/2, n-1} * s / sqrt(n)`` (``s`` the sample standard
deviation). The t quantile is computed here: the Student-t CDF through the
regularized incomplete beta function (Lentz's continued fraction, as in
Numerical Recipes' ``betacf``), inverted by bisection to 1e-12.

A figure that some seeds never produce (time to a target a run never
reached) is summarized by ``censored``: how many seeds reached it, the
interval over those seeds only when every seed did, and a lower bound on
the mean with the unreached seeds counted at the time their runs ended.
"""

from __future__ import annotations

import math
from typing import Sequence

LEVEL = 0.95


def _betacf(a: float, b: float, x: float) -> float:
  """Continued fraction of the incomplete beta function (modified Lentz)."""
  tiny, eps = 1e-300, 1e-15
  qab, qap, qam = a + b, a + 1.0, a - 1.0
  c, d = 1.0, 1.0 - qab * x / qap
  d = 1.0 / (d if abs(d) > tiny else tiny)
  h = d
  for m in range(1, 10_000):
    m2 = 2 * m
    aa = m * (b - m) * x / ((qam + m2) * (a + m2))
    d = 1.0 + aa * d
    d = 1.0 / (d if abs(d) > tiny else tiny)
    c = 1.0 + aa / c
    c = c if abs(c) > tiny else tiny
    h *= d * c
    aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
    d = 1.0 + aa * d
    d = 1.0 / (d if abs(d) > tiny else tiny)
    c = 1.0 + aa / c
    c = c if abs(c) > tiny else tiny
    delta = d * c
    h *= delta
    if abs(delta - 1.0) < eps:
      return h
  raise ArithmeticError(f"incomplete beta did not converge (a={a}, b={b}, "
                        f"x={x})")


def betainc(a: float, b: float, x: float) -> float:
  """Regularized incomplete beta ``I_x(a, b)`` for ``a, b > 0``, x in [0, 1]."""
  if not (a > 0 and b > 0 and 0 <= x <= 1):
    raise ValueError(f"betainc needs a, b > 0 and x in [0, 1], got a={a}, "
                     f"b={b}, x={x}")
  if x in (0.0, 1.0):
    return x
  log_front = (math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) +
               a * math.log(x) + b * math.log1p(-x))
  if x < (a + 1.0) / (a + b + 2.0):
    return math.exp(log_front) * _betacf(a, b, x) / a
  return 1.0 - math.exp(log_front) * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
  """``P(T <= t)`` for Student's t with ``df > 0`` degrees of freedom
  (``df = inf``: the standard normal)."""
  if not df > 0:
    raise ValueError(f"df must be > 0, got {df}")
  if math.isinf(df):
    return 0.5 * math.erfc(-t / math.sqrt(2.0))
  tail = 0.5 * betainc(df / 2.0, 0.5, df / (df + t * t))
  return 1.0 - tail if t > 0 else tail


def t_quantile(p: float, df: float) -> float:
  """The ``p`` quantile of Student's t with ``df`` degrees of freedom.

  Bisection on ``t_cdf`` to an absolute 1e-12 (the CDF is monotone).
  """
  if not 0 < p < 1:
    raise ValueError(f"p must be in (0, 1), got {p}")
  if p < 0.5:
    return -t_quantile(1.0 - p, df)
  if p == 0.5:
    return 0.0
  lo, hi = 0.0, 1.0
  while t_cdf(hi, df) < p:
    lo, hi = hi, hi * 2.0
  while hi - lo > 1e-12 * max(1.0, hi):
    mid = 0.5 * (lo + hi)
    if t_cdf(mid, df) < p:
      lo = mid
    else:
      hi = mid
  return 0.5 * (lo + hi)


def mean_ci(values: Sequence[float], level: float = LEVEL) -> dict:
  """Mean and two-sided Student-t interval of ``values`` (None entries are
  an error: use ``censored`` for figures some seeds lack).

  Returns:
    ``{n, mean, sd, half_width, low, high}``; with one value the interval
    is unknown (``half_width``, ``low``, ``high`` and ``sd`` None); with
    none, every field but ``n`` is None.
  """
  if not 0 < level < 1:
    raise ValueError(f"level must be in (0, 1), got {level}")
  xs = [float(v) for v in values]
  if any(not math.isfinite(x) for x in xs):
    raise ValueError(f"mean_ci needs finite numbers, got {list(values)}")
  n = len(xs)
  out = {"n": n, "mean": None, "sd": None, "half_width": None, "low": None,
         "high": None}
  if n == 0:
    return out
  mean = math.fsum(xs) / n
  out["mean"] = mean
  if n == 1:
    return out
  sd = math.sqrt(math.fsum((x - mean) ** 2 for x in xs) / (n - 1))
  hw = t_quantile(0.5 + level / 2.0, n - 1) * sd / math.sqrt(n)
  out.update(sd=sd, half_width=hw, low=mean - hw, high=mean + hw)
  return out


def censored(values: Sequence[float | None], ends: Sequence[float],
             level: float = LEVEL) -> dict:
  """A time-to-event figure over seeds, some of which never saw the event.

  Args:
    values: per seed, the time (None: the run ended before the event).
    ends: per seed, when its run ended (the unreached seed's time is
      larger than this).
    level: interval level.

  Returns:
    ``mean_ci`` over the seeds that reached it, plus ``seeds`` (all),
    ``reached`` (how many), ``all_reached`` and ``lower_bound_mean``: the
    mean with each unreached seed counted at its end time, a lower bound on
    the mean the full runs would give. When some seed did not reach it,
    ``mean``/``low``/``high`` describe only the seeds that did and must be
    read with ``reached``.
  """
  if len(values) != len(ends):
    raise ValueError(f"values ({len(values)}) and ends ({len(ends)}) must "
                     "have one entry per seed")
  got = [v for v in values if v is not None]
  out = mean_ci(got, level)
  n = len(values)
  bound = [v if v is not None else e for v, e in zip(values, ends)]
  out.update(seeds=n, reached=len(got), all_reached=len(got) == n,
             lower_bound_mean=(math.fsum(bound) / n if n and all(
                 b is not None for b in bound) else None))
  return out


def fmt(ci: dict | None, digits: int = 3, scale: float = 1.0,
        unit: str = "") -> str:
  """A summarized figure as text, ``mean ± half width`` times ``scale``,
  saying how many seeds reached a time to target (``(k/n reached)``) or
  gave a paired contrast (``[k/n seeds]``) when not all did."""
  if ci is None:
    return "-"
  if ci.get("mean") is None:
    if ci.get("reached") == 0 and ci.get("seeds"):
      return f"never (0/{ci['seeds']} reached)"
    if ci.get("defined") == 0 and ci.get("seeds"):
      return f"- [0/{ci['seeds']} seeds]"
    return "-"
  text = f"{ci['mean'] * scale:.{digits}g}{unit}"
  if ci.get("half_width") is not None:
    text += f" ± {ci['half_width'] * scale:.2g}{unit}"
  if ci.get("reached") is not None and not ci.get("all_reached"):
    text += f" ({ci['reached']}/{ci['seeds']} reached)"
  if ci.get("defined") is not None and ci["defined"] < ci["seeds"]:
    text += f" [{ci['defined']}/{ci['seeds']} seeds]"
  return text
