"""Enums whose values are the names used in configs and flags, parsed in one way."""
from __future__ import annotations

import enum


class ParsedEnum(enum.Enum):
  """An enum of lower-case string values with `parse(name)`; subclasses say what they are called in errors:

      class RematPolicy(ParsedEnum, what="remat policy"):
        NONE = "none"
  """

  def __init_subclass__(cls, *, what: str = "value", **kw):
    super().__init_subclass__(**kw)
    cls._what = what

  @classmethod
  def parse(cls, name):
    """A member, or its value in any case; anything else raises naming the value and the valid ones."""
    if isinstance(name, cls):
      return name
    try:
      return cls(str(name).lower())
    except ValueError:
      raise ValueError(f"unknown {cls._what} {name!r}; choose from {[m.value for m in cls]}") from None
