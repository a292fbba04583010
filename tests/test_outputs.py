"""Commands that write a directory never destroy what a user has (issue 17, item 1; phiforge.fileio's rule):

- OUT new, empty or an earlier output of the same kind (marker file, or recognisably an older one): written;
- anything else: refused with one line naming --overwrite, nothing touched; --overwrite replaces it;
- OUT that is, contains or sits inside an input: refused, even with --overwrite.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml

from conftest import assert_one_line_error, read_only, run_cli, snapshot
from engine_helpers import make_synthetic, metrics, run_train
from phiforge.errors import PhiforgeError
from phiforge.fileio import MARKER, claim_output_dir, open_output_dir, output_kind
from phiforge.model import Phi2, Phi2Config
from phiforge.model_files import load_checkpoint, save_checkpoint

RUN_SETS = ["max_steps=4", "save_interval=2", "eval_interval=2", "keep_checkpoints=0"]


def foreign(root: Path, name: str = "mine") -> Path:
    d = root / name
    (d / "sub").mkdir(parents=True)
    (d / "notes.txt").write_text("my notes, keep them")
    (d / "sub" / "data.bin").write_bytes(bytes(range(256)))
    return d


@pytest.fixture(scope="module")
def srcs(tmp_path_factory):
    """A tiny phiforge checkpoint, its HF and LitGPT exports, and a 4-step training run with DCP checkpoints."""
    root = tmp_path_factory.mktemp("outputs")
    torch.manual_seed(0)
    ckpt = save_checkpoint(Phi2(Phi2Config.from_preset("tiny")), root / "ckpt")
    assert run_cli_plain("convert", "to-hf", ckpt, root / "hf") == 0
    assert run_cli_plain("convert", "to-litgpt", ckpt, root / "lit") == 0
    data = make_synthetic(root / "synthetic", train_docs=8, val_docs=2, doc_len=200)
    run_train(1, data, root / "run", *RUN_SETS)
    return {"ckpt": ckpt, "hf": root / "hf", "lit": root / "lit", "run": root / "run", "data": data}


def run_cli_plain(*argv) -> int:
    from phiforge.cli import main

    return main([str(a) for a in argv])


def commands(s: dict, out: Path) -> dict[str, list]:
    """Every directory-writing command, writing to out."""
    return {
        "to-hf": ["convert", "to-hf", s["ckpt"], out],
        "from-hf": ["convert", "from-hf", s["hf"], out],
        "upcycle": ["convert", "upcycle", s["ckpt"], out, "--moe", "num_experts=2,top_k=1"],
        "to-litgpt": ["convert", "to-litgpt", s["ckpt"], out],
        "from-litgpt": ["convert", "from-litgpt", s["lit"], out],
        "consolidate": ["checkpoint", "consolidate", s["run"], out],
        "vision-synth": ["vision", "synth", "--out", out, "--n", "4"],
    }


@pytest.mark.parametrize("name", ["to-hf", "from-hf", "upcycle", "to-litgpt", "from-litgpt", "consolidate",
                                  "vision-synth"])
def test_foreign_dir_is_refused_untouched_then_overwrite_replaces(capsys, tmp_path, srcs, name):
    out = foreign(tmp_path)
    before = snapshot(out)
    argv = commands(srcs, out)[name]
    code, _, err = run_cli(capsys, *argv)
    assert_one_line_error(code, err, str(out), "is not empty", "--overwrite")
    assert snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]  # no temporary directory left behind

    code, _, err = run_cli(capsys, *argv, "--overwrite")
    assert code == 0, err
    assert not (out / "notes.txt").exists() and not (out / "sub").exists()
    kinds = {"to-hf": "hf", "to-litgpt": "litgpt", "vision-synth": "vision-synth"}
    assert output_kind(out) == kinds.get(name, "model")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]

    written = sorted(p for p in out.rglob("*") if p.is_file() and p.name != MARKER)
    written[0].unlink()  # an earlier output of the same kind, less a file the user removed: replaced
    code, _, err = run_cli(capsys, *argv)
    assert code == 0, err
    assert written[0].exists() and output_kind(out) is not None
    (out / "stale.txt").write_text("the user's")  # with a file phiforge did not write: refused (issue 21, item 3)
    before = snapshot(out)
    code, _, err = run_cli(capsys, *argv)
    assert_one_line_error(code, err, str(out), "also holds files phiforge did not write there: stale.txt",
                          "--overwrite")
    assert snapshot(out) == before


def test_output_of_another_kind_is_refused(capsys, tmp_path, srcs):
    out = tmp_path / "lit"
    assert run_cli(capsys, "convert", "to-litgpt", srcs["ckpt"], out)[0] == 0
    before = snapshot(out)
    code, _, err = run_cli(capsys, "convert", "to-hf", srcs["ckpt"], out)
    assert_one_line_error(code, err, "holds a LitGPT export", "--overwrite")
    assert snapshot(out) == before


def test_outputs_from_before_the_marker_are_still_replaced(capsys, tmp_path, srcs):
    for kind, argv in (("ckpt", ["convert", "from-hf", srcs["hf"]]), ("hf", ["convert", "to-hf", srcs["ckpt"]]),
                       ("lit", ["convert", "to-litgpt", srcs["ckpt"]])):
        old = tmp_path / f"old-{kind}"
        shutil.copytree(srcs[kind], old)
        (old / MARKER).unlink()
        (old / "README.md").unlink(missing_ok=True)  # exports made before the marker had no model card
        code, _, err = run_cli(capsys, *argv, old)
        assert code == 0, (kind, err)
        assert output_kind(old) is not None
    # but a directory with the same files plus a user's own is not recognised
    mixed = tmp_path / "mixed"
    shutil.copytree(srcs["ckpt"], mixed)
    (mixed / MARKER).unlink()
    (mixed / "train_state.json").write_text("{}")
    code, _, err = run_cli(capsys, "convert", "from-hf", srcs["hf"], mixed)
    assert_one_line_error(code, err, "is not empty and is not a phiforge checkpoint")


def test_output_inside_or_around_the_input_is_refused_and_the_run_still_resumes(capsys, tmp_path, srcs):
    run = tmp_path / "run"
    shutil.copytree(srcs["run"], run)
    step, final = sorted((run / "checkpoints").glob("step-*"))  # a sharded one, and the final one with model files
    before = snapshot(run)
    for argv, rel in (
        (["convert", "to-hf", run, run], "is the input"),
        (["convert", "to-hf", run, run, "--overwrite"], "refused even with --overwrite"),
        (["convert", "to-hf", run, run / "hf"], "is inside the input"),
        (["convert", "to-litgpt", final, run], "contains the input"),
        (["convert", "upcycle", final, final, "--moe", "num_experts=2"], "is the input"),
        (["checkpoint", "consolidate", step, run], "contains the input"),
        (["checkpoint", "consolidate", step, run, "--overwrite"], "contains the input"),
        (["checkpoint", "consolidate", step, step / "model"], "is inside the input"),
        (["convert", "from-hf", srcs["hf"], srcs["hf"].parent], "contains the input"),
    ):
        code, _, err = run_cli(capsys, *argv)
        assert_one_line_error(code, err, rel)
        assert snapshot(run) == before, argv
    p = run_train(1, srcs["data"], run, *RUN_SETS[1:], "max_steps=6", resume="auto")
    start = [e for e in metrics(run) if e["event"] == "start"][-1]
    assert start["start_step"] == 4, p.stdout
    assert metrics(run)[-1]["event"] == "end" and (run / "latest").read_text().strip() == "step-00000006"


def test_model_card_says_how_the_model_was_trained(capsys, tmp_path, srcs):
    """Item 13: the to-hf model card reads the checkpoint's `train` record and the run's config.yaml."""
    assert run_cli(capsys, "convert", "to-hf", srcs["run"], tmp_path / "hf")[0] == 0
    card = (tmp_path / "hf" / "README.md").read_text()
    assert "trained with `phiforge train` for 4 steps (512 tokens)" in card  # 4 steps x 4 x 32 tokens
    assert f"data: `{srcs['data']}`, sequences of 32 tokens" in card and "lr 0.003" in card


def test_claim_rule_in_the_library(tmp_path, monkeypatch):
    """Protected paths and files; library callers (save_checkpoint) follow the same rule."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(PhiforgeError, match="working directory"):
        claim_output_dir(tmp_path, "model", overwrite=True)
    with pytest.raises(PhiforgeError, match="working directory"):
        claim_output_dir(tmp_path.parent, "model", overwrite=True)
    (tmp_path / "f").write_text("x")
    with pytest.raises(PhiforgeError, match="is a file"):
        claim_output_dir(tmp_path / "f", "model", overwrite=True)
    mine = foreign(tmp_path)
    model = Phi2(Phi2Config.from_preset("tiny"))
    with pytest.raises(PhiforgeError, match="--overwrite"):
        save_checkpoint(model, mine)
    assert (mine / "notes.txt").exists()
    save_checkpoint(model, mine, overwrite=True)
    assert load_checkpoint(mine).cfg == model.cfg and not (mine / "notes.txt").exists()
    # an in-place output (a study's directories) is emptied only when --overwrite takes over a foreign one
    work = foreign(tmp_path, "work")
    with pytest.raises(PhiforgeError, match="is not a study's work directory"):
        open_output_dir(work, "study-work")
    open_output_dir(work, "study-work", overwrite=True)
    assert [p.name for p in work.iterdir()] == [MARKER]
    (work / "runs").mkdir()
    assert open_output_dir(work, "study-work") == work.resolve() and (work / "runs").is_dir()


def test_study_refuses_foreign_dirs_before_any_work(capsys, tmp_path):
    mine = foreign(tmp_path)
    cfg = {"name": "s", "data": {"dataset": str(tmp_path / "nodata")}, "routes": [{"name": "dense"}],
           "train": {"model": {"preset": "tiny"}}, "work_dir": str(mine), "report_dir": str(tmp_path / "report")}
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(cfg))
    before = snapshot(tmp_path)
    code, _, err = run_cli(capsys, "study", "--config", tmp_path / "s.yaml")
    assert_one_line_error(code, err, "is not a study's work directory", "--overwrite")
    code, _, err = run_cli(capsys, "study", "--config", tmp_path / "s.yaml", "--set", f"work_dir={tmp_path / 'w'}",
                           "--set", f"report_dir={mine}")
    assert_one_line_error(code, err, "is not a study report", "--overwrite")
    code, _, err = run_cli(capsys, "study", "--config", tmp_path / "s.yaml", "--set", f"work_dir={tmp_path / 'w'}",
                           "--set", f"report_dir={tmp_path / 'w' / 'runs'}")
    assert_one_line_error(code, err, "is the input")
    assert snapshot(tmp_path) == before


def test_report_only_without_runs_leaves_the_committed_report_alone(capsys, tmp_path, monkeypatch):
    """Item 5: on a fresh clone `--report-only` refuses instead of overwriting docs/results/cpu-gutenberg."""
    root = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(root)
    committed = root / "docs" / "results" / "cpu-gutenberg"
    before = snapshot(committed)
    code, _, err = run_cli(capsys, "study", "--config", "studies/cpu-gutenberg.yaml", "--report-only",
                           "--set", f"work_dir={tmp_path / 'work'}")
    assert_one_line_error(code, err, "no route of study cpu-gutenberg has run yet", "without --report-only")
    assert snapshot(committed) == before
    assert not (tmp_path / "work").exists()


def fake_study_run(tmp_path: Path) -> Path:
    """A study config whose one route has 'run': metrics events and a final checkpoint, as `phiforge train` leaves."""
    work = tmp_path / "work"
    run = work / "runs" / "dense" / "seed-0"
    torch.manual_seed(0)
    save_checkpoint(Phi2(Phi2Config.from_preset("tiny", vocab_size=50304)), run / "checkpoints" / "step-00000002")
    (run / "latest").write_text("step-00000002\n")
    events = [{"event": "train", "step": s, "tokens": 64 * s, "loss": 5.0, "elapsed_s": float(s),
               "tokens_per_s": 64.0} for s in (1, 2)]
    events += [{"event": "eval", "step": 2, "tokens": 128, "val_loss": 4.5, "elapsed_s": 2.0}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    (work / "study-state.json").write_text(json.dumps({"version": 2, "runs": {"dense/seed-0": {"seed": 0}}}))
    cfg = {"name": "fake", "routes": [{"name": "dense"}], "seeds": [0], "work_dir": str(work),
           "report_dir": str(tmp_path / "report"), "samples": {"max_new_tokens": 2},
           "train": {"model": {"preset": "tiny"}, "data": {"seq_len": 32}, "micro_batch_size": 2, "max_steps": 2}}
    path = tmp_path / "configs" / "my-study.yaml"
    path.parent.mkdir()
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_report_names_the_config_it_was_made_from_and_overwrite_takes_a_foreign_report_dir(capsys, tmp_path):
    config = fake_study_run(tmp_path)
    report = foreign(tmp_path, "report")
    code, _, err = run_cli(capsys, "study", "--config", config, "--report-only")
    assert_one_line_error(code, err, "is not a study report")
    assert (report / "notes.txt").exists()
    code, out, err = run_cli(capsys, "study", "--config", config, "--report-only", "--overwrite",
                             "--set", "samples.max_new_tokens=3")
    assert code == 0, err
    md = (report / "report.md").read_text()
    assert f"phiforge study --config {config} --set samples.max_new_tokens=3" in md  # the YAML that exists
    assert not (report / "notes.txt").exists() and output_kind(report) == "study-report"
    (report / "my-analysis.md").write_text("mine")  # a report is rewritten in place: files beside it stay
    assert run_cli(capsys, "study", "--config", config, "--report-only")[0] == 0
    assert (report / "my-analysis.md").read_text() == "mine"


# ---------------------------------------------------------------------------------------------
# issue 21: items 3, 8 (stale temporaries) and 14 (a read-only output)


def test_an_output_with_the_users_files_added_is_not_replaced(capsys, tmp_path, srcs):
    """Item 3: NOTES.md and evals/ in a consolidated model directory survived only with --overwrite."""
    out = tmp_path / "model"
    assert run_cli(capsys, "checkpoint", "consolidate", srcs["run"], out)[0] == 0
    (out / "NOTES.md").write_text("what I found")
    (out / "evals").mkdir()
    (out / "evals" / "hellaswag.json").write_text('{"acc": 0.31}')
    before = snapshot(out)
    code, _, err = run_cli(capsys, "convert", "from-hf", srcs["hf"], out)
    assert_one_line_error(code, err, f"{out} is a phiforge checkpoint but also holds files phiforge did not write "
                                     "there: NOTES.md, evals/;", "pass --overwrite")
    assert snapshot(out) == before

    shutil.rmtree(out / "evals")
    (out / "NOTES.md").unlink()
    config = json.loads((out / "config.json").read_text())
    config["note"] = "edited by hand"
    (out / "config.json").write_text(json.dumps(config))  # a file phiforge wrote, changed since
    before = snapshot(out)
    code, _, err = run_cli(capsys, "convert", "from-hf", srcs["hf"], out)
    assert_one_line_error(code, err, "did not write there: config.json (changed)")
    assert snapshot(out) == before

    code, _, err = run_cli(capsys, "convert", "from-hf", srcs["hf"], out, "--overwrite")
    assert code == 0, err
    assert "note" not in json.loads((out / "config.json").read_text())


def test_a_marker_without_a_file_list_falls_back_to_the_file_names(capsys, tmp_path, srcs):
    """Outputs of an earlier phiforge carry a marker without the file list: recognised by their names alone."""
    old = tmp_path / "old"
    shutil.copytree(srcs["ckpt"], old)
    marker = json.loads((old / MARKER).read_text())
    (old / MARKER).write_text(json.dumps({k: marker[k] for k in ("format", "kind", "phiforge_version")}))
    assert run_cli(capsys, "convert", "from-hf", srcs["hf"], old)[0] == 0
    assert "files" in json.loads((old / MARKER).read_text())
    (old / MARKER).write_text(json.dumps({k: marker[k] for k in ("format", "kind", "phiforge_version")}))
    (old / "NOTES.md").write_text("mine")
    before = snapshot(old)
    code, _, err = run_cli(capsys, "convert", "from-hf", srcs["hf"], old)
    assert_one_line_error(code, err, "is not empty and is not a phiforge checkpoint", "--overwrite")
    assert snapshot(old) == before


WRITER = textwrap.dedent("""
    import os, sys, time
    from phiforge.fileio import output_dir
    with output_dir(sys.argv[1], "hf") as tmp:
        (tmp / "model.safetensors").write_bytes(os.urandom(1 << 20))
        print("writing", flush=True)
        time.sleep(120)
""")


def start_writer(out: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(out)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    return proc


def test_a_killed_writers_temporary_is_removed_by_the_next_write_and_nothing_else(capsys, tmp_path, srcs):
    """Item 8: a killed `convert` left a full hidden .OUT.tmp-* copy beside OUT that nothing removed."""
    out = tmp_path / "hf"
    writer = start_writer(out)
    writer.send_signal(signal.SIGKILL)
    writer.wait()
    stale = [p for p in tmp_path.iterdir() if p.name.startswith(".hf.tmp-")]
    assert len(stale) == 1 and (stale[0] / "model.safetensors").stat().st_size == 1 << 20
    # beside it, things that are not phiforge's temporaries of this output: all kept
    (tmp_path / ".hf.tmp-notmine").mkdir()
    (tmp_path / ".hf.tmp-abcdefgh").write_text("a file, not a folder")
    (tmp_path / ".other.tmp-abcdefgh").mkdir()
    (tmp_path / "hf2").mkdir()
    keep = {p.name for p in tmp_path.iterdir()} - {stale[0].name, ".hf.lock"}  # the killed writer's lock file
    before = {name: snapshot(tmp_path / name) if (tmp_path / name).is_dir() else (tmp_path / name).read_text()
              for name in keep}

    code, _, err = run_cli(capsys, "convert", "to-hf", srcs["ckpt"], out)
    assert code == 0, err
    assert not stale[0].exists() and output_kind(out) == "hf"
    assert {p.name for p in tmp_path.iterdir()} == keep | {"hf"}
    assert before == {name: snapshot(tmp_path / name) if (tmp_path / name).is_dir() else
                      (tmp_path / name).read_text() for name in keep}

    old = tmp_path / ".hf.old-abc_1234"  # a replaced output a killed writer was still deleting after the swap
    (old / "x").mkdir(parents=True)
    assert run_cli(capsys, "convert", "to-hf", srcs["ckpt"], out)[0] == 0
    assert not old.exists() and {p.name for p in tmp_path.iterdir()} == keep | {"hf"}

    live = start_writer(out)  # a writer that is still running: refused, its temporary left alone
    try:
        theirs = [p for p in tmp_path.iterdir() if p.name.startswith(".hf.tmp-") and p.name != ".hf.tmp-notmine"
                  and p.is_dir()]
        code, _, err = run_cli(capsys, "convert", "to-hf", srcs["ckpt"], out)
        assert_one_line_error(code, err, f"output {out} is in use by another phiforge process (pid {live.pid})")
        assert len(theirs) == 1 and (theirs[0] / "model.safetensors").is_file()
    finally:
        live.kill()
        live.wait()


def test_read_only_output_for_consolidate_is_one_line_before_any_work(capsys, tmp_path, srcs, monkeypatch):
    """Item 14: consolidating into a read-only directory (or into one inside a read-only folder)."""
    import phiforge.train.checkpointing as checkpointing

    loaded = []
    monkeypatch.setattr(checkpointing, "export_model_files", lambda *a: loaded.append(a))
    out = tmp_path / "ro-out"
    with read_only(out):
        code, _, err = run_cli(capsys, "checkpoint", "consolidate", srcs["run"], out)
        assert_one_line_error(code, err, f"output {out} is read-only")
    with read_only(tmp_path / "ro-parent") as parent:
        code, _, err = run_cli(capsys, "checkpoint", "consolidate", srcs["run"], parent / "model")
        assert_one_line_error(code, err, f"cannot write output {parent / 'model'}: {parent} is not a writable folder")
        assert list(parent.iterdir()) == []
    assert loaded == [] and list(out.iterdir()) == []
