"""User-facing errors. The CLI prints these as one line and exits non-zero (traceback only with --debug).

Also what the CLI and the training engine both need to describe an error in one line: the traceback file of
an unexpected error (`write_traceback`), its one-line summary, and the full disk / out-of-memory advice for an
error no command turned into a message of its own (`environment_error`)."""

import os
import tempfile
import time
import traceback
from contextlib import contextmanager
from pathlib import Path


class PhiforgeError(Exception):
    """A problem with the user's input: a path, a file, a config key, a record."""

    exit_code = 1


class ConfigError(PhiforgeError):
    """Unknown preset or config key, or a value of the wrong type."""


class CheckpointError(PhiforgeError):
    """A checkpoint directory or weight file that is missing, corrupt or does not fit the model."""


class DataError(PhiforgeError):
    """A data directory, shard or record that cannot be used."""


# Where an unexpected error's traceback goes: RUN/errors/ once a command's run directory exists (set by the
# training engine), else a file in the temporary directory. The CLI names the file in its one-line message.
_error_dir = None


def set_error_dir(path) -> None:
    global _error_dir
    _error_dir = path


def error_dir():
    return _error_dir


class OutOfMemory(PhiforgeError):
    """An allocation the machine could not serve (CPU or GPU), with the settings that reduce memory."""


def write_traceback(e: BaseException, argv: list[str], rank: int) -> tuple[Path | None, str]:
    """The traceback (and the command line) in RUN/errors/rank-N.txt, or a new file in the temporary directory
    when there is no run directory or it cannot be written (a full disk). Returns (the file, a note on what failed
    on the way); the file is None when nothing could be written."""
    from phiforge import __version__

    stamp = f"{time.strftime('%Y%m%d-%H%M%S')}-pid{os.getpid()}-rank-{rank}.txt"
    places = [Path(tempfile.gettempdir()) / "phiforge-errors" / stamp]
    if error_dir() is not None:
        places.insert(0, Path(error_dir()) / f"rank-{rank}.txt")
    text = "".join(traceback.format_exception(e))
    data = f"phiforge {__version__}: {' '.join(['phiforge', *argv])}\n\n{text}".encode("utf-8", "backslashreplace")
    failed = []
    for path in places:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
            return path, "; ".join(failed)
        except OSError as err:
            failed.append(f"cannot write {path}: {err.strerror or err}")
            try:
                path.unlink(missing_ok=True)  # no empty or cut-off report left behind
            except OSError:
                pass
    return None, "; ".join(failed)


def unexpected_summary(e: BaseException, path: Path | None, note: str, rank: int | None = None) -> str:
    """One line for an unexpected error whose traceback went to `path`: 'RuntimeError: what (rank N; traceback in
    FILE; --debug prints it)'."""
    first = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
    where = f"traceback in {path}" if path else "no traceback file"
    shown_rank = f"rank {rank}; " if rank is not None else ""
    return printable(f"{type(e).__name__}: {first} ({shown_rank}{where}{f'; {note}' if note else ''}; "
                     "--debug prints it)")


def environment_error(e: BaseException) -> "PhiforgeError | None":
    """A full disk or an exhausted memory that no command turned into advice of its own: still one line."""
    full = disk_full(e)
    if full is not None:
        where = f" writing {printable(str(full.filename))}" if full.filename else ""
        return PhiforgeError(f"no space left on device{where} ({full.strerror}): free some space and run the "
                             "command again")
    return oom_error(e, "the model or the batch does not fit in this machine's memory; use smaller settings "
                        "(`phiforge plan` predicts what training needs) or a machine with more memory (--debug "
                        "shows where it ran out)")


def printable(text: str) -> str:
    """`text` safe to print or write as UTF-8: bytes that were not UTF-8 on the command line (or in a file name)
    reach Python as lone surrogates; they are shown as \\xNN escapes instead of crashing the write."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _causes(e: BaseException):
    """`e`, its causes and contexts, and the per-rank failures inside a DCP CheckpointException."""
    seen, todo = set(), [e]
    while todo:
        x = todo.pop()
        if x is None or id(x) in seen:
            continue
        seen.add(id(x))
        yield x
        todo += [x.__cause__, x.__context__]
        failures = getattr(x, "failures", None)
        if isinstance(failures, dict):
            todo += [f[0] if isinstance(f, tuple) else f for f in failures.values()]


def disk_full(e: BaseException) -> OSError | None:
    """The 'no space left' / 'quota exceeded' OSError behind `e`, if that is what went wrong."""
    import errno

    for x in _causes(e):
        if isinstance(x, OSError) and x.errno in (errno.ENOSPC, errno.EDQUOT):
            return x
    return None


def out_of_memory(e: BaseException) -> str | None:
    """'CPU' or 'CUDA' (or the device named) when `e` is an allocation failure: torch.OutOfMemoryError, the CPU
    allocator's RuntimeError, or a MemoryError (numpy, Python); None for anything else."""
    for x in _causes(e):
        text = str(x)
        if type(x).__name__ == "OutOfMemoryError":  # torch.OutOfMemoryError (GPU allocators)
            return text.split(" out of memory")[0].split()[-1] if " out of memory" in text else "GPU"
        if isinstance(x, MemoryError) or (isinstance(x, RuntimeError) and "can't allocate memory" in text):
            return "CPU"
    return None


def oom_detail(e: BaseException) -> str:
    """How much the failed allocation asked for, when the message says it ('tried to allocate 40.0 GiB')."""
    import re

    for x in _causes(e):
        m = re.search(r"allocate (\d+) bytes", str(x))
        if m:
            return f"tried to allocate {int(m[1]) / 2**30:,.1f} GiB"
        m = re.search(r"[Aa]llocate ([\d.]+ ?[KMGTP]i?B)", str(x))
        if m:
            return f"tried to allocate {m[1]}"
    return "an allocation failed"


def oom_error(e: BaseException, advice: str) -> "OutOfMemory | None":
    """The one-line OutOfMemory error for `e` with `advice` (what to lower), or None if `e` is not an OOM."""
    device = out_of_memory(e)
    if device is None:
        return None
    return OutOfMemory(f"{device} out of memory ({oom_detail(e)}): {advice}")


@contextmanager
def oom_advice(advice: str):
    """An out-of-memory error (CPU or GPU) inside the block becomes one OutOfMemory line with `advice`."""
    try:
        yield
    except (RuntimeError, MemoryError) as e:  # torch.OutOfMemoryError is a RuntimeError
        err = oom_error(e, advice)
        if err is None:
            raise
        raise err from None
