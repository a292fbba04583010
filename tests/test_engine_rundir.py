"""Nothing a user has is lost (issue 17, items 2-4) and unexpected errors keep their traceback (issue 14):
a run directory that holds a run needs --resume auto or --overwrite; a refused or failing train changes no
file; a damaged checkpoint is skipped by --resume auto (exactly as if training had stopped at the previous
one) and is a one-line error when named; a bug's traceback goes to RUN/errors/rank-N.txt."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import pytest

from phiforge.errors import DataError

from engine_helpers import CONFIG, losses, make_synthetic, metrics, run_train

from conftest import assert_one_line_error, run_cli

LONG = ["max_steps=30", "save_interval=10", "eval_interval=10", "keep_checkpoints=5"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_synthetic(tmp_path_factory.mktemp("rundir") / "synthetic")


@pytest.fixture(scope="module")
def done(data, tmp_path_factory):
    """A finished 30-step run with checkpoints at 10, 20 and 30."""
    run = tmp_path_factory.mktemp("runs") / "done"
    run_train(1, data, run, *LONG)
    return run


def checksums(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def train(capsys, data, run, *args):
    return run_cli(capsys, "train", "--config", CONFIG, "--set", f"data.dir={data}", "--set", f"out_dir={run}",
                   *args)


def copy_run(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_train_into_a_run_with_checkpoints_is_refused_and_changes_nothing(capsys, data, done, tmp_path):
    run = copy_run(done, tmp_path / "run")
    before = checksums(run)
    code, _, err = train(capsys, data, run, *[f for s in LONG for f in ("--set", s)])
    assert_one_line_error(code, err, "already holds a training run", "step-00000030", "--resume auto", "--overwrite")
    assert checksums(run) == before


@pytest.mark.parametrize("sets", [["--set", "data.dir=/nonexistent"],
                                  ["--set", "model.n_layer=3", "--resume", "auto"],
                                  ["--set", "optim.schedule=zigzag", "--resume", "auto"]])
def test_a_refused_or_failing_train_leaves_every_file_byte_identical(capsys, data, done, tmp_path, sets):
    run = copy_run(done, tmp_path / "run")
    before = checksums(run)
    code, _, err = run_cli(capsys, "train", "--config", CONFIG, "--set", f"data.dir={data}", "--set",
                           f"out_dir={run}", *sets)
    assert code != 0 and "Traceback" not in err
    assert checksums(run) == before  # config.yaml included


def test_overwrite_starts_over(capsys, data, done, tmp_path):
    run = copy_run(done, tmp_path / "run")
    (run / "notes.txt").write_text("mine")  # not a run file: --overwrite leaves it alone
    code, _, err = train(capsys, data, run, "--set", "max_steps=5", "--set", "save_interval=0", "--overwrite")
    assert code == 0, err
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-00000005"]
    assert [e["event"] for e in metrics(run)].count("start") == 1
    assert (run / "notes.txt").read_text() == "mine"
    code, _, err = train(capsys, data, run, "--overwrite", "--resume", "auto")
    assert_one_line_error(code, err, "cannot be combined")


def test_a_foreign_directory_is_refused_and_a_new_run_that_fails_leaves_nothing(capsys, data, tmp_path):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("x")
    code, _, err = train(capsys, data, foreign)
    assert_one_line_error(code, err, "not empty and holds no phiforge run")
    assert [p.name for p in foreign.iterdir()] == ["thesis.tex"]
    new = tmp_path / "new"
    p = run_train(1, data, new, fault="oom@1", check=False)  # fails inside its first step
    assert p.returncode != 0 and "out of memory" in p.stderr and not new.exists()


@pytest.mark.parametrize("damage", ["delete", "truncate"])
def test_resume_auto_skips_a_damaged_checkpoint(capsys, data, done, tmp_path, damage):
    run = copy_run(done, tmp_path / "run")
    # as if the run had been killed after its step-20 checkpoint and that checkpoint's shard was then damaged
    import shutil

    shutil.rmtree(run / "checkpoints" / "step-00000030")
    (run / "latest").write_text("step-00000020\n")
    shard = run / "checkpoints" / "step-00000020" / "__0_0.distcp"
    if damage == "delete":
        shard.unlink()
    else:
        shard.write_bytes(shard.read_bytes()[:100])
    code, _, err = train(capsys, data, run, *[f for s in LONG for f in ("--set", s)], "--resume", "auto")
    assert code == 0, err
    assert "skipping damaged checkpoint" in err and "step-00000020" in err and "__0_0.distcp" in err
    start = [e for e in metrics(run) if e["event"] == "start"][-1]
    assert start["resumed_from"].endswith("step-00000010")
    a, b = losses(done), losses(run)
    assert [b[s] for s in range(11, 31)] == [a[s] for s in range(11, 31)]  # as an uninterrupted run


def test_a_damaged_checkpoint_named_by_path_is_one_line(capsys, data, done, tmp_path):
    run = copy_run(done, tmp_path / "run")
    step = run / "checkpoints" / "step-00000030"
    (step / "__0_0.distcp").write_bytes(b"x")
    code, _, err = train(capsys, data, run, "--resume", str(step))
    assert_one_line_error(code, err, "damaged", "__0_0.distcp")
    code, _, err = run_cli(capsys, "checkpoint", "consolidate", step, tmp_path / "out")
    assert_one_line_error(code, err, "damaged", "__0_0.distcp")
    assert not (tmp_path / "out").exists()


def test_a_bug_keeps_its_traceback_in_the_run_dir(data, tmp_path):
    run = tmp_path / "bug"
    p = run_train(1, data, run, "max_steps=4", fault="raise@2", check=False)
    assert p.returncode != 0
    lines = [line for line in p.stderr.splitlines() if line.startswith("phiforge:")]
    assert len(lines) == 1 and "RuntimeError" in lines[0] and "Traceback" not in p.stderr
    report = run / "errors" / "rank-0.txt"
    assert str(report) in lines[0]
    text = report.read_text()
    assert "Traceback (most recent call last)" in text and "injected failure at step 2" in text
    assert "faults.py" in text  # the frames are there


def test_torchrun_with_bad_input_prints_one_line(data, tmp_path):
    p = run_train(2, tmp_path / "missing-data", tmp_path / "run", check=False)
    assert p.returncode != 0
    ours = [line for line in p.stderr.splitlines() if line.startswith("phiforge: error:")]
    assert len(ours) == 1 and "missing-data" in ours[0], p.stderr[-3000:]
    # torchrun's own summary shows the message as the root cause, from the error file the rank wrote
    root = p.stderr[p.stderr.index("Root Cause"):]
    assert "rank      : 0" in root and "traceback : data directory not found" in root
    assert not (tmp_path / "run").exists()


def test_debug_after_the_subcommand_shows_the_traceback(capsys, tmp_path):
    with pytest.raises(DataError, match=f"^data directory not found: {re.escape(str(tmp_path / 'nowhere'))}$"):
        run_cli(capsys, "data", "inspect", tmp_path / "nowhere", "--debug")
    code, _, err = run_cli(capsys, "data", "inspect", tmp_path / "nowhere")
    assert_one_line_error(code, err)
