"""`phiforge prepare` killed mid-run (SIGKILL) and re-run gives byte-identical shards, documents and index."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from phiforge.cli import main
from phiforge.data.shards import open_token_dataset

from conftest import assert_one_line_error, run_cli

ROOT = Path(__file__).resolve().parents[1]


def _args(inp, out, *extra):
    return ["prepare", "redpajama", "--input", str(inp), "--out", str(out), "--val-fraction", "0.1",
            "--shard-tokens", "3000", "--workers", "2", "--checkpoint-seconds", "0", *extra]


def _popen(args, fault=None):
    env = {k: v for k, v in os.environ.items() if k != "PHIFORGE_PREPARE_FAULT"}
    env["PYTHONPATH"] = str(ROOT / "src")
    if fault:
        env["PHIFORGE_PREPARE_FAULT"] = fault
    return subprocess.Popen([sys.executable, "-m", "phiforge", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)


def _kill_when_hung(proc, marker: Path, timeout=120):
    t0 = time.time()
    while not marker.exists():
        if proc.poll() is not None:
            raise AssertionError(f"prepare exited before the fault: {proc.stdout.read().decode()[-2000:]}")
        if time.time() - t0 > timeout:
            os.killpg(proc.pid, signal.SIGKILL)
            raise AssertionError("prepare did not reach the fault in time")
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the whole group this test started: main process and its workers
    proc.wait(30)
    proc.stdout.close()


def _files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.name != "prepare-report.json"}


@pytest.mark.parametrize("hang_unit", [4, 0])
def test_prepare_killed_and_rerun_is_byte_identical(tmp_path, redpajama_fixture, hang_unit):
    ref = tmp_path / "ref"
    assert main(_args(redpajama_fixture, ref)) == 0
    out = tmp_path / "out"
    work = tmp_path / ".out.partial"
    proc = _popen(_args(redpajama_fixture, out), fault=f"hang@{hang_unit}")
    _kill_when_hung(proc, work / "fault-hang")
    assert not out.exists()  # nothing half-done where the dataset goes
    if hang_unit:
        journal = json.loads((work / "journal.json").read_text())
        assert journal["units_done"] == hang_unit
        tmp_shards = list(work.glob("*.bin.tmp"))
        # the killed run had written past its last checkpoint: the open shard and documents.jsonl are longer
        # than the journal says, and the re-run cuts them back
        snap = journal["writer"]
        assert (work / "documents.jsonl").stat().st_size > snap["documents_bytes"]
        assert tmp_shards
    proc = _popen(_args(redpajama_fixture, out))
    output = proc.communicate(timeout=240)[0].decode()
    assert proc.returncode == 0, output
    assert not work.exists()
    assert _files(out) == _files(ref)  # shards, documents.jsonl, index.json, tokenizer.json
    open_token_dataset(out).verify()
    rep = json.loads((out / "prepare-report.json").read_text())
    ref_rep = json.loads((ref / "prepare-report.json").read_text())
    assert rep["kept"] == ref_rep["kept"] and rep["removed"] == ref_rep["removed"]
    if hang_unit:
        assert f"resumed after {hang_unit} of 7 input unit(s)" in rep["notes"]
        assert "resumed after 4 of 7" in output


def test_resume_refuses_other_options_and_restart_starts_over(capsys, tmp_path, redpajama_fixture):
    out = tmp_path / "out"
    work = tmp_path / ".out.partial"
    proc = _popen(_args(redpajama_fixture, out), fault="hang@2")
    _kill_when_hung(proc, work / "fault-hang")
    code, _, err = run_cli(capsys, *_args(redpajama_fixture, out, "--sources", "book,github"))
    assert_one_line_error(code, err, str(work), "--restart")
    code, stdout, err = run_cli(capsys, *_args(redpajama_fixture, out, "--sources", "book,github", "--restart"))
    assert code == 0, err
    assert not work.exists() and sorted(open_token_dataset(out).index["splits"]["train"]["sources"]) == \
        ["book", "github"]
