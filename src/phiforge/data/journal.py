"""The resume state of `phiforge prepare` in its work directory `.OUT.partial/`: JSON and NumPy arrays only (never
pickle, so a crafted file in that directory cannot run code), and every file name it records is checked to be a
plain name of that directory before anything is opened (so it cannot reach a file outside it).

    journal.json           {"fingerprint", "units_done", "units", "writer": DatasetWriter.snapshot(),
                            "state": "state-000000042.json", "held_out"}      (replaced atomically, last)
    state-000000042.json   {"report": Report.state(), "deduper": Deduper.state()[0], "val_seen", "candidate",
                            "signatures": "sigs-000000042.npy" or null}
    sigs-000000042.npy     uint32[N, 128]: the near-dedup signatures of the kept documents, read with
                           np.load(allow_pickle=False)

The number in the names is the count of input units done; files of older checkpoints are removed after the
journal names the new ones.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np

from phiforge.data.dedup import NUM_PERM, Deduper
from phiforge.data.report import Report
from phiforge.errors import DataError
from phiforge.fileio import fsync_dir, write_text_atomic

JOURNAL = "journal.json"
FORMAT = 3  # of the journal and its state files (2: a pickle, no longer read)
STATE = re.compile(r"state-\d{9}\.json")
SIGNATURES = re.compile(r"sigs-\d{9}\.npy")


def confined(work: Path, name, pattern: re.Pattern, what: str) -> Path:
    """work/name, where name must be a plain file name of the form `pattern`; DataError otherwise."""
    if not isinstance(name, str) or not pattern.fullmatch(name):
        raise DataError(f"{work / JOURNAL} names {what} {name!r}, which is not a file of {work}; delete that "
                        "directory or re-run with --restart")
    return work / name


def read_journal(work: Path) -> dict | None:
    """The journal of an interrupted run, or None when there is none (or it cannot be read: nothing to resume)."""
    try:
        journal = json.loads((work / JOURNAL).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return journal if isinstance(journal, dict) else None


def save_state(work: Path, done: int, report: Report, deduper: Deduper, val_seen: list[str],
               candidate: tuple[float, str] | None) -> str:
    """Write the decision state after `done` units (fsynced); returns the state file's name for the journal."""
    dedup, sigs = deduper.state()
    sig_name = None
    if deduper.near:
        sig_name = f"sigs-{done:09d}.npy"
        tmp = work / (sig_name + ".tmp")
        with open(tmp, "wb") as f:
            np.save(f, sigs, allow_pickle=False)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, work / sig_name)
    name = f"state-{done:09d}.json"
    state = {"format": FORMAT, "report": report.state(), "deduper": dedup, "val_seen": val_seen,
             "candidate": list(candidate) if candidate else None, "signatures": sig_name}
    write_text_atomic(work / name, json.dumps(state, ensure_ascii=False, separators=(",", ":")))
    return name


def load_state(work: Path, name, deduper: Deduper) -> tuple[Report, list[str], tuple[float, str] | None]:
    """(report, val_seen, candidate) from a state file, and its remembered documents into `deduper`."""
    path = confined(work, name, STATE, "the state file")
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
        sigs = np.empty((0, NUM_PERM), dtype=np.uint32)
        if state["signatures"] is not None:
            sig_path = confined(work, state["signatures"], SIGNATURES, "the signature file")
            sigs = np.load(sig_path, allow_pickle=False)
            if sigs.dtype != np.uint32 or sigs.ndim != 2 or sigs.shape[1] != NUM_PERM:
                raise ValueError(f"{sig_path.name} holds {sigs.dtype}{list(sigs.shape)}, not uint32[N, {NUM_PERM}]")
        deduper.restore(state["deduper"], sigs)
        cand = state["candidate"]
        candidate = (float(cand[0]), str(cand[1])) if cand else None
        return Report.from_state(state["report"]), [str(i) for i in state["val_seen"]], candidate
    except DataError:
        raise
    except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError) as e:
        raise DataError(f"cannot resume from {path}: {e}; re-run with --restart") from None


def remove_other_states(work: Path, keep: str | None) -> None:
    """Delete state and signature files other than those of state file `keep` (None: all of them)."""
    keep_names = {keep, f"sigs-{keep[len('state-'):-len('.json')]}.npy"} if keep else set()
    for old in list(work.glob("state-*.json")) + list(work.glob("sigs-*.npy")):
        if old.name not in keep_names:
            old.unlink()
    fsync_dir(work)
