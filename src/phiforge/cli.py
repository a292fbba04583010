"""`phiforge` command line. Each command group lives in its own module and registers itself here.

Errors the user can fix (PhiforgeError) print as one line `phiforge: error: ...` and exit 1. Anything else is
a bug or a failure outside phiforge (a library crash, an NCCL timeout): its traceback goes to a file,
RUN/errors/rank-N.txt once a run directory exists, and one line names that file. `--debug`, anywhere on the
command line, shows the full traceback instead. Under torchrun only rank 0 prints a user error, and every rank
writes torchelastic's error file, so torchrun's summary names the root cause.

Command modules import torch and other heavy libraries only inside the functions that run a command, so
`phiforge --help` and argument errors stay fast.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import pkgutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

import phiforge.commands
from phiforge import __version__
from phiforge.errors import PhiforgeError, error_dir


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's own usage errors: one line, exit 2
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="phiforge", description="Train and run Phi-2-architecture language models.")
    parser.add_argument("--version", action="version", version=f"phiforge {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors (anywhere on the line)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    # Every module in phiforge.commands defines `register(subparsers)` and adds its own subcommands.
    for mod in sorted(pkgutil.iter_modules(phiforge.commands.__path__), key=lambda m: m.name):
        importlib.import_module(f"phiforge.commands.{mod.name}").register(sub)
    return parser


def _rank() -> int:
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def write_traceback(e: BaseException, argv: list[str]) -> Path:
    """The traceback (and the command line) in RUN/errors/rank-N.txt, or a new file in the temporary directory."""
    rank = _rank()
    folder = error_dir()
    if folder is not None:
        path = Path(folder) / f"rank-{rank}.txt"
    else:
        folder = Path(tempfile.gettempdir()) / "phiforge-errors"
        path = folder / f"{time.strftime('%Y%m%d-%H%M%S')}-pid{os.getpid()}-rank-{rank}.txt"
    Path(folder).mkdir(parents=True, exist_ok=True)
    text = "".join(traceback.format_exception(e))
    path.write_text(f"phiforge {__version__}: {' '.join(['phiforge', *argv])}\n\n{text}", encoding="utf-8")
    return path


def _record_for_torchrun(e: BaseException, detail: str) -> None:
    """Under torchrun, torchelastic's error file for this rank: its summary then shows the root cause."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    data = {"message": {"message": f"{type(e).__name__}: {e}",
                        "extraInfo": {"py_callstack": detail, "timestamp": str(int(time.time()))}}}
    try:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(data, f)
    except OSError:
        pass


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("PHIFORGE_DEBUG") == "1"
    argv = [a for a in argv if a != "--debug"]  # accepted before or after the subcommand
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except PhiforgeError as e:
        if debug:
            raise
        _record_for_torchrun(e, str(e))
        if _rank() == 0:  # every rank sees the same bad input: say it once
            print(f"phiforge: error: {e}", file=sys.stderr)
        elif os.environ.get("TORCHELASTIC_ERROR_FILE"):
            time.sleep(2.0)  # let rank 0 exit first: torchrun stops the others as soon as one rank fails
        return e.exit_code
    except KeyboardInterrupt:
        print("phiforge: interrupted", file=sys.stderr)
        return 130
    except (SystemExit, GeneratorExit):
        raise
    except BaseException as e:  # a bug or a library failure (torch's CheckpointException is a BaseException)
        if debug:
            raise
        path = write_traceback(e, argv)
        _record_for_torchrun(e, "".join(traceback.format_exception(e)))
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
        print(f"phiforge: error: {type(e).__name__}: {first} (rank {_rank()}; traceback in {path}; "
              "--debug prints it)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
