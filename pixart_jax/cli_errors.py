"""The command-line error contract, shared by every entry point (`sample`, `prepare`, `convert`, `train`, `demo`,
`plan`).

A user's mistake (a bad flag value, a missing or unreadable file, a file that is not what it claims to be, a
non-finite training loss) ends the command with ONE line on stderr, `error: <message>`, and exit code 1. The full
traceback follows only when asked for (`--verbosity 1` / `-v 1` or more). Anything else is a bug in this program
and keeps Python's traceback.

    def run():
      app.run(cli_errors.guard(main))                  # absl entry points (verbosity: absl's --verbosity)

    def run():
      cli_errors.run(main, sys.argv[1:])               # argparse entry points (pass --verbosity through argv)

Library code raises ordinary exceptions (ValueError naming the input, the value and what is valid; OSError from
the file system); it never prints or exits. Only entry points import this module.
"""
from __future__ import annotations

import functools
import json
import pickle
import re
import sys
import traceback
from typing import Any, Callable, Sequence

from absl import app, flags

__all__ = ["USER_ERRORS", "guard", "run", "report", "verbosity_in"]

# What a user can cause: bad values (ValueError and its subclasses UnicodeDecodeError, json.JSONDecodeError),
# the file system (OSError: FileNotFoundError, IsADirectoryError, PermissionError, ...), pickles we refuse, a
# non-finite loss (train.loop.NonFiniteLossError is a FloatingPointError), absl's usage errors.
USER_ERRORS: tuple[type[BaseException], ...] = (
    ValueError, OSError, json.JSONDecodeError, pickle.UnpicklingError, FloatingPointError, app.UsageError)


def _message(e: BaseException) -> str:
  """One line: the exception's text with its lines joined (a KeyError-style repr is unwrapped)."""
  text = str(e)
  if isinstance(e, OSError) and e.filename is not None and e.strerror:
    text = f"{e.filename}: {e.strerror}"
  text = " ".join(line.strip() for line in text.splitlines() if line.strip())
  return text or type(e).__name__


def report(e: BaseException, *, verbose: bool, file=None) -> int:
  """Prints the one-line `error: ...` (after the traceback when `verbose`); returns the exit code 1."""
  file = file if file is not None else sys.stderr
  if verbose:
    traceback.print_exception(type(e), e, e.__traceback__, file=file)
  print(f"error: {_message(e)}", file=file, flush=True)
  return 1


def _absl_verbose() -> bool:
  fv = flags.FLAGS
  try:
    return fv.is_parsed() and "verbosity" in fv and int(fv["verbosity"].value or 0) >= 1
  except Exception:  # noqa: BLE001 - an unparsed or odd flag state: no traceback requested
    return False


def verbosity_in(argv: Sequence[str]) -> int:
  """The `--verbosity N` / `--verbosity=N` / `-v N` / `-vN` value in `argv` (0 when absent)."""
  level = 0
  args = list(argv)
  for i, a in enumerate(args):
    m = re.fullmatch(r"(?:--verbosity|-v)=?(-?\d+)", a)
    if m:
      level = int(m.group(1))
    elif a in ("--verbosity", "-v") and i + 1 < len(args) and re.fullmatch(r"-?\d+", args[i + 1]):
      level = int(args[i + 1])
  return level


def guard(main: Callable[..., Any], *, verbose: Callable[[], bool] | None = None) -> Callable[..., Any]:
  """`main` for absl's `app.run`: a user error becomes `error: <message>` on stderr and exit code 1 (SystemExit);
  `verbose()` (default: absl's --verbosity >= 1) adds the traceback. Other exceptions propagate (bugs)."""

  @functools.wraps(main)
  def wrapped(*args, **kwargs):
    try:
      return main(*args, **kwargs)
    except USER_ERRORS as e:
      raise SystemExit(report(e, verbose=(verbose or _absl_verbose)())) from None

  return wrapped


def run(main: Callable[..., Any], argv: Sequence[str] | None = None, **kwargs) -> Any:
  """Calls `main(argv, **kwargs)` (argparse entry points) under the contract of `guard`; the traceback shows when
  `argv` holds --verbosity >= 1."""
  argv = list(sys.argv[1:] if argv is None else argv)
  return guard(main, verbose=lambda: verbosity_in(argv) >= 1)(argv, **kwargs)
