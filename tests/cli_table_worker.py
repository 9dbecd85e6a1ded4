"""Runs many command lines of ONE entry point in this process, each as its console entry would (flags parsed
afresh, `main` under `cli_errors`), and prints one JSON list of {rc, stderr} (the last stdout line).

    python tests/cli_table_worker.py pixart_jax.sample < rows.json      rows: [[arg, ...], ...]

Used by tests/test_bad_inputs.py: one process per entry point instead of one per row (jax imports once). An
exception that escapes the contract is reported as python would: its traceback, exit code 1.
"""
from __future__ import annotations

import contextlib
import importlib
import io
import json
import sys
import traceback


def _guard(main, **kw):
  try:
    from pixart_jax import cli_errors
  except ImportError:  # a tree without the contract: run main bare (as python would: traceback, exit 1)
    return main
  return cli_errors.guard(main, **kw)


def _absl_row(module, argv: list[str]) -> tuple[int, str]:
  from absl import app, flags

  fv = flags.FLAGS
  err = io.StringIO()
  with contextlib.redirect_stderr(err):
    try:
      fv.unparse_flags()
      for name in [n for n in fv if "." in n]:  # config override flags (defined by each parse of --config)
        delattr(fv, name)
      sys.argv = [module.__name__] + argv  # ml_collections' config flags read their overrides from sys.argv
      try:
        rest = fv(sys.argv)
      except flags.Error as e:  # what absl's app.run does with a flag it cannot parse
        print(f"FATAL Flags parsing error: {e}", file=sys.stderr)
        return 1, err.getvalue()
      main = module.main
      if module.__name__ == "pixart_jax.train.__main__":
        main = lambda a: sys.exit(module.main(a))  # noqa: E731 - as its run()
      out = _guard(main)(rest)
      return (out if isinstance(out, int) else 0), err.getvalue()
    except SystemExit as e:
      return (e.code if isinstance(e.code, int) else (0 if e.code is None else 1)), err.getvalue()
    except app.UsageError as e:  # absl's app.run: usage text and the message, exit 1
      print(f"FATAL Flags parsing error: {e}", file=sys.stderr)
      return 1, err.getvalue()
    except BaseException:  # noqa: BLE001 - escaped the contract: what python prints, exit code 1
      traceback.print_exc()
      return 1, err.getvalue()


def _plan_row(module, argv: list[str]) -> tuple[int, str]:
  try:
    from pixart_jax import cli_errors
    call = lambda: cli_errors.run(module.main, argv)  # noqa: E731 - as its run()
  except ImportError:  # a tree without the contract
    call = lambda: module.main(argv)  # noqa: E731
  err = io.StringIO()
  with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
    try:
      call()
      return 0, err.getvalue()
    except SystemExit as e:
      if isinstance(e.code, str):
        print(e.code, file=sys.stderr)
      return (e.code if isinstance(e.code, int) else 1), err.getvalue()
    except BaseException:  # noqa: BLE001 - escaped the contract: what python prints, exit code 1
      traceback.print_exc()
      return 1, err.getvalue()


def main() -> None:
  name = sys.argv[1]
  rows = json.load(sys.stdin)
  module = importlib.import_module(name)
  run_row = _plan_row if name in ("pixart_jax.plan", "pixart_jax.evaluate") else _absl_row  # argparse entries
  results = []
  for argv in rows:
    rc, stderr = run_row(module, argv)
    results.append({"rc": rc, "stderr": stderr})
  sys.stdout.flush()
  print("\n" + json.dumps(results))


if __name__ == "__main__":
  main()
