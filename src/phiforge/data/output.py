"""Where `phiforge prepare` and `phiforge data merge` write a dataset: the checks on the output before any work
(fileio's rule for every output, and that it can be written), one process per output (a lock beside it that
covers it and its work directory), and stopping cleanly on SIGTERM or SIGINT."""

from __future__ import annotations

import re
import signal
import threading
from contextlib import contextmanager
from pathlib import Path

from phiforge.errors import DataError, PhiforgeError
from phiforge.fileio import DirectoryLock

_DATASET_FILE = re.compile(r"^(index\.json|tokenizer\.json|documents\.jsonl|prepare-report\.json|dedup\.bin|"
                           r"[A-Za-z0-9_]+-\d{5}\.bin)(\.tmp)?$")


def check_out_dir(out_dir: Path) -> None:
    """Refuse an output path that holds anything but a phiforge dataset (fileio's rule for every output), or that
    cannot be written."""
    from phiforge.fileio import MARKER, claim_output_dir

    try:
        claim_output_dir(out_dir, "dataset", overwrite_hint="choose another --out (or empty it yourself)")
    except PhiforgeError as e:
        raise DataError(str(e)) from None
    if not out_dir.is_dir():
        return
    foreign = sorted(p.name for p in out_dir.iterdir() if not _DATASET_FILE.match(p.name) and p.name != MARKER)
    if foreign:
        raise DataError(f"{out_dir} is a phiforge dataset but also holds other files ({', '.join(foreign[:5])}); "
                        "move them or choose another --out")


@contextmanager
def dataset_lock(out_dir: Path):
    """This process alone writes out_dir and its work directory while inside (re-entrant): another process that
    tries is refused at once with one line naming this one's pid (fileio.DirectoryLock, `.NAME.lock` beside it)."""
    try:
        lock = DirectoryLock(out_dir, "dataset", DataError, reentrant=True).acquire()
    except PermissionError as e:
        raise DataError(f"cannot write beside {out_dir}: {e.strerror} ({e.filename})") from None
    try:
        yield
    finally:
        lock.release()


class PrepareInterrupted(PhiforgeError):
    """SIGTERM or SIGINT stopped `prepare`: the journaled work is kept for a re-run. Exits 128 + the signal."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum


class Signalled(BaseException):
    """Raised in the main thread by stop_on_signals' handler."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


@contextmanager
def stop_on_signals(run):
    """Inside: SIGTERM and SIGINT raise Signalled in the main thread (once; a second signal acts as usual), except
    while `run.finishing` is true: the run then completes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    sigs = (signal.SIGTERM, signal.SIGINT)
    saved = {s: signal.getsignal(s) for s in sigs}

    def handler(signum, frame):
        if run.finishing:
            return
        for s in sigs:
            signal.signal(s, saved[s])
        raise Signalled(signum)

    for s in sigs:
        signal.signal(s, handler)
    try:
        yield
    finally:
        for s in sigs:
            signal.signal(s, saved[s])
