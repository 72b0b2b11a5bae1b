"""How the command-line tools run: one line for a user's mistake, a traceback only with ``--debug``, a compile cache.

    def main(argv=None) -> int:
      parser = argparse.ArgumentParser(prog="e2former-eval")
      add_debug_flag(parser)
      args = parser.parse_args(argv)
      return run_command("e2former-eval", lambda: _evaluate(args), debug=args.debug)

A user's mistake is an exception of ``USER_ERRORS``: a missing or unreadable file (``OSError``), a bad value,
data format, checkpoint, element or key (``ValueError`` and its subclasses ``DataFormatError`` and
``UntrainedElementError``; ``KeyError``), a refused option (``TypeError``), a missing optional package
(``ImportError``, whose message names the extra to install), a structure too large for the device
(``DeviceMemoryError``, whose message names the settings that trade time for memory) or ``UsageError``. These print
``<prog>: error: <message>`` on stderr and exit with ``EXIT_USER_ERROR`` (``EXIT_USAGE`` for ``UsageError``, as
argparse does for its own usage errors); anything else is a bug and keeps its traceback. Warnings print as
``<prog>: warning: <message>`` (with file and line under ``--debug``). Every command runs with JAX's persistent
compilation cache on (``e2former_jax.compile_cache``), so a second run of the same program skips compilation.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Callable

from e2former_jax.device_memory import DeviceMemoryError

EXIT_USER_ERROR = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class UsageError(Exception):
  """A command-line mistake found after parsing (e.g. two options that exclude each other)."""


USER_ERRORS: tuple[type[BaseException], ...] = (
  UsageError,
  OSError,
  ValueError,
  KeyError,
  TypeError,
  ImportError,
  DeviceMemoryError,
)


def add_debug_flag(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--debug", action="store_true", help="show the full traceback of errors and where warnings arise")


def one_line(err: BaseException) -> str:
  """The exception's message on one line (``KeyError`` without its quotes; the type when the message is empty)."""
  text = str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)
  text = " ".join(text.split())
  if isinstance(err, KeyError):
    text = f"missing key {text!r}"
  return text or type(err).__name__


def run_command(prog: str, body: Callable[[], int | None], debug: bool = False) -> int:
  """Runs ``body`` with JAX's persistent compilation cache on (``compile_cache``) and returns its exit status
  (0 for None); a user's mistake gives one line and ``EXIT_USER_ERROR``, Ctrl-C gives ``EXIT_INTERRUPTED``; with
  ``debug`` every error keeps its traceback."""
  from e2former_jax.compile_cache import enable_compile_cache

  enable_compile_cache()
  with warnings.catch_warnings():
    if not debug:

      def show(message, category, filename, lineno, file=None, line=None):
        print(f"{prog}: warning: {' '.join(str(message).split())}", file=sys.stderr)

      warnings.showwarning = show
    try:
      status = body()
    except KeyboardInterrupt:
      print(f"{prog}: interrupted", file=sys.stderr)
      return EXIT_INTERRUPTED
    except USER_ERRORS as err:
      if debug:
        raise
      if isinstance(err, UsageError):
        print(f"{prog}: error: {one_line(err)}", file=sys.stderr)
        return EXIT_USAGE
      print(f"{prog}: error: {one_line(err)} (--debug shows the traceback)", file=sys.stderr)
      return EXIT_USER_ERROR
  return 0 if status is None else int(status)


__all__ = [
  "EXIT_USAGE",
  "EXIT_USER_ERROR",
  "EXIT_INTERRUPTED",
  "USER_ERRORS",
  "UsageError",
  "add_debug_flag",
  "one_line",
  "run_command",
]
