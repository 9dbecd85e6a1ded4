"""Sweeps, ml_collections style: a config file's `get_sweep(arg)` lists the trials as override dicts.

A config file (`configs/*.py`) may define, next to `get_config(arg)`:

    from pixart_jax import sweeps

    def get_sweep(arg=None):
      return sweeps.product(sweeps.values("optimizer.lr", [1e-5, 2e-5, 4e-5]),
                            sweeps.values("optimizer.warmup", [500, 1000]))

`arg` is the same text after `:` that `get_config` gets (`--config FILE.py:ARG`). Each trial is a dict
{dotted config key: value} applied on top of the base config (and the command line's `--config.KEY=VALUE`);
`python -m pixart_jax.sweep` runs them, each in `<workdir>/<trial name>`.

Builders (each returns a list of override dicts; they nest):
  values(key, vals)       one trial per value: [{key: v} for v in vals]
  product(*sweeps)        the cartesian product, merged left to right (the last key varies fastest)
  zipped(*sweeps)         element-wise merge of equally long sweeps
Names: `trial_name(overrides)` spells the overrides as `leaf=value` words joined by `,` (`lr=2e-05,warmup=500`),
with the full dotted key where two keys share a leaf.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import inspect
import itertools
import math
import os
import re
from typing import Any, Iterable, Mapping, Sequence

__all__ = ["Trial", "values", "product", "zipped", "trial_name", "load_sweep", "trials_of", "select",
           "apply_overrides"]

_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")


@dataclasses.dataclass(frozen=True)
class Trial:
  """One run of a sweep: its index in the sweep, its directory name and its config overrides."""

  index: int
  name: str
  overrides: dict


def _key(key: str) -> str:
  key = key[len("config."):] if isinstance(key, str) and key.startswith("config.") else key
  if not isinstance(key, str) or not _KEY.match(key):
    raise ValueError(f"sweep key {key!r} is not a dotted config key such as 'optimizer.lr'")
  return key


def values(key: str, vals: Iterable[Any]) -> list[dict]:
  """One trial per value of the config key `key` (dotted, e.g. 'optimizer.lr'; a leading 'config.' is dropped)."""
  key = _key(key)
  vals = list(vals)
  if not vals:
    raise ValueError(f"sweep over {key!r} has no values")
  return [{key: v} for v in vals]


def _merge(dicts: Sequence[Mapping]) -> dict:
  out: dict = {}
  for d in dicts:
    for k, v in d.items():
      if k in out:
        raise ValueError(f"sweep key {k!r} is set twice in one trial ({out[k]!r} and {v!r})")
      out[k] = v
  return out


def product(*sweeps: Sequence[Mapping]) -> list[dict]:
  """Every combination of the given sweeps (lists of override dicts)."""
  return [_merge(combo) for combo in itertools.product(*[list(s) for s in sweeps])]


def zipped(*sweeps: Sequence[Mapping]) -> list[dict]:
  """The i-th trials of equally long sweeps, merged."""
  lengths = sorted({len(s) for s in sweeps})
  if len(lengths) > 1:
    raise ValueError(f"zipped sweeps must have equal lengths, got {[len(s) for s in sweeps]}")
  return [_merge(combo) for combo in zip(*sweeps)]


def _spell(v: Any) -> str:
  if isinstance(v, bool) or v is None:
    text = str(v)
  elif isinstance(v, float):
    text = "nan" if math.isnan(v) else f"{v:g}"
  elif isinstance(v, (list, tuple)):
    text = "x".join(_spell(x) for x in v)
  else:
    text = str(v)
  return re.sub(r"[^A-Za-z0-9._+-]+", "-", text) or "_"


def trial_name(overrides: Mapping[str, Any]) -> str:
  """`leaf=value,...` for the overrides (the full dotted key where leaves collide); 'base' for none."""
  if not overrides:
    return "base"
  leaves = [k.rsplit(".", 1)[-1] for k in overrides]
  words = [f"{k if leaves.count(leaf) > 1 else leaf}={_spell(v)}" for k, leaf, v in
           zip(overrides, leaves, overrides.values())]
  name = ",".join(words)
  if len(name) > 200:
    raise ValueError(f"trial name {name[:60]}... is {len(name)} characters; sweep fewer keys per trial")
  return name


def trials_of(overrides_list: Sequence[Mapping[str, Any]], source: str = "get_sweep") -> list[Trial]:
  """Checks a sweep (a list of override dicts) and names its trials; names must be unique."""
  if not isinstance(overrides_list, (list, tuple)) or not overrides_list:
    raise ValueError(f"{source} must return a non-empty list of override dicts, got {overrides_list!r:.80}")
  trials, seen = [], {}
  for i, o in enumerate(overrides_list):
    if not isinstance(o, Mapping):
      raise ValueError(f"{source}: trial {i} is a {type(o).__name__}, not a dict of config overrides")
    o = {_key(k): v for k, v in o.items()}
    name = trial_name(o)
    if name in seen:
      raise ValueError(f"{source}: trials {seen[name]} and {i} have the same name {name!r} (same overrides)")
    seen[name] = i
    trials.append(Trial(index=i, name=name, overrides=o))
  return trials


def load_sweep(config_file: str | os.PathLike, arg: str | None = None) -> list[Trial]:
  """The trials of `get_sweep(arg)` in the config file (`get_sweep()` when it takes no argument)."""
  path = os.fspath(config_file)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"--config {path}: no such config file")
  spec = importlib.util.spec_from_file_location("_pixart_sweep_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  fn = getattr(module, "get_sweep", None)
  if not callable(fn):
    raise ValueError(f"--config {path} defines no get_sweep(arg): a sweep config returns its trials as a list of "
                     "override dicts (see pixart_jax/sweeps.py)")
  takes_arg = bool(inspect.signature(fn).parameters)
  if arg is not None and not takes_arg:
    raise ValueError(f"--config {path}:{arg}: get_sweep() takes no argument")
  return trials_of(fn(arg) if takes_arg else fn(), source=f"{path} get_sweep({arg!r})")


def select(trials: Sequence[Trial], spec: str | None) -> list[Trial]:
  """The trials named by `spec`: comma-separated indices and ranges ('0,3', '2-5'); None or '' = all."""
  if not spec:
    return list(trials)
  wanted: list[int] = []
  for token in spec.split(","):
    m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", token)
    if not m:
      raise ValueError(f"--trials {spec!r}: {token!r} is not an index or a range such as 2-5")
    lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
    if hi < lo or hi >= len(trials):
      raise ValueError(f"--trials {spec!r}: {token.strip()!r} is outside the sweep's trials 0-{len(trials) - 1}")
    wanted += [i for i in range(lo, hi + 1) if i not in wanted]
  return [trials[i] for i in wanted]


def apply_overrides(config, overrides: Mapping[str, Any], *, trial: str = "") -> None:
  """Sets each dotted key of `overrides` in the (locked) ConfigDict `config`; an unknown key or a value of the
  wrong type raises ValueError naming the trial, the key and what is there."""
  where = f"trial {trial!r}: " if trial else ""
  for key, value in overrides.items():
    *parents, leaf = key.split(".")
    node = config
    for i, p in enumerate(parents):
      try:
        node = node[p]
      except (KeyError, AttributeError, TypeError):
        raise ValueError(f"{where}config has no field {'.'.join(parents[:i + 1])!r} (sweep key {key!r})") from None
    try:
      keys = list(node.keys())
    except AttributeError:
      raise ValueError(f"{where}config field {'.'.join(parents)!r} is not a group (sweep key {key!r})") from None
    if leaf not in keys:
      raise ValueError(f"{where}config has no field {key!r}; {'.'.join(parents) or 'the config'} has "
                       f"{sorted(keys)}")
    try:
      node[leaf] = list(value) if isinstance(value, tuple) and isinstance(node[leaf], list) else value
    except (TypeError, ValueError) as e:
      raise ValueError(f"{where}cannot set {key!r} to {value!r}: {e}") from None
