"""`phiforge prepare` keeps what a user has and runs no code from its work directory (issue 21, round 3): one
writer per --out, resume state without pickle and with every name confined to `.OUT.partial`, one line on
SIGTERM, and a read-only output refused before any work."""

import ctypes
import json
import os
import pickle
import signal
import time
from pathlib import Path

import numpy as np
import pytest

from phiforge.cli import main
from phiforge.data.shards import open_token_dataset

from conftest import assert_one_line_error, run_cli
from prepare_helpers import checksums, dup_corpus, flaky_filter, kill_group, start_prepare, wait_for_marker


@pytest.fixture(scope="module")
def rp_dups(tmp_path_factory):
    return dup_corpus(tmp_path_factory.mktemp("rpd"))


def dataset_files(d: Path) -> dict[str, str]:
    return {k: v for k, v in checksums(d).items() if k != "prepare-report.json"}


@pytest.fixture
def flaky():
    with flaky_filter() as calls:
        yield calls


def _args(inp, out, *extra):
    return ["prepare", "redpajama", "--input", inp, "--out", out, "--val-fraction", "0.2", "--dedup", "exact,near",
            "--workers", "0", "--checkpoint-seconds", "0", "--shard-tokens", "3000", "--quality-filter", "test-flaky",
            *extra]


def _interrupted(capsys, inp, out: Path, calls: dict) -> Path:
    """A run that fails in its last record (the near copy, in the last file): a journal of 7 units is left."""
    calls.update(n=0, fail_after=None)
    code, _, err = run_cli(capsys, *_args(inp, out.parent / "count"))
    assert code == 0, err
    calls.update(n=0, fail_after=calls["n"] - 1)
    code, _, err = run_cli(capsys, *_args(inp, out))
    assert_one_line_error(code, err, "input went away")
    calls.update(n=0, fail_after=None)
    work = out.parent / f".{out.name}.partial"
    assert json.loads((work / "journal.json").read_text())["units_done"] == 7
    return work


def test_resume_with_dedup_state_in_json_is_exact(capsys, tmp_path, rp_dups, flaky):
    """The dedup state (content hashes, MinHash signatures) is journaled as JSON + .npy and a resumed run makes the
    same decisions: byte-identical to the uninterrupted run, which removed one exact and one near duplicate."""
    ref = tmp_path / "ref"
    code, _, err = run_cli(capsys, *_args(rp_dups, ref))
    assert code == 0, err
    removed = json.loads((ref / "prepare-report.json").read_text())["removed"]
    assert removed["exact duplicate"]["count"] == 1 and removed["near duplicate"]["count"] == 1
    out = tmp_path / "out"
    work = _interrupted(capsys, rp_dups, out, flaky)
    names = sorted(p.name for p in work.iterdir())
    assert "state-000000007.json" in names and "sigs-000000007.npy" in names
    assert not [n for n in names if n.endswith(".pkl")]
    code, _, err = run_cli(capsys, *_args(rp_dups, out))
    assert code == 0, err
    assert dataset_files(out) == dataset_files(ref)
    rep = json.loads((out / "prepare-report.json").read_text())
    assert rep["removed"] == removed and "resumed after 7 of 8 input unit(s)" in rep["notes"]


class _Payload:
    """Unpickling this creates the marker directory: proof that code ran."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


@pytest.mark.parametrize("where", ["journal names a pickle", "state file is a pickle", "signatures hold objects"])
def test_crafted_pickle_in_the_work_directory_never_runs(capsys, tmp_path, rp_dups, flaky, where):
    out, marker = tmp_path / "out", tmp_path / "code-ran"
    work = _interrupted(capsys, rp_dups, out, flaky)
    payload = pickle.dumps(_Payload(marker))
    journal = json.loads((work / "journal.json").read_text())
    if where == "journal names a pickle":
        (work / "state-000000007.pkl").write_bytes(payload)
        journal["state"] = "state-000000007.pkl"
        (work / "journal.json").write_text(json.dumps(journal))
        needle = "'state-000000007.pkl', which is not a file of"
    elif where == "state file is a pickle":
        (work / "state-000000007.json").write_bytes(payload)
        needle = "cannot resume from"
    else:
        np.save(work / "sigs-000000007.npy", np.array([_Payload(marker)], dtype=object), allow_pickle=True)
        needle = "cannot resume from"
    before = checksums(work)
    code, _, err = run_cli(capsys, *_args(rp_dups, out))
    assert_one_line_error(code, err, needle, "--restart")
    assert not marker.exists()  # the payload never ran
    assert checksums(work) == before and not out.exists()


@pytest.mark.parametrize("field", ["state", "open shard", "finished shard", "signatures"])
def test_journal_names_outside_the_work_directory_are_refused(capsys, tmp_path, rp_dups, flaky, field):
    """A journal (or state file) naming "../victim.txt" is refused in one line; the victim file is untouched."""
    out, victim = tmp_path / "out", tmp_path / "victim.txt"
    victim.write_text("the user's file\n" * 1000)
    work = _interrupted(capsys, rp_dups, out, flaky)
    journal = json.loads((work / "journal.json").read_text())
    train = journal["writer"]["splits"]["train"]
    assert train["open"] and train["shards"]  # both kinds of shard entry exist to be crafted
    if field == "state":
        journal["state"] = "../victim.txt"
    elif field == "open shard":
        train["open"]["name"] = "../victim.txt"
    elif field == "finished shard":
        train["shards"][0]["file"] = "../victim.txt"
    else:
        state = json.loads((work / journal["state"]).read_text())
        state["signatures"] = "../victim.txt"
        (work / journal["state"]).write_text(json.dumps(state))
    (work / "journal.json").write_text(json.dumps(journal))
    before = victim.read_bytes()
    code, _, err = run_cli(capsys, *_args(rp_dups, out))
    assert_one_line_error(code, err, "'../victim.txt'", "--restart")
    assert victim.read_bytes() == before and not out.exists()


# ---------------------------------------------------------------------------------------------- processes


def _cli_args(inp, out, *extra):
    return ["prepare", "redpajama", "--input", str(inp), "--out", str(out), "--val-fraction", "0.2",
            "--shard-tokens", "3000", "--workers", "2", "--checkpoint-seconds", "0", *extra]


def _group_gone(pgid: int, timeout=10.0) -> bool:
    t0 = time.time()
    while time.time() - t0 < timeout:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    return False


@pytest.mark.slow
def test_second_prepare_of_the_same_out_is_refused(capsys, tmp_path, rp_dups):
    """While one prepare runs, a second one on the same --out (even with --restart) is refused at once naming the
    first's pid, and the first's work directory is byte-identical afterwards; the first then resumes to a valid
    dataset."""
    out, work = tmp_path / "out", tmp_path / ".out.partial"
    first = start_prepare(_cli_args(rp_dups, out), fault="hang@3")
    try:
        wait_for_marker(first, work / "fault-hang")
        before = checksums(work)
        for extra in ((), ("--restart",)):
            code, _, err = run_cli(capsys, *_cli_args(rp_dups, out, *extra))
            assert_one_line_error(code, err, f"{out} is in use by another phiforge process (pid {first.pid})")
            assert checksums(work) == before and not out.exists()
    finally:
        kill_group(first)
    code, _, err = run_cli(capsys, *_cli_args(rp_dups, out))
    assert code == 0, err
    open_token_dataset(out).verify()


@pytest.mark.slow
def test_sigterm_prints_one_line_and_the_rerun_resumes(capsys, tmp_path, rp_dups):
    ref = tmp_path / "ref"
    assert main(_cli_args(rp_dups, ref)) == 0
    capsys.readouterr()
    out, work = tmp_path / "out", tmp_path / ".out.partial"
    proc = start_prepare(_cli_args(rp_dups, out), fault="hang@2")
    wait_for_marker(proc, work / "fault-hang")
    os.kill(proc.pid, signal.SIGTERM)  # the main process only, as a scheduler's kill does: the workers are its job
    output = proc.communicate(timeout=60)[0].decode()
    assert proc.returncode == 128 + signal.SIGTERM, output
    assert output.strip().splitlines() == [f"phiforge: error: interrupted by SIGTERM; the work so far is kept in "
                                           f"{work}: rerun the same command to resume"], output
    assert _group_gone(proc.pid)  # the workers were stopped, not left to write into a closed pipe
    assert json.loads((work / "journal.json").read_text())["units_done"] == 2
    code, _, err = run_cli(capsys, *_cli_args(rp_dups, out))
    assert code == 0, err
    assert dataset_files(out) == dataset_files(ref)


def _without_dac_override():
    """In the child, as root: drop the capabilities that let root write into read-only folders (so the test sees
    what a user sees); a non-root user has none to drop."""
    if os.geteuid() == 0:
        libc = ctypes.CDLL(None, use_errno=True)
        for cap in (1, 2):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH: gone from the bounding set, so after exec
            if libc.prctl(24, cap, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
                raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


@pytest.mark.slow
@pytest.mark.parametrize("what", ["parent", "existing dataset"])
def test_read_only_output_is_refused_before_any_work(tmp_path, rp_dups, what):
    folder = tmp_path / "ro"
    folder.mkdir()
    out = folder / "data"
    if what == "existing dataset":
        out.mkdir()
        (out / "index.json").write_text(json.dumps({"format": "phiforge-tokens"}))
        os.chmod(out, 0o555)
        needle = f"output {out} is read-only"
    else:
        os.chmod(folder, 0o555)
        needle = f"cannot write output {out}: {folder} is not a writable folder"
    before = checksums(tmp_path)
    try:
        proc = start_prepare(_cli_args(rp_dups, out), preexec_fn=_without_dac_override)
        output = proc.communicate(timeout=120)[0].decode()
    finally:
        os.chmod(folder, 0o755)
        if out.exists():
            os.chmod(out, 0o755)
    assert_one_line_error(proc.returncode, output, needle)
    assert checksums(tmp_path) == before
    assert sorted(p.name for p in folder.iterdir()) == (["data"] if what == "existing dataset" else [])
