"""Nothing a user has is lost (issue 17, items 2-4; issue 21, items 1, 2, 4, 5, 6, 8) and unexpected errors keep
their traceback (issue 14): a run directory that holds a run needs --resume auto or --overwrite; a refused or
failing train changes no file; a damaged checkpoint is skipped by --resume auto (exactly as if training had
stopped at the previous one), and only damaged ones are a refusal naming each; one process per run directory;
--overwrite deletes only what a run wrote; init_from and the tokenizer identity checks; token ids beyond the
vocabulary; a bug's traceback goes to RUN/errors/rank-N.txt."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import pytest

from phiforge.errors import DataError

from engine_helpers import (CONFIG, losses, make_synthetic, metrics, run_train, start_train, synthetic_tokenizer,
                            wait_for)

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


# ---------------------------------------------------------------------------------------------- issue 21


def sets(*pairs: str) -> list[str]:
    return [f for s in pairs for f in ("--set", s)]


def test_resume_auto_with_only_damaged_checkpoints_refuses_naming_each(capsys, data, done, tmp_path):
    """Item 1: no intact checkpoint is a refusal, never a new run at step 0 over the old checkpoints."""
    run = copy_run(done, tmp_path / "run")
    for step in ("step-00000010", "step-00000020", "step-00000030"):
        (run / "checkpoints" / step / "files.json").write_text("{damaged")
    before = checksums(run)
    code, _, err = train(capsys, data, run, *sets(*LONG), "--resume", "auto")
    assert_one_line_error(code, err, "holds no intact checkpoint to resume from",
                          "step-00000010: files.json is unreadable", "step-00000020: files.json is unreadable",
                          "step-00000030: files.json is unreadable")
    assert checksums(run) == before


@pytest.mark.slow
def test_a_second_train_on_the_same_out_dir_is_refused_naming_the_pid(capsys, data, tmp_path):
    """Item 2: while one train runs (here hung inside step 2), another on its out_dir is refused at once."""
    run = tmp_path / "run"
    first = start_train(1, data, run, "max_steps=4", fault="hang@2")
    try:
        wait_for(run / "fault-hang", first)
        before = checksums(run)
        code, _, err = train(capsys, data, run, "--resume", "auto")
        assert_one_line_error(code, err, f"out_dir {run} is in use by another phiforge process (pid {first.pid})")
        code, _, err = train(capsys, data, run, "--overwrite")
        assert_one_line_error(code, err, f"(pid {first.pid})")
        assert checksums(run) == before
    finally:
        first.kill()
        first.communicate()


def test_run_dir_lock_is_held_until_the_run_ends(tmp_path):
    """Item 2, in-process: RunDir's lock (rank 0) refuses a second claim until the first one is closed."""
    import os

    import torch

    from phiforge.errors import ConfigError
    from phiforge.train.distributed import DistEnv
    from phiforge.train.rundir import RunDir

    env = DistEnv(0, 1, 0, 1, torch.device("cpu"), launched=False, owns_group=False)
    out = tmp_path / "new" / "run"
    with RunDir(out, env, "train", "none"):
        with pytest.raises(ConfigError, match=rf"in use by another phiforge process \(pid {os.getpid()}\)"):
            RunDir(out, env, "train", "auto")
    assert not (tmp_path / "new").exists()  # the folder made for the lock went with it: no run was written
    with RunDir(out, env, "train", "none") as again:
        assert again.checkpoint is None


def model_dir(path: Path) -> Path:
    """A model directory that is not a run: the README's `checkpoints/phi-2` layout."""
    (path / "checkpoints" / "phi-2").mkdir(parents=True)
    (path / "checkpoints" / "phi-2" / "config.json").write_text('{"format": "phiforge"}')
    (path / "checkpoints" / "phi-2" / "model.safetensors").write_bytes(b"weights")
    return path


def test_overwrite_deletes_only_what_a_run_wrote(capsys, data, tmp_path):
    """Item 4: a folder with its own checkpoints/ (and config.yaml) is not a run; --overwrite deletes nothing
    of it, and a config.yaml it holds is never written over."""
    mine = model_dir(tmp_path / "mine")
    (mine / "config.yaml").write_text("my: config\n")
    before = checksums(mine)
    code, _, err = train(capsys, data, mine, "--overwrite")
    assert_one_line_error(code, err, "is not a phiforge run but holds config.yaml", "refused even with --overwrite")
    assert checksums(mine) == before
    (mine / "config.yaml").unlink()
    before = checksums(mine)
    code, _, err = train(capsys, data, mine)
    assert_one_line_error(code, err, "not empty and holds no phiforge run")
    code, _, err = train(capsys, data, mine, *sets("max_steps=2", "save_interval=0"), "--overwrite")
    assert code == 0, err
    assert {k: v for k, v in checksums(mine).items() if k in before} == before  # phi-2 untouched
    assert sorted(p.name for p in (mine / "checkpoints").iterdir()) == ["phi-2", "step-00000002"]
    code, _, err = train(capsys, data, mine, *sets("max_steps=1", "save_interval=0"), "--overwrite")
    assert code == 0, err  # now a run: its own files go, phi-2 stays
    assert sorted(p.name for p in (mine / "checkpoints").iterdir()) == ["phi-2", "step-00000001"]
    assert {k: v for k, v in checksums(mine).items() if k in before} == before


def test_an_unmarked_earlier_run_is_still_recognised(capsys, data, done, tmp_path):
    """Item 4: runs from before the marker are recognised by their files."""
    from phiforge.fileio import MARKER
    from phiforge.train.rundir import is_run_dir

    run = copy_run(done, tmp_path / "run")
    assert (run / MARKER).is_file()
    (run / MARKER).unlink()
    assert is_run_dir(run) and not is_run_dir(model_dir(tmp_path / "model"))
    before = checksums(run)
    code, _, err = train(capsys, data, run)
    assert_one_line_error(code, err, "already holds a training run", "step-00000030")
    assert checksums(run) == before


def test_empty_working_or_home_out_dir_is_refused_even_with_overwrite(capsys, data, tmp_path, monkeypatch):
    """Item 4: out_dir empty (the working directory), the working directory, one containing it, or home."""
    work, home = tmp_path / "parent" / "work", tmp_path / "home"
    model_dir(work)
    home.mkdir()
    (home / "notes.txt").write_text("mine")
    monkeypatch.chdir(work)
    monkeypatch.setenv("HOME", str(home))
    before = checksums(tmp_path)
    for out_dir, needle in (("", "out_dir is empty"), (".", "is the working directory"),
                            (str(tmp_path / "parent"), "contains the working directory"),
                            (str(home), "is your home directory")):
        for extra in ([], ["--overwrite"]):
            code, _, err = train(capsys, data, out_dir, *extra)
            assert_one_line_error(code, err, needle)
    assert checksums(tmp_path) == before


def test_init_from_a_run_directory_takes_its_checkpoints_tokenizer(capsys, data, done, tmp_path):
    """Item 5: init_from RUN resolves as generate --checkpoint does, and the tokenizer comes from there."""
    from phiforge.tokenizer import tokenizer_identity

    run = tmp_path / "from-run"
    code, _, err = train(capsys, data, run, *sets(f"init_from={done}", "max_steps=1"))
    assert code == 0, err
    saved = run / "checkpoints" / "step-00000001"
    assert tokenizer_identity(saved) == tokenizer_identity(done / "checkpoints" / "step-00000030") \
        == tokenizer_identity(data)


def retokenized(data: Path, out: Path) -> Path:
    """A copy of `data` whose tokenizer.json (and index) say another tokenizer of the same size made it."""
    import json
    import shutil

    from phiforge.tokenizer import tokenizer_sha256

    shutil.copytree(data, out)
    tok = synthetic_tokenizer(512, prefix="u")
    (out / "tokenizer.json").write_text(tok.to_str())
    index = json.loads((out / "index.json").read_text())
    index["tokenizer"]["sha256"] = tokenizer_sha256(tok)
    (out / "index.json").write_text(json.dumps(index))
    return out


def test_tokenizer_identity_is_checked_where_a_model_meets_data(capsys, data, done, tmp_path):
    """Item 6: same vocabulary size, another tokenizer: refused at init_from and at resume, and a dataset without
    tokenizer.json is not taken for GPT-2's; --allow-tokenizer-mismatch goes on with a warning."""
    other = retokenized(data, tmp_path / "other-data")
    run = copy_run(done, tmp_path / "run")
    before = checksums(run), checksums(other)
    code, _, err = train(capsys, other, run, *sets(*LONG), "--resume", "auto")
    assert_one_line_error(code, err, f"dataset {other} was made by another tokenizer than", "step-00000030",
                          "--allow-tokenizer-mismatch")
    code, _, err = train(capsys, other, tmp_path / "new", *sets(f"init_from={done}"))
    assert_one_line_error(code, err, f"dataset {other} was made by another tokenizer than the init_from checkpoint")
    bare = tmp_path / "bare-data"
    import shutil

    shutil.copytree(data, bare)
    (bare / "tokenizer.json").unlink()
    code, _, err = train(capsys, bare, tmp_path / "new")
    assert_one_line_error(code, err, f"dataset {bare} has no tokenizer.json")
    assert (checksums(run), checksums(other)) == before and not (tmp_path / "new").exists()
    code, _, err = train(capsys, other, tmp_path / "new", *sets(f"init_from={done}", "max_steps=1"),
                         "--allow-tokenizer-mismatch")
    assert code == 0, err
    assert "phiforge: warning:" in err and "tokenizer mismatch allowed" in err


def test_token_ids_beyond_the_vocabulary_are_refused_naming_the_shard(capsys, data, tmp_path):
    """Item 8: ids the model has no embedding for are a one-line error naming the shard, not an IndexError."""
    import json
    import shutil

    import numpy as np

    from phiforge.data.shards import sha256_file

    bad = tmp_path / "bad-data"
    shutil.copytree(data, bad)
    index = json.loads((bad / "index.json").read_text())
    shard = index["splits"]["train"]["shards"][0]
    ids = np.fromfile(bad / shard["file"], dtype="<u2")
    ids[::20] = 700  # one in every window of seq_len + 1 = 33 tokens
    ids.tofile(bad / shard["file"])
    shard["sha256"] = sha256_file(bad / shard["file"])
    (bad / "index.json").write_text(json.dumps(index))
    before = checksums(bad)
    code, _, err = train(capsys, bad, tmp_path / "run")
    assert_one_line_error(code, err, f"shard {bad / shard['file']} holds token id 700",
                          "at or above the model's vocabulary of 512")
    assert checksums(bad) == before and not (tmp_path / "run").exists()
