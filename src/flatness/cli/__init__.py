"""The ``flatness`` command line: ``flatness SUBCOMMAND ...`` (also ``python -m flatness``).

Each subcommand lives with the code it drives: a module listed in ``COMMAND_MODULES`` defines
``add_cli(subparsers)``, which adds its parser and sets ``func(args) -> int`` on it.
User errors (:class:`flatness.FlatnessError`, ``ValueError``) and every ``OSError`` (missing or
unwritable files, a read-only or full disk: ``PATH: reason``) become one line on stderr and exit
code 2; anything unexpected one line and exit code 1 (``FLATNESS_DEBUG=1`` shows
the traceback). The pipeline names a wrong argument as its function does
(:class:`~flatness.experiments.world.errors.SettingError`); the line names the flag instead: a
command's ``flag_names`` default (``{"values": "--lambdas"}``), else ``--`` and the
parameter's name with dashes where the command has an option of that name.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import traceback
from collections.abc import Sequence

from .. import __version__
from ..utils import FlatnessError

__all__ = ["COMMAND_MODULES", "build_parser", "main"]

# One module per command group; each defines ``add_cli(subparsers)``.
COMMAND_MODULES: tuple[str, ...] = (
    "flatness.cli.demo",
    "flatness.cli.bench",
    "flatness.cli.run",
    "flatness.cli.inspect",
    "flatness.cli.connect",
    "flatness.cli.study",
    "flatness.cli.tasks",
    "flatness.cli.status",
)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2, like every other user error
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    """The ``flatness`` parser with every subcommand (the CLI reference is generated from it)."""
    parser = _Parser(prog="flatness", description="Flatness-aware training of neural networks.")
    parser.add_argument("--version", action="version", version=f"flatness {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    for name in COMMAND_MODULES:
        importlib.import_module(name).add_cli(sub)
    return parser


def _os_error_line(exc: OSError) -> str:
    """``PATH: reason`` (both paths of a rename), e.g. ``runs/x.json: Read-only file system``."""
    paths = [str(p) for p in (exc.filename, exc.filename2) if p is not None]
    reason = exc.strerror or str(exc) or type(exc).__name__
    return f"{' -> '.join(paths)}: {reason}" if paths else reason


def _in_flags(exc: Exception, args: argparse.Namespace) -> str:
    """``exc``'s message.

    A pipeline :class:`SettingError`'s with the command's flags for its parameters (module docs).
    """
    from ..experiments.world.errors import SettingError

    if not isinstance(exc, SettingError):
        return str(exc)
    names = {p: "--" + p.replace("_", "-") for p in exc.parameters if p in vars(args)}
    names.update(getattr(args, "flag_names", {}))
    return exc.spelled(names)


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``flatness ARGV`` (default: ``sys.argv[1:]``); return the exit code (module docs)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    debug = bool(os.environ.get("FLATNESS_DEBUG"))
    try:
        return int(args.func(args) or 0)
    except BrokenPipeError:  # e.g. `flatness ... | head`: the reader left, nothing to report
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except KeyboardInterrupt:
        print("flatness: interrupted", file=sys.stderr)
        return 130
    except (FlatnessError, ValueError, OSError) as exc:
        if debug:
            traceback.print_exc()
        message = _os_error_line(exc) if isinstance(exc, OSError) else " ".join(_in_flags(exc, args).split())
        print(f"flatness: error: {message}", file=sys.stderr)
        return 2
    except Exception as exc:  # never a traceback for a CLI user
        if debug:
            traceback.print_exc()
        first = (str(exc).strip().splitlines() or [""])[0]  # torch appends C++ frames
        print(
            f"flatness: internal error: {type(exc).__name__}: {first} "
            "(set FLATNESS_DEBUG=1 for the traceback)",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
