"""Helpers for the tests of `phiforge prepare` that stop a run part-way: a prepare in a subprocess (its own process
group) with a fault injected, waiting for the fault, and a quality filter that fails after N records."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def start_prepare(args, fault: str | None = None, preexec_fn=None) -> subprocess.Popen:
    """`python -m phiforge ARGS` in a new process group, stdout and stderr together; PHIFORGE_PREPARE_FAULT=fault."""
    env = {k: v for k, v in os.environ.items() if k != "PHIFORGE_PREPARE_FAULT"}
    env["PYTHONPATH"] = str(ROOT / "src")
    if fault:
        env["PHIFORGE_PREPARE_FAULT"] = fault
    return subprocess.Popen([sys.executable, "-m", "phiforge", *map(str, args)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=preexec_fn)


def wait_for_marker(proc: subprocess.Popen, marker: Path, timeout: float = 120) -> None:
    """Wait until the fault's marker file exists (the run hangs there); kill the group on a timeout."""
    t0 = time.time()
    while not marker.exists():
        if proc.poll() is not None:
            raise AssertionError(f"prepare exited before the fault: {proc.stdout.read().decode()[-2000:]}")
        if time.time() - t0 > timeout:
            os.killpg(proc.pid, signal.SIGKILL)
            raise AssertionError("prepare did not reach the fault in time")
        time.sleep(0.05)


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the process group this test started (main process and workers) and reap it."""
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(30)
    proc.stdout.close()


@contextmanager
def flaky_filter():
    """`--quality-filter test-flaky` (in this process): keeps every record; once calls["fail_after"] is set, the
    records after that many raise DataError("input went away"). Yields the counters {"n", "fail_after"}."""
    import phiforge.data.redpajama as rp
    from phiforge.errors import DataError

    calls = {"n": 0, "fail_after": None}

    def flaky(record, signals):
        calls["n"] += 1
        if calls["fail_after"] is not None and calls["n"] > calls["fail_after"]:
            raise DataError("input went away")
        return None

    rp.QUALITY_FILTERS["test-flaky"] = flaky
    try:
        yield calls
    finally:
        del rp.QUALITY_FILTERS["test-flaky"]


def dup_corpus(folder: Path) -> Path:
    """A small RedPajama download (8 files) whose last file repeats a book exactly and another nearly."""
    from data_fixtures import add_duplicates, make_redpajama

    d = make_redpajama(Path(folder) / "rp", max_bytes=20_000)
    add_duplicates(d)
    return d


def same_dataset(a: Path, b: Path) -> None:
    """Assert that two datasets hold the same documents.jsonl (bytes) and the same token stream per split."""
    import numpy as np

    from phiforge.data.shards import open_token_dataset

    assert (Path(a) / "documents.jsonl").read_bytes() == (Path(b) / "documents.jsonl").read_bytes()
    da, db = open_token_dataset(a), open_token_dataset(b)
    assert da.splits() == db.splits()
    for split in da.splits():
        sa, sb = da.stream(split), db.stream(split)
        assert len(sa) == len(sb) > 0
        assert np.array_equal(sa.read(0, len(sa)), sb.read(0, len(sb)))
        assert da.index["splits"][split].get("sources") == db.index["splits"][split].get("sources")


def checksums(d: Path) -> dict[str, str]:
    """sha256 of every file under d, by relative path."""
    import hashlib

    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(d).rglob("*")) if p.is_file()}
