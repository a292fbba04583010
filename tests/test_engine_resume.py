"""Training engine (issue 4): exact resume after kill -9, atomic checkpoints under a kill mid-save, SIGTERM,
NaN skipping and halting, the OOM message. CPU, gloo, configs/cpu-fsdp-test.yaml."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from engine_helpers import kill9, kill9_inside, losses, make_synthetic, metrics, run_train, start_train, wait_for

from conftest import assert_one_line_error, run_cli

pytestmark = pytest.mark.slow  # multi-process or end-to-end: left out of the quick subset (-m "not slow")

LONG = ["max_steps=40", "save_interval=10", "eval_interval=20"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_synthetic(tmp_path_factory.mktemp("engine") / "synthetic")


@pytest.fixture(scope="module")
def straight(data, tmp_path_factory):
    """40 steps, never interrupted."""
    run = tmp_path_factory.mktemp("runs") / "straight"
    run_train(1, data, run, *LONG)
    return run


def test_exact_resume_after_kill9_is_bit_identical(data, straight, tmp_path):
    run = tmp_path / "killed"
    kill9_inside(25, data, run, *LONG)
    assert (run / "latest").read_text().strip() == "step-00000020"
    assert max(losses(run)) == 24  # step 25 never finished
    run_train(1, data, run, *LONG, resume="auto")
    start = [e for e in metrics(run) if e["event"] == "start"][-1]
    assert start["resumed_from"].endswith("step-00000020") and start["start_step"] == 20
    a, b = losses(straight), losses(run)
    assert [b[s] for s in range(21, 41)] == [a[s] for s in range(21, 41)]  # bit-identical, not approximately
    ends = [e for e in metrics(run) if e["event"] == "end"]
    assert ends[-1]["val_loss_end"] == metrics(straight)[-1]["val_loss_end"]
    assert ends[-1]["tokens"] == 40 * 4 * 32


def test_exact_resume_with_moe_and_bias_balancing(data, tmp_path):
    """MoE resumes bit-identically too: expert weights, router, optimizer state and the balancing bias buffer."""
    moe = [*LONG, "model.moe={num_experts: 4, top_k: 2, bias_balancing: true, bias_update_rate: 0.01}"]
    straight = tmp_path / "moe-straight"
    run_train(1, data, straight, *moe)
    run = tmp_path / "moe-killed"
    kill9_inside(25, data, run, *moe)
    run_train(1, data, run, *moe, resume="auto")
    assert [e for e in metrics(run) if e["event"] == "start"][-1]["start_step"] == 20
    a, b = losses(straight), losses(run)
    assert [b[s] for s in range(21, 41)] == [a[s] for s in range(21, 41)]
    wa = load_file(straight / "checkpoints" / "step-00000040" / "model.safetensors")
    wb = load_file(run / "checkpoints" / "step-00000040" / "model.safetensors")
    biases = [k for k in wa if k.endswith("expert_bias")]
    assert biases and any(wa[k].abs().sum() > 0 for k in biases)  # balancing moved the bias, so it is tested
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


# where a kill lands in the save of step 20: what step-00000020.tmp holds then
KILLS_IN_SAVE = {
    "staging (async)": ("hang_stage@20", [], "fault-hang-stage", ["train_state.json"], [".metadata", "__0_0.distcp"]),
    "writing (async)": ("hang_write@20", [], "fault-hang-write", ["__0_0.distcp"], [".metadata"]),
    "completing (async)": ("hang_save@20", [], "fault-hang-save", [".metadata"], ["files.json"]),
    "writing (sync)": ("hang_write@20", ["async_checkpoint=false"], "fault-hang-write", ["__0_0.distcp"],
                       [".metadata"]),
}


@pytest.mark.parametrize("moment", list(KILLS_IN_SAVE))
def test_kill_during_save_leaves_previous_checkpoint_usable(data, straight, tmp_path, moment):
    """kill -9 while step 20 is being saved (staged, written, completed; in the background by default) leaves
    step 10, the checkpoint before, named by `latest` and complete, and the resumed run is bit-identical."""
    fault, sets, marker, there, missing = KILLS_IN_SAVE[moment]
    run = tmp_path / "killed-in-save"
    proc = start_train(1, data, run, *LONG, *sets, fault=fault)
    wait_for(run / marker, proc)
    kill9(proc)
    ckpts = run / "checkpoints"
    assert (run / "latest").read_text().strip() == "step-00000010"
    half = ckpts / "step-00000020.tmp"
    assert [n for n in there if not (half / n).exists()] == [] and [n for n in missing if (half / n).exists()] == []
    assert not (ckpts / "step-00000020").exists()
    # the previous checkpoint is complete and loads
    from phiforge.train.checkpointing import consolidate, latest_checkpoint, verify_checkpoint

    assert latest_checkpoint(run) == ckpts / "step-00000010" and verify_checkpoint(ckpts / "step-00000010") is None
    consolidate(run, tmp_path / "m10")  # the run directory resolves to step-10, never the .tmp
    assert load_file(tmp_path / "m10" / "model.safetensors")
    run_train(1, data, run, *LONG, *sets, resume="auto")
    start = [e for e in metrics(run) if e["event"] == "start"][-1]
    assert start["resumed_from"].endswith("step-00000010")
    assert not half.exists()  # the half save was cleaned up
    a, b = losses(straight), losses(run)
    assert [b[s] for s in range(11, 41)] == [a[s] for s in range(11, 41)]
    assert (run / "latest").read_text().strip() == "step-00000040"
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-00000020", "step-00000030", "step-00000040"]


def _children(pid: int) -> list[int]:
    kids = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        text = (task / "children").read_text().split()
        kids += [int(k) for k in text]
    return kids


def _rank_of(pid: int) -> int | None:
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    for item in env:
        if item.startswith(b"RANK="):
            return int(item[5:])
    return None


def test_sigterm_on_one_rank_checkpoints_everywhere_and_exits_0(data, tmp_path):
    """SIGTERM reaches rank 1 only: both ranks agree at the end of the step, save step N, and exit 0."""
    run = tmp_path / "sigterm"
    proc = start_train(2, data, run, "max_steps=200", "save_interval=0", "eval_interval=1000", fault="sleep=0.2")
    def reached_step_3():
        try:
            return any(e["event"] == "train" and e["step"] >= 3 for e in metrics(run))
        except (OSError, ValueError):  # not there yet, or a line half written
            return False

    wait_for(reached_step_3, proc)
    workers = {_rank_of(p): p for p in _children(proc.pid)}
    assert set(workers) == {0, 1}, workers
    os.kill(workers[1], signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    assert "stopped by" in out and "resume auto" in out
    stopped = [e for e in metrics(run) if e["event"] == "stopped"]
    assert len(stopped) == 1 and stopped[0]["step"] < 200
    n = stopped[0]["step"]
    assert (run / "latest").read_text().strip() == f"step-{n:08d}"
    assert sorted(p.name for p in (run / "checkpoints" / f"step-{n:08d}" / "rng").iterdir()) == \
        ["rank-00000.pt", "rank-00001.pt"]
    run_train(1, data, run, f"max_steps={n + 2}", "micro_batch_size=8", resume="auto")  # and goes on, on 1 rank
    assert max(losses(run)) == n + 2


def test_nan_steps_are_skipped_and_leave_the_weights_alone(capsys, data, tmp_path, monkeypatch):
    base = ["--config", "configs/cpu-fsdp-test.yaml", "--set", f"data.dir={data}", "--set", "save_interval=0",
            "--set", "eval_interval=100"]
    code, _, err = run_cli(capsys, "train", *base, "--set", f"out_dir={tmp_path / 'four'}", "--set", "max_steps=4")
    assert code == 0, err
    monkeypatch.setenv("PHIFORGE_FAULT", "nan@5")
    code, _, err = run_cli(capsys, "train", *base, "--set", f"out_dir={tmp_path / 'five'}", "--set", "max_steps=5")
    assert code == 0, err
    m = metrics(tmp_path / "five")
    skips = [e for e in m if e["event"] == "skip"]
    assert [(e["step"], e["loss"], e["skipped_total"]) for e in skips] == [(5, "nan", 1)]
    assert m[-1]["skipped_steps"] == 1 and [e for e in m if e["event"] == "train"][-1]["loss"] is None
    # warmup lr does not depend on max_steps, so skipping step 5 must leave exactly the weights of step 4
    a = load_file(tmp_path / "four" / "checkpoints" / "step-00000004" / "model.safetensors")
    b = load_file(tmp_path / "five" / "checkpoints" / "step-00000005" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    # then training goes on normally after a bad step
    monkeypatch.setenv("PHIFORGE_FAULT", "nan@3,nan@4")
    code, _, err = run_cli(capsys, "train", *base, "--set", f"out_dir={tmp_path / 'on'}", "--set", "max_steps=8")
    assert code == 0, err
    ls = losses(tmp_path / "on")
    assert ls[3] is None and ls[4] is None and all(ls[s] < 7 for s in (5, 6, 7, 8))


def test_consecutive_nan_steps_halt_naming_the_last_good_checkpoint(capsys, data, tmp_path, monkeypatch):
    monkeypatch.setenv("PHIFORGE_FAULT", ",".join(f"nan@{s}" for s in range(5, 20)))
    run = tmp_path / "halt"
    code, _, err = run_cli(capsys, "train", "--config", "configs/cpu-fsdp-test.yaml", "--set", f"data.dir={data}",
                           "--set", f"out_dir={run}", "--set", "save_interval=2", "--set", "max_bad_steps=3",
                           "--set", "max_steps=20")
    assert_one_line_error(code, err, "halting at step 7", "3 consecutive", "steps 5-7",
                          f"last good checkpoint: {run / 'checkpoints' / 'step-00000004'}")
    assert (run / "latest").read_text().strip() == "step-00000004"


def test_oom_names_the_settings_to_change(capsys, data, tmp_path, monkeypatch):
    monkeypatch.setenv("PHIFORGE_FAULT", "oom@2")
    code, _, err = run_cli(capsys, "train", "--config", "configs/cpu-fsdp-test.yaml", "--set", f"data.dir={data}",
                           "--set", f"out_dir={tmp_path / 'oom'}")
    assert_one_line_error(code, err, "out of memory at step 2", "micro_batch_size=4", "grad_accum_steps",
                          "parallel.activation_checkpointing", "data.seq_len", "phiforge plan")


def test_resume_auto_without_checkpoint_starts_fresh_and_bad_resume_path_is_one_line(capsys, data, tmp_path):
    run = tmp_path / "fresh"
    code, _, err = run_cli(capsys, "train", "--config", "configs/cpu-fsdp-test.yaml", "--set", f"data.dir={data}",
                           "--set", f"out_dir={run}", "--set", "max_steps=2", "--resume", "auto")
    assert code == 0, err
    assert metrics(run)[0]["resumed_from"] is None
    code, _, err = run_cli(capsys, "train", "--config", "configs/cpu-fsdp-test.yaml", "--set", f"data.dir={data}",
                           "--set", f"out_dir={run}", "--resume", tmp_path / "nowhere")
    assert_one_line_error(code, err, "checkpoint not found")
    # another model shape cannot resume this run's checkpoint
    code, _, err = run_cli(capsys, "train", "--config", "configs/cpu-fsdp-test.yaml", "--set", f"data.dir={data}",
                           "--set", f"out_dir={run}", "--set", "model.intermediate_size=96", "--resume", "auto")
    assert_one_line_error(code, err, "saved for another model", "intermediate_size")
