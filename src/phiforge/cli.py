"""`phiforge` command line. Each command group lives in its own module and registers itself here.

Errors the user can fix (PhiforgeError) print as one line `phiforge: error: ...` and exit 1. Anything else is
a bug or a failure outside phiforge (a library crash, an NCCL timeout): its traceback goes to a file,
RUN/errors/rank-N.txt once a run directory exists (phiforge.tracebacks), and one line names that file. `--debug`,
anywhere on the command line, shows the full traceback instead. With several ranks only rank 0 prints a user
error, and under torchrun every rank writes torchelastic's error file, so torchrun's summary names the root cause.
When one rank of a training run fails, rank 0 prints that rank's message as its own (train/fail_together.py:
RankFailed).

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
import time
import traceback

import phiforge.commands
from phiforge import __version__
from phiforge.errors import ConfigError, PhiforgeError, environment_error, printable
from phiforge.tracebacks import unexpected_summary, write_traceback


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


def _non_utf8_argument(argv: list[str]) -> str | None:
    """A one-line message for the first command-line argument that is not UTF-8 text (its bytes reach Python as
    surrogates, which no output file or prompt can hold); None when all are."""
    for i, arg in enumerate(argv):
        try:
            arg.encode("utf-8")
        except UnicodeEncodeError as err:
            flag, _, value = arg.partition("=") if arg.startswith("--") and "=" in arg else ("", "", arg)
            if not flag and i and argv[i - 1].startswith("--"):
                flag = argv[i - 1]
            name = f"{flag} " if flag else "argument "
            byte = ord(arg[err.start]) - 0xDC00  # how Python passes an undecodable byte on (surrogateescape)
            return (f"{name}'{printable(value)}' is not valid UTF-8 text (byte 0x{byte:02x}); phiforge takes its "
                    "arguments as UTF-8: check the terminal's encoding (or rename a file whose name is not UTF-8)")
    return None


def _record_for_torchrun(e: BaseException, detail: str) -> None:
    """Under torchrun, torchelastic's error file for this rank: its summary then shows the root cause."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    data = {"message": {"message": printable(f"{type(e).__name__}: {e}"),
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
        bad_text = _non_utf8_argument(argv)
        if bad_text:
            raise ConfigError(bad_text)
        return int(args.func(args) or 0)
    except PhiforgeError as e:
        if debug:
            raise
        return _user_error(e)
    except KeyboardInterrupt:
        print("phiforge: interrupted", file=sys.stderr)
        return 130
    except (SystemExit, GeneratorExit):
        raise
    except BaseException as e:  # a bug or a library failure (torch's CheckpointException is a BaseException)
        if debug:
            raise
        known = environment_error(e)
        if known is not None:
            return _user_error(known)
        return _unexpected_error(e, argv)


def _say(line: str) -> None:
    print(printable(line), file=sys.stderr)


def _user_error(e: PhiforgeError) -> int:
    _record_for_torchrun(e, printable(str(e)))
    if _rank() == 0:  # every rank sees the same bad input: say it once
        _say(f"phiforge: error: {e}")
    elif os.environ.get("TORCHELASTIC_ERROR_FILE"):
        time.sleep(2.0)  # let rank 0 exit first: torchrun stops the others as soon as one rank fails
    return e.exit_code


def _unexpected_error(e: BaseException, argv: list[str]) -> int:
    path, failed = write_traceback(e, argv, _rank())
    _record_for_torchrun(e, printable("".join(traceback.format_exception(e))))
    _say(f"phiforge: error: {unexpected_summary(e, path, failed, _rank())}")
    return 1


if __name__ == "__main__":
    sys.exit(main())
