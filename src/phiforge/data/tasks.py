"""`phiforge prepare ... --task-index I --task-count N --out PARTS`: one of N tasks that a scheduler runs, each
preparing a deterministic slice of the input units into its own part directory; `phiforge data merge` (in
phiforge.data.merge) then makes one dataset of the parts.

    PARTS/part-00003-of-00008/      a complete part: a phiforge dataset (index.json, shards, documents.jsonl,
                                    tokenizer.json, prepare-report.json) plus dedup.bin; its index's "task"
                                    entry says which units it holds. Its existence is the completion marker
                                    (the directory is renamed into place after index.json is written last), and
                                    a task re-run over a complete part of the same inputs does nothing.
    PARTS/.part-00003-of-00008.partial/   the task while it runs or after it was killed: its own resume journal
                                    (re-running the same task resumes, as `prepare` does)
    PARTS/.part-00003-of-00008.lock  one process per part (a second run of the same task is refused)

Which units: contiguous runs in the source's fixed unit order, cut where the running input size crosses k/N of
the total, so the tasks get about equal bytes and part k's documents all come before part k+1's; the merge
therefore keeps the single-run order. A task takes no decision that depends on other parts: it writes every
document it keeps after cleaning (no dedup), with its content hash and MinHash signature in `dedup.bin`, and its
val split holds exactly the documents a single run would hold out (by id or by a hash of the id), so the merge
decides duplicates globally, in input order, as one `prepare` run would.

The task index comes from --task-index, else from the scheduler's array variables (TASK_INDEX_VARIABLES: Slurm's
SLURM_ARRAY_TASK_ID minus SLURM_ARRAY_TASK_MIN, ...). `PrepareTasks` runs the tasks on datatrove's executors
(LocalPipelineExecutor here, SlurmPipelineExecutor or RayPipelineExecutor on a cluster).
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from phiforge.data.dedup import NUM_PERM
from phiforge.data.shards import sha256_file
from phiforge.errors import DataError

DEDUP_FILE = "dedup.bin"
PART = re.compile(r"part-(\d{5})-of-(\d{5})")
_PART_ENTRY = re.compile(r"\.?part-\d{5}-of-\d{5}(\.partial|\.lock|\.tmp-.*|\.old-.*)?")

# (variable with the task index, variable with the array's first index, subtracted): the first one set is used
TASK_INDEX_VARIABLES = (("PHIFORGE_TASK_INDEX", None), ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_MIN"),
                        ("JOB_COMPLETION_INDEX", None), ("AWS_BATCH_JOB_ARRAY_INDEX", None),
                        ("SGE_TASK_ID", "SGE_TASK_FIRST"))


@dataclass(frozen=True)
class Task:
    index: int
    count: int

    def __post_init__(self):
        if not 1 <= self.count <= 99_999:
            raise DataError(f"--task-count (task_count) must be in [1, 99999], got {self.count}")
        if not 0 <= self.index < self.count:
            raise DataError(f"--task-index (task_index) must be in [0, {self.count - 1}] for --task-count "
                            f"{self.count}, got {self.index}")

    @property
    def name(self) -> str:
        return f"part-{self.index:05d}-of-{self.count:05d}"

    def unit_range(self, sizes: list[int]) -> tuple[int, int]:
        """Units [lo, hi) of this task: unit j (starting at byte s_j of the total T) goes to task s_j * N // T."""
        total = sum(sizes)
        owner, start = [], 0
        for j, size in enumerate(sizes):
            owner.append(start * self.count // total if total else j * self.count // len(sizes))
            start += size
        lo = next((j for j, t in enumerate(owner) if t >= self.index), len(sizes))
        hi = next((j for j, t in enumerate(owner) if t > self.index), len(sizes))
        return lo, hi


def resolve_task(index: int | None, count: int | None, environ=os.environ) -> Task | None:
    """The task of --task-index/--task-count (None without --task-count); the index from the scheduler's
    variables when not given."""
    if count is None:
        if index is not None:
            raise DataError("--task-index goes with --task-count N (the number of tasks the input is split into)")
        return None
    if index is None:
        for var, first in TASK_INDEX_VARIABLES:
            if environ.get(var, "").strip():
                index = _env_int(environ, var) - (_env_int(environ, first) if first and first in environ else 0)
                break
        else:
            raise DataError(f"--task-count {count}: give --task-index I, or run it as an array task (one of "
                            f"{', '.join(v for v, _ in TASK_INDEX_VARIABLES)} set)")
    return Task(int(index), int(count))


def _env_int(environ, var: str) -> int:
    try:
        return int(environ[var])
    except ValueError:
        raise DataError(f"${var} is {environ[var]!r}, not a task index") from None


def check_parts_dir(root: Path) -> None:
    """PARTS (the --out of a task) must be new or hold only parts and their work files."""
    root = Path(root)
    if not root.exists():
        return
    if not root.is_dir():
        raise DataError(f"--out {root} is a file; a task's --out is the folder that holds the parts")
    foreign = sorted(p.name for p in root.iterdir() if not _PART_ENTRY.fullmatch(p.name))
    if foreign:
        raise DataError(f"--out {root} holds other files than parts of `prepare --task-count` "
                        f"({', '.join(foreign[:5])}); choose another --out for the parts")


def fingerprint_sha(fingerprint: dict) -> str:
    import json

    return hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()


class DedupLog:
    """DEDUP_FILE of a part: per document written, in documents.jsonl order, its 16-byte content hash (exact
    dedup) and its MinHash signature as 128 little-endian uint32 (near dedup). Fixed-size records, so a resumed
    task cuts it back to the journaled length as it does documents.jsonl."""

    def __init__(self, directory: Path, exact: bool, near: bool, length: int | None = None):
        self.exact, self.near = exact, near
        self.record = 16 * exact + 4 * NUM_PERM * near
        self.path = Path(directory) / DEDUP_FILE
        if length is None:
            self._f = open(self.path, "wb")
            return
        if not self.path.is_file() or self.path.stat().st_size < int(length) or int(length) % self.record:
            raise DataError(f"cannot resume: {self.path} does not match the journal; re-run with --restart")
        self._f = open(self.path, "r+b")
        self._f.truncate(int(length))
        self._f.seek(int(length))

    def add(self, chash: bytes | None, sig: np.ndarray | None) -> None:
        if self.exact:
            self._f.write(chash)
        if self.near:
            self._f.write(np.asarray(sig, dtype="<u4").tobytes())

    def snapshot(self) -> int:
        self._f.flush()
        os.fsync(self._f.fileno())
        return self._f.tell()

    def close(self) -> None:
        if not self._f.closed:
            self._f.close()

    def finish(self) -> dict:
        self.snapshot()
        self.close()
        return {"file": DEDUP_FILE, "exact": self.exact, "near": self.near, "record_bytes": self.record,
                "sha256": sha256_file(self.path)}


def read_dedup_records(path: Path, info: dict, count: int):
    """(content hash or None, signature or None) per document of a part's DEDUP_FILE, in order."""
    record = int(info["record_bytes"])
    if path.stat().st_size != record * count:
        raise DataError(f"{path} holds {path.stat().st_size} bytes, not {count} records of {record}: the part is "
                        "damaged; run its task again")
    with open(path, "rb") as f:
        for _ in range(count):
            rec = f.read(record)
            chash = rec[:16] if info["exact"] else None
            sig = np.frombuffer(rec[16 * info["exact"]:], dtype="<u4").astype(np.uint32) if info["near"] else None
            yield chash, sig


# ---------------------------------------------------------------------------------------------- scheduling


class PrepareTasks:
    """The tasks of one `phiforge prepare CORPUS ARGS --out PARTS` as a datatrove pipeline step: task `rank` of
    `world_size` runs `python -m phiforge prepare CORPUS ARGS --task-index rank --task-count world_size` (a process
    of its own, so it has its own workers, lock and signal handling wherever the executor runs it); a failed task
    raises, so datatrove does not mark it complete and a relaunch runs it again (it resumes from its journal).

        from datatrove.executor import LocalPipelineExecutor     # or SlurmPipelineExecutor, RayPipelineExecutor
        step = PrepareTasks(["redpajama", "--input", IN, "--out", PARTS, "--workers", "16"])
        LocalPipelineExecutor([step], tasks=8, workers=2, logging_dir="logs/prepare").run()
    """

    def __init__(self, args: list[str], env: dict[str, str] | None = None):
        self.args = [str(a) for a in args]
        self.env = env  # extra environment variables for the task processes

    def command(self, rank: int, world_size: int) -> list[str]:
        return [sys.executable, "-m", "phiforge", "prepare", *self.args, "--task-index", str(rank),
                "--task-count", str(world_size)]

    def __call__(self, data, rank: int = 0, world_size: int = 1):
        env = {**os.environ, **(self.env or {})}
        code = subprocess.run(self.command(rank, world_size), env=env).returncode
        if code != 0:
            raise RuntimeError(f"prepare task {rank} of {world_size} exited with {code}")
        return data
