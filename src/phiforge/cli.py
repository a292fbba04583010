"""`phiforge` command line. Each command group lives in its own module and registers itself here.

Errors the user can fix (PhiforgeError) print as one line `phiforge: error: ...` and exit 1;
`--debug` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from phiforge import __version__
from phiforge.errors import PhiforgeError

import pkgutil

import phiforge.commands


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's own usage errors: one line, exit 2
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="phiforge", description="Train and run Phi-2-architecture language models.")
    parser.add_argument("--version", action="version", version=f"phiforge {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    # Every module in phiforge.commands defines `register(subparsers)` and adds its own subcommands.
    for mod in sorted(pkgutil.iter_modules(phiforge.commands.__path__), key=lambda m: m.name):
        importlib.import_module(f"phiforge.commands.{mod.name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("PHIFORGE_DEBUG") == "1"
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except PhiforgeError as e:
        if debug:
            raise
        print(f"phiforge: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("phiforge: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # an unexpected failure still gets one line unless --debug
        if debug:
            raise
        print(f"phiforge: error: {type(e).__name__}: {e} (rerun with --debug for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
