"""Where the traceback of an unexpected error goes (the CLI names the file in its one-line message): RUN/errors/
once a command's run directory exists (the run directory says so when training starts, set_error_dir), else a
new file in the temporary directory."""

from __future__ import annotations

import os
import tempfile
import time
import traceback
from pathlib import Path

from phiforge import __version__
from phiforge.errors import printable

_error_dir: Path | None = None  # this process's RUN/errors while a run directory holds its training


def set_error_dir(path: Path | None) -> None:
    """Tracebacks go to `path`/rank-N.txt from now on (None: back to the temporary directory)."""
    global _error_dir
    _error_dir = path


def write_traceback(e: BaseException, argv: list[str], rank: int) -> tuple[Path | None, str]:
    """The traceback (and the command line) in RUN/errors/rank-N.txt, or a new file in the temporary directory
    when there is no run directory or it cannot be written (a full disk). Returns (the file, a note on what failed
    on the way); the file is None when nothing could be written."""
    stamp = f"{time.strftime('%Y%m%d-%H%M%S')}-pid{os.getpid()}-rank-{rank}.txt"
    places = [Path(tempfile.gettempdir()) / "phiforge-errors" / stamp]
    if _error_dir is not None:
        places.insert(0, Path(_error_dir) / f"rank-{rank}.txt")
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
