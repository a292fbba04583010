"""`prepare --task-count N` parts and `phiforge data merge` (issue 25): parts merged give the dataset of one run
(same documents.jsonl, same token streams, same validation documents, duplicates removed across parts), tasks
run on datatrove's LocalPipelineExecutor, a killed task resumes without the others being redone, and bad parts
are refused in one line with nothing written to OUT."""

import json
import os
import shutil
import signal
import threading

import pytest
from datatrove.executor import LocalPipelineExecutor

from phiforge.cli import main
from phiforge.data.tasks import TASK_INDEX_VARIABLES, PrepareTasks, Task, resolve_task

from conftest import assert_one_line_error, run_cli
from prepare_helpers import checksums, dup_corpus, flaky_filter, same_dataset

OPTIONS = ["--val-fraction", "0.2", "--dedup", "exact,near", "--shard-tokens", "3000", "--checkpoint-seconds", "0"]


def _prepare(inp, out, *extra):
    return ["prepare", "redpajama", "--input", str(inp), "--out", str(out), *OPTIONS, "--workers", "0", *extra]


def _task(inp, parts, i, n=4, *extra):
    return _prepare(inp, parts, "--task-count", str(n), "--task-index", str(i), *extra)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """The input, one prepare run over it (the reference), its 4 parts and their merge."""
    d = tmp_path_factory.mktemp("tasks")
    inp = dup_corpus(d)
    assert main(_prepare(inp, d / "single")) == 0
    for i in range(4):
        assert main(_task(inp, d / "parts", i)) == 0
    assert main(["data", "merge", str(d / "parts"), "--out", str(d / "merged")]) == 0
    return {"input": inp, "single": d / "single", "parts": d / "parts", "merged": d / "merged", "dir": d}


def test_unit_ranges_are_contiguous_in_order_and_balanced_by_bytes():
    sizes = [5, 1, 1, 1, 10, 2, 0, 3, 7]  # 30 bytes; units start at 0, 5, 6, 7, 8, 18, 20, 20, 23
    assert [Task(i, 2).unit_range(sizes) for i in range(2)] == [(0, 5), (5, 9)]
    assert [Task(i, 3).unit_range(sizes) for i in range(3)] == [(0, 5), (5, 6), (6, 9)]
    for n in (1, 4, 9, 12):
        spans = [Task(i, n).unit_range(sizes) for i in range(n)]
        assert spans[0][0] == 0 and spans[-1][1] == len(sizes)
        assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))


@pytest.mark.parametrize("env, index", [({"SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_MIN": "1"}, 4),
                                        ({"SLURM_ARRAY_TASK_ID": "3"}, 3), ({"JOB_COMPLETION_INDEX": "2"}, 2),
                                        ({"SGE_TASK_ID": "3", "SGE_TASK_FIRST": "1"}, 2),
                                        ({"PHIFORGE_TASK_INDEX": "1", "SLURM_ARRAY_TASK_ID": "7"}, 1)])
def test_task_index_from_the_schedulers_variables(env, index):
    assert resolve_task(None, 8, env) == Task(index, 8)
    assert resolve_task(6, 8, env) == Task(6, 8)  # the flag wins
    assert resolve_task(None, None, env) is None  # without --task-count: an ordinary run


@pytest.mark.parametrize("extra, env, needle", [
    (["--task-count", "4", "--task-index", "4"], {}, "--task-index (task_index) must be in [0, 3] for --task-count 4"),
    (["--task-index", "1"], {}, "--task-index goes with --task-count N"),
    (["--task-count", "4"], {}, "--task-count 4: give --task-index I, or run it as an array task"),
    (["--task-count", "4"], {"SLURM_ARRAY_TASK_ID": "x1"}, "$SLURM_ARRAY_TASK_ID is 'x1', not a task index"),
    (["--task-count", "2"], {"SLURM_ARRAY_TASK_ID": "2"}, "--task-index (task_index) must be in [0, 1]")])
def test_bad_task_options_are_one_line_errors(capsys, monkeypatch, tmp_path, corpus, extra, env, needle):
    for var, _ in TASK_INDEX_VARIABLES:
        monkeypatch.delenv(var, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    code, _, err = run_cli(capsys, *_prepare(corpus["input"], tmp_path / "parts", *extra))
    assert_one_line_error(code, err, needle)
    assert not (tmp_path / "parts").exists()


def test_four_parts_merge_to_the_single_run(corpus):
    """In-process: documents.jsonl byte-identical, the same streams and sources, the same report counts; the
    duplicates (in the last part, of book documents in the first) are removed by the merge."""
    same_dataset(corpus["merged"], corpus["single"])
    rep = json.loads((corpus["merged"] / "prepare-report.json").read_text())
    ref = json.loads((corpus["single"] / "prepare-report.json").read_text())
    assert {k: rep[k] for k in ("read", "kept", "removed", "sources")} == \
        {k: ref[k] for k in ("read", "kept", "removed", "sources")}
    assert rep["removed"]["exact duplicate"]["count"] == 1 and rep["removed"]["near duplicate"]["count"] == 1
    index = json.loads((corpus["merged"] / "index.json").read_text())
    assert index["mixture"] == json.loads((corpus["single"] / "index.json").read_text())["mixture"]
    shards = index["merged"]["shards"]
    assert shards["rewritten"] >= 1 and shards["linked"] >= 10 and shards["copied"] == 0
    linked = [s["file"] for s in index["splits"]["train"]["shards"] if (corpus["merged"] / s["file"]).stat().st_nlink == 2]
    assert len(linked) >= 5  # the token data is shared with the parts, not copied


def test_a_complete_part_is_not_prepared_again(capsys, corpus):
    part = corpus["parts"] / "part-00001-of-00004"
    before = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in part.iterdir()}
    code, out, err = run_cli(capsys, *_task(corpus["input"], corpus["parts"], 1))
    assert code == 0, err
    assert f"{part} is complete (task 1 of 4); nothing to do" in out
    assert {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in part.iterdir()} == before


@pytest.fixture(scope="module")
def bad_parts(corpus):
    """A part 2 made with another tokenizer, and a folder whose task 2 was interrupted (still in progress)."""
    d, inp = corpus["dir"], corpus["input"]
    assert main(["tokenizer", "train", "--input", str(inp / "book"), "--vocab-size", "512", "--out",
                 str(d / "tok512")]) == 0
    assert main(_task(inp, d / "other", 2, 4, "--tokenizer-dir", str(d / "tok512"))) == 0
    shutil.copytree(corpus["parts"], d / "running", ignore=shutil.ignore_patterns("part-00002-*"))
    with flaky_filter() as calls:
        calls["fail_after"] = 12  # in task 2's second unit, after its first was journaled
        assert main(_task(inp, d / "running", 2, 4, "--quality-filter", "test-flaky")) == 1
    assert (d / "running" / ".part-00002-of-00004.partial" / "journal.json").is_file()
    return {"other": d / "other" / "part-00002-of-00004", "running": d / "running"}


@pytest.mark.parametrize("case", ["another tokenizer", "missing part", "no such part", "still in progress",
                                  "in progress, named", "same part twice", "a copy of a part", "not a part"])
def test_bad_parts_are_refused_and_out_is_untouched(capsys, tmp_path, corpus, bad_parts, case):
    parts = [corpus["parts"] / f"part-{i:05d}-of-00004" for i in range(4)]
    copy = tmp_path / "elsewhere" / parts[1].name
    shutil.copytree(parts[1], copy)
    args, needle = {
        "another tokenizer": ([parts[0], parts[1], bad_parts["other"], parts[3]], "was prepared with another tokenizer"),
        "missing part": ([parts[0], parts[1], parts[3]], "missing 1 of the 4 parts (part-00002-of-00004)"),
        "no such part": ([parts[0], tmp_path / "nope", parts[3]], f"part {tmp_path / 'nope'} not found"),
        "still in progress": ([bad_parts["running"]], "part-00002-of-00004 is still being prepared"),
        "in progress, named": ([bad_parts["running"] / "part-00002-of-00004"], "is still being prepared"),
        "same part twice": ([*parts, parts[1]], "part-00001-of-00004 is given twice"),
        "a copy of a part": ([*parts, copy], f"part-00001-of-00004 is given twice ({parts[1]} and {copy})"),
        "not a part": ([corpus["single"]], "is a dataset, not a part of `prepare --task-count N`"),
    }[case]
    out = tmp_path / "merged"
    shutil.copytree(corpus["merged"], out)  # an earlier dataset at OUT: it must come out unchanged
    before = checksums(tmp_path)
    code, stdout, err = run_cli(capsys, "data", "merge", *args, "--out", out)
    assert_one_line_error(code, err, needle)
    assert stdout == "" and checksums(tmp_path) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["elsewhere", "merged"]


# ---------------------------------------------------------------------------------------------- datatrove


def _step(inp, parts, **kw):
    return PrepareTasks(["redpajama", "--input", str(inp), "--out", str(parts), *OPTIONS, "--workers", "0"], **kw)


@pytest.mark.slow
def test_one_task_and_four_tasks_on_the_local_executor_merge_alike(tmp_path, corpus):
    """The must-show: the same input as 1 task and as 4 tasks (datatrove LocalPipelineExecutor, 2 at a time),
    merged: the same documents in the same order, the same token streams per split, the same validation
    documents (and all equal to one plain `prepare` run)."""
    merged = {}
    for n, workers in ((1, 1), (4, 2)):
        LocalPipelineExecutor([_step(corpus["input"], tmp_path / f"parts{n}")], tasks=n, workers=workers,
                              logging_dir=str(tmp_path / f"logs{n}")).run()
        assert sorted(p.name for p in (tmp_path / f"parts{n}").iterdir()) == \
            [f"part-{i:05d}-of-{n:05d}" for i in range(n)]
        assert main(["data", "merge", str(tmp_path / f"parts{n}"), "--out", str(tmp_path / f"merged{n}")]) == 0
        merged[n] = tmp_path / f"merged{n}"
    same_dataset(merged[1], merged[4])
    same_dataset(merged[4], corpus["single"])

    def val_ids(d):
        return [json.loads(line)["id"] for line in (d / "documents.jsonl").read_text().splitlines()
                if json.loads(line)["split"] == "val"]

    assert val_ids(merged[1]) == val_ids(merged[4]) and len(val_ids(merged[4])) >= 5


class _HangInTask(PrepareTasks):
    """Task `rank` hangs in its second input unit (after journaling the first) until the test kills it."""

    def __init__(self, args, rank: int):
        super().__init__(args)
        self.hang_rank = rank

    def __call__(self, data, rank=0, world_size=1):
        self.env = {"PHIFORGE_PREPARE_FAULT": "hang@1"} if rank == self.hang_rank else None
        return super().__call__(data, rank, world_size)


@pytest.mark.slow
def test_a_killed_task_resumes_and_the_others_are_not_redone(tmp_path, corpus):
    parts, logs = tmp_path / "parts", str(tmp_path / "logs")
    work = parts / ".part-00002-of-00004.partial"
    step = _HangInTask(_step(corpus["input"], parts).args, rank=2)
    errors = []

    def run():
        try:
            LocalPipelineExecutor([step], tasks=4, workers=1, logging_dir=logs).run()
        except RuntimeError as e:
            errors.append(e)

    runner = threading.Thread(target=run)
    runner.start()
    try:
        for _ in range(1200):
            if (work / "fault-hang").is_file() and (work / "fault-hang").read_text().strip():
                break
            runner.join(0.1)
        os.kill(int((work / "fault-hang").read_text()), signal.SIGKILL)
    finally:
        runner.join(120)
    assert errors and "prepare task 2 of 4 exited with -9" in str(errors[0])
    assert json.loads((work / "journal.json").read_text())["units_done"] == 1
    done = {p: {f.name: (f.stat().st_ino, f.stat().st_mtime_ns) for f in (parts / p).iterdir()}
            for p in ("part-00000-of-00004", "part-00001-of-00004")}
    assert not (parts / "part-00003-of-00004").exists()  # one at a time: the run stopped at the failed task

    LocalPipelineExecutor([_step(corpus["input"], parts)], tasks=4, workers=1, logging_dir=logs).run()
    assert {p: {f.name: (f.stat().st_ino, f.stat().st_mtime_ns) for f in (parts / p).iterdir()}
            for p in done} == done  # tasks 0 and 1 were not run again
    notes = json.loads((parts / "part-00002-of-00004" / "prepare-report.json").read_text())["notes"]
    assert "resumed after 1 of 2 input unit(s)" in notes
    assert main(["data", "merge", str(parts), "--out", str(tmp_path / "merged")]) == 0
    same_dataset(tmp_path / "merged", corpus["merged"])
