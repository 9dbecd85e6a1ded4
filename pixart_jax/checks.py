"""Checks of user-given values (API arguments, config fields, flags): each raises one ValueError naming the input,
the value and what is valid. Library code calls them where a value enters (Pipeline, train config, ...), so the
command lines and the Python API refuse the same things with the same words."""
from __future__ import annotations

import math
import numbers

__all__ = ["positive", "non_negative", "finite", "seed", "MAX_SEED"]

# jax.random.key keeps the low 32 bits of a seed (without x64): 2**32 and 0 are the same key, -1 and 2**32 - 1 too.
MAX_SEED = 2**32 - 1


def _is_int(value) -> bool:
  return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def positive(name: str, value, *, allow_none: bool = False):
  """`value` as an int if it is an integer >= 1 (or None when allowed); else ValueError naming `name`."""
  if value is None and allow_none:
    return value
  if not _is_int(value) or value < 1:
    raise ValueError(f"{name} must be a positive integer (>= 1), got {value!r}")
  return int(value)


def non_negative(name: str, value):
  """`value` as an int if it is an integer >= 0; else ValueError naming `name`."""
  if not _is_int(value) or value < 0:
    raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
  return int(value)


def finite(name: str, value, *, low: float | None = None, high: float | None = None, low_open: bool = False):
  """`value` as a float if it is a finite real number in [low, high] ((low, high] with `low_open`); else ValueError
  naming `name`."""
  ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
  if ok and low is not None and (value <= low if low_open else value < low):
    ok = False
  if ok and high is not None and value > high:
    ok = False
  if not ok:
    lo = "" if low is None else f"{'>' if low_open else '>='} {low:g}"
    hi = "" if high is None else f"<= {high:g}"
    rng = " and ".join(x for x in (lo, hi) if x)
    raise ValueError(f"{name} must be a finite number{' ' + rng if rng else ''}, got {value!r}")
  return float(value)


def seed(name: str, value):
  """`value` as an int if it is an integer in [0, 2**32 - 1] (distinct `jax.random.key`s); else ValueError."""
  if not _is_int(value) or not 0 <= value <= MAX_SEED:
    raise ValueError(f"{name} must be an integer in [0, 2**32 - 1], got {value!r}")
  return int(value)
