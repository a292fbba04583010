"""User-facing errors. The CLI prints these as one line and exits non-zero (traceback only with --debug).

Also the full disk / out-of-memory advice for an error no command turned into a message of its own
(`environment_error`), which the CLI and the training engine both give. Where the traceback of any other error
goes is phiforge.tracebacks."""

from contextlib import contextmanager


class PhiforgeError(Exception):
    """A problem with the user's input: a path, a file, a config key, a record."""

    exit_code = 1


class ConfigError(PhiforgeError):
    """Unknown preset or config key, or a value of the wrong type."""


class CheckpointError(PhiforgeError):
    """A checkpoint directory or weight file that is missing, corrupt or does not fit the model."""


class DataError(PhiforgeError):
    """A data directory, shard or record that cannot be used."""


class OutOfMemory(PhiforgeError):
    """An allocation the machine could not serve (CPU or GPU), with the settings that reduce memory."""


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
