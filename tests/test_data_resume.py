"""`phiforge prepare` killed mid-run (SIGKILL) and re-run gives byte-identical shards, documents and index."""

import json
from pathlib import Path

import pytest

from phiforge.cli import main
from phiforge.data.shards import open_token_dataset

from conftest import assert_one_line_error, run_cli
from prepare_helpers import flaky_filter, kill_group, start_prepare, wait_for_marker

pytestmark = pytest.mark.slow  # multi-process or end-to-end: left out of the quick subset (-m "not slow")


def _args(inp, out, *extra):
    return ["prepare", "redpajama", "--input", str(inp), "--out", str(out), "--val-fraction", "0.1",
            "--shard-tokens", "3000", "--workers", "2", "--checkpoint-seconds", "0", *extra]


def _files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.name != "prepare-report.json"}


@pytest.mark.parametrize("hang_unit", [4, 0])
def test_prepare_killed_and_rerun_is_byte_identical(tmp_path, redpajama_fixture, hang_unit):
    ref = tmp_path / "ref"
    assert main(_args(redpajama_fixture, ref)) == 0
    out = tmp_path / "out"
    work = tmp_path / ".out.partial"
    proc = start_prepare(_args(redpajama_fixture, out), fault=f"hang@{hang_unit}")
    wait_for_marker(proc, work / "fault-hang")
    kill_group(proc)
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
    proc = start_prepare(_args(redpajama_fixture, out))
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
    proc = start_prepare(_args(redpajama_fixture, out), fault="hang@2")
    wait_for_marker(proc, work / "fault-hang")
    kill_group(proc)
    code, _, err = run_cli(capsys, *_args(redpajama_fixture, out, "--sources", "book,github"))
    assert_one_line_error(code, err, str(work), "--restart")
    code, stdout, err = run_cli(capsys, *_args(redpajama_fixture, out, "--sources", "book,github", "--restart"))
    assert code == 0, err
    assert not work.exists() and sorted(open_token_dataset(out).index["splits"]["train"]["sources"]) == \
        ["book", "github"]


def test_resume_of_the_run_that_holds_out_one_document(tmp_path):
    """The val split came out empty, so prepare runs again holding out one document; that second run, interrupted
    (a failing input) and re-run, resumes with the same held-out document: the same bytes as without the crash."""
    from phiforge.data.prepare import _fraction, prepare
    from phiforge.data.redpajama import RedPajamaSource
    from phiforge.errors import DataError

    (tmp_path / "rp" / "book").mkdir(parents=True)
    for k in range(10):  # ten units of one document: results drain (and checkpoints happen) as the run goes
        (tmp_path / "rp" / "book" / f"f{k}.jsonl").write_text(json.dumps({"text": f"Document {k}. " * 40}) + "\n")
        assert _fraction(f"book/f{k}.jsonl:1") >= 0.001
    with flaky_filter() as calls:
        def run(out):
            return prepare(RedPajamaSource(tmp_path / "rp", quality_filter="test-flaky"), out, None,
                           val_fraction=0.001, workers=0, checkpoint_seconds=0)

        ref = run(tmp_path / "ref")
        held = ref["prepared"]["val"]["held_out"]
        assert calls["n"] == 20 and len(held) == 1  # two passes over 10 documents
        calls.update(n=0, fail_after=19)  # the second pass fails in its last file, after a checkpoint
        with pytest.raises(DataError, match="input went away"):
            run(tmp_path / "out")
        journal = json.loads((tmp_path / ".out.partial" / "journal.json").read_text())
        done = journal["units_done"]
        assert journal["held_out"] == held[0] and 0 < done <= 9
        calls.update(n=0, fail_after=None)
        index = run(tmp_path / "out")
        assert calls["n"] == 10 - done  # resumed: the files after the checkpoint are read, once
    assert index["prepared"]["val"]["held_out"] == held
    assert _files(tmp_path / "out") == _files(tmp_path / "ref")
