"""The vision fine-tune on the training engine's pieces: periodic checkpoints and exact resume after kill -9
(across the stage1 -> stage2 boundary and inside stage 2), activation checkpointing / compile of the LM blocks
(frozen LM included), and 2 DDP ranks on gloo against 1 process with the same global batch."""

from __future__ import annotations

import json
import signal
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file

from engine_helpers import AC_VARIANTS, ROOT, TIMEOUT, child_env, kill9, losses, max_rel_diff, metrics, wait_for
from test_vision_cli import TINY

from conftest import assert_one_line_error, run_cli

pytestmark = pytest.mark.slow  # multi-process or end-to-end: left out of the quick subset (-m "not slow")

# 4 + 6 steps, a checkpoint every 3 steps and at each stage end: steps 3, 4, 6, 9, 10
SETS = ["stage1.steps=4", "stage2.steps=6", "save_interval=3", "log_interval=1", "eval_interval=100"]


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    out = tmp_path_factory.mktemp("vision-engine")
    from phiforge.cli import main

    assert main(["vision", "synth", "--out", str(out / "synth"), "--n", "24", "--seed", "1"]) == 0
    cfg = {"model": TINY, "vision": {"encoder": {"type": "conv", "image_size": 32, "dim": 32},
                                     "projector": {"type": "resampler", "num_tokens": 4, "heads": 2}},
           "data": {"train": str(out / "synth" / "train.json"), "val": str(out / "synth" / "heldout.json")},
           "micro_batch_size": 4, "eval_batches": 1, "device": "cpu", "threads": 1}
    path = out / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return path


def vision_cmd(nproc: int, config, run, *sets: str, resume: str | None = None) -> list[str]:
    cmd = [sys.executable, "-m", "phiforge"] if nproc == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", "-m", "phiforge"]
    cmd += ["vision", "finetune", "--config", str(config), "--set", f"out_dir={run}"]
    for s in sets:
        cmd += ["--set", s]
    return cmd + (["--resume", resume] if resume else [])


def run_vision(nproc: int, config, run, *sets: str, resume: str | None = None) -> None:
    p = subprocess.run(vision_cmd(nproc, config, run, *sets, resume=resume), env=child_env(), cwd=ROOT,
                       capture_output=True, text=True, timeout=TIMEOUT)
    assert p.returncode == 0, f"exit {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}"


def kill_at(config, run, step: int, resume: str | None = None) -> None:
    """Run until global step `step` hangs after its backward pass (PHIFORGE_FAULT), then kill -9."""
    proc = subprocess.Popen(vision_cmd(1, config, run, *SETS, resume=resume), cwd=ROOT, text=True,
                            env=child_env(PHIFORGE_FAULT=f"hang@{step}"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    wait_for(run / "fault-hang", proc)
    kill9(proc)
    (run / "fault-hang").unlink()


def test_exact_resume_after_kill9_across_stages(config, tmp_path):
    straight = tmp_path / "straight"
    run_vision(1, config, straight, *SETS)
    run = tmp_path / "killed"
    kill_at(config, run, 4)  # inside stage 1's last step: resume from step 3, then across the stage boundary
    assert (run / "latest").read_text().strip() == "step-00000003"
    kill_at(config, run, 8, resume="auto")  # inside stage 2: resume from step 6 (stage 2's second step)
    assert (run / "latest").read_text().strip() == "step-00000006"
    run_vision(1, config, run, *SETS, resume="auto")
    starts = [e for e in metrics(run) if e["event"] == "start"]
    assert [(e["start_step"], (e["resumed_from"] or "")[-13:]) for e in starts] == \
        [(0, ""), (3, "step-00000003"), (6, "step-00000006")]
    a, b = losses(straight), losses(run)
    assert sorted(a) == list(range(1, 11))
    assert [b[s] for s in range(1, 11)] == [a[s] for s in range(1, 11)]  # bit-identical, not approximately
    assert metrics(run)[-1]["val_loss_end"] == metrics(straight)[-1]["val_loss_end"]
    stages = [(e["step"], e["stage"]) for e in metrics(run) if e["event"] == "train"]
    # the three processes: steps 1-3; 4 (stage 1's last), 5-7 (stage 2); 7-10 again from step 6's checkpoint
    assert [s for s, _ in stages] == [1, 2, 3, 4, 5, 6, 7, 7, 8, 9, 10]
    assert [st for s, st in stages if s <= 4] == ["stage1"] * 4 and {st for s, st in stages if s > 4} == {"stage2"}
    # every checkpoint is a vision checkpoint too: the final weights are the straight run's, and they load
    ckpts = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert ckpts == [f"step-{s:08d}" for s in (3, 4, 6, 9, 10)]
    for name in ("vision.safetensors", "model.safetensors"):
        wa = load_file(straight / "checkpoints" / "step-00000010" / name)
        wb = load_file(run / "checkpoints" / "step-00000010" / name)
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    from phiforge.model_files import resolve_checkpoint
    from phiforge.vision.model import load_vision_checkpoint

    assert resolve_checkpoint(run) == run / "checkpoints" / "step-00000010"
    assert load_vision_checkpoint(resolve_checkpoint(run)).gates()


def test_resume_errors_are_one_line(config, tmp_path, capsys):
    code, _, err = run_cli(capsys, "vision", "finetune", "--config", config, "--set", f"out_dir={tmp_path / 'r'}",
                           "--resume", tmp_path / "nowhere")
    assert_one_line_error(code, err, "checkpoint not found")
    code, _, err = run_cli(capsys, "vision", "finetune", "--config", config, "--set", "parallel.strategy=zero3")
    assert_one_line_error(code, err, "parallel.strategy must be one of auto, none, ddp, fsdp, hsdp")
    code, _, err = run_cli(capsys, "vision", "finetune", "--config", config, "--set", "save_interval=-1")
    assert_one_line_error(code, err, "'save_interval' must be at least 0")


def test_activation_checkpointing_and_compile_change_nothing():
    """AC (full, every 2nd block, op-level SAC) and per-block compile on the LM blocks give the plain model's loss
    and gradients, in stage 1 (LM frozen: only the xattn weights inside the blocks train) and stage 2."""
    from phiforge.config import load_config
    from phiforge.train.parallelize import apply_activation_checkpointing, apply_compile
    from phiforge.vision.config import FinetuneConfig
    from phiforge.vision.finetune import build_vision_model

    model_sets = ["model=" + json.dumps({**TINY, "n_layer": 4}),  # JSON is YAML
                  "vision.encoder={type: conv, image_size: 32, dim: 32}",
                  "vision.projector={type: resampler, num_tokens: 4, heads: 2}"]
    variants = AC_VARIANTS
    g = torch.Generator().manual_seed(0)
    visual = torch.randint(0, 256, (2, 3, 32, 32), generator=g, dtype=torch.uint8)
    idx = torch.randint(0, 1000, (2, 16), generator=g)
    labels = idx.roll(-1, dims=1)
    labels[:, :5] = -100  # the prompt is not a target
    for parts in (["projector", "xattn"], ["projector", "xattn", "lm"]):
        results = {}
        for name, sets in variants.items():
            cfg = load_config(FinetuneConfig, None, model_sets + sets)
            torch.manual_seed(0)
            model = build_vision_model(cfg)
            keys = list(model.state_dict())
            model.set_trainable(parts)
            if cfg.parallel.activation_checkpointing != "none":
                apply_activation_checkpointing(model.lm, cfg)
            if cfg.compile:
                apply_compile(model.lm, cfg)
            loss = model(visual, idx, labels).loss
            loss.backward()
            assert list(model.state_dict()) == keys, name
            grads = {n.replace("_checkpoint_wrapped_module.", "").replace("_orig_mod.", ""): p.grad
                     for n, p in model.named_parameters() if p.requires_grad}
            results[name] = (loss.detach(), grads)
        ref_loss, ref_grads = results["none"]
        assert all(g is not None for g in ref_grads.values())
        assert ("lm.lm_head.weight" in ref_grads) == ("lm" in parts)
        for name, (loss, grads) in results.items():
            torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=0)
            assert grads.keys() == ref_grads.keys(), name
            for k, g in ref_grads.items():
                torch.testing.assert_close(grads[k], g, rtol=1e-5, atol=1e-7, msg=f"{name} {parts}: {k}")


def test_ddp_two_ranks_match_one_rank(config, tmp_path):
    """2 processes x micro-batch 2 == 1 process x 4: each rank takes half of every global batch, and each rank's
    loss is weighted by its share of the supervised tokens, so the losses are those of one process."""
    sets = [*SETS, "save_interval=0", "parallel.activation_checkpointing=full"]
    run_vision(1, config, tmp_path / "one", *sets)
    run_vision(2, config, tmp_path / "two", *sets, "micro_batch_size=2")
    a, b = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert sorted(b) == list(range(1, 11))
    assert max_rel_diff(a, b, range(1, 11)) < 1e-5
    start = metrics(tmp_path / "two")[0]
    assert start["world_size"] == 2 and start["strategy"] == "ddp" and start["samples_per_step"] == 4
    assert sorted(p.name for p in (tmp_path / "two" / "checkpoints").iterdir()) == ["step-00000004", "step-00000010"]


def test_fsdp2_and_bf16_mixed_match_one_rank(config, tmp_path):
    """The vision model through parallelize() like the text model: FSDP2 on 2 ranks, both stages (the LM frozen,
    then trained: FSDP2 reads requires_grad at every gather), against 1 process; fp32 within 1e-5, and bf16-mixed
    (FSDP2's casts on a 1-rank mesh and on 2 ranks) within bf16's tolerance (docs/training.md)."""
    sets = [*SETS, "save_interval=0"]
    for precision, tol in (("fp32", 1e-5), ("bf16-mixed", 5e-4)):  # measured 8.9e-8 and 1.3e-5
        run_vision(1, config, tmp_path / f"one-{precision}", *sets, f"precision={precision}")
        run_vision(2, config, tmp_path / f"two-{precision}", *sets, f"precision={precision}", "micro_batch_size=2",
                   "parallel.strategy=fsdp")
        a, b = losses(tmp_path / f"one-{precision}"), losses(tmp_path / f"two-{precision}")
        assert sorted(b) == list(range(1, 11)) and max_rel_diff(a, b, range(1, 11)) < tol, (precision, a, b)
        start = metrics(tmp_path / f"two-{precision}")[0]
        assert start["strategy"] == "fsdp" and start["fully_shard"] and start["precision"] == precision
    assert metrics(tmp_path / "one-bf16-mixed")[0]["fully_shard"]  # one process casts through FSDP2 as well
    from phiforge.model_files import resolve_checkpoint
    from phiforge.vision.model import load_vision_checkpoint

    model = load_vision_checkpoint(resolve_checkpoint(tmp_path / "two-bf16-mixed"))  # gathered to rank 0, whole
    assert model.gates() and all(g.shape == (1,) for g in model.gates())


def _start_vision(config, run, *sets: str, fault: str | None = None, resume: str | None = None):
    env = child_env(**({"PHIFORGE_FAULT": fault} if fault else {}))
    return subprocess.Popen(vision_cmd(1, config, run, *sets, resume=resume), cwd=ROOT, text=True, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def test_nan_step_is_skipped_and_tensorboard_is_written(config, tmp_path):
    run = tmp_path / "nan"
    p = _start_vision(config, run, *SETS, fault="nan@2")
    out, err = p.communicate(timeout=TIMEOUT)
    assert p.returncode == 0, err[-3000:]
    skips = [e for e in metrics(run) if e["event"] == "skip"]
    assert [e["step"] for e in skips] == [2] and skips[0]["stage"] == "stage1"
    assert "step 2: non-finite loss" in out
    trains = {e["step"]: e for e in metrics(run) if e["event"] == "train"}
    assert trains[2]["loss"] is None and trains[3]["skipped_steps"] == 1  # step 2 had no good loss to log
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))


def test_sigterm_saves_and_resume_continues_bit_identically(config, tmp_path):
    straight = tmp_path / "straight"
    run_vision(1, config, straight, *SETS)
    run = tmp_path / "term"
    p = _start_vision(config, run, *SETS, fault="sleep=0.5")
    wait_for(lambda: any(e["event"] == "train" and e["step"] >= 5 for e in metrics(run))
             if (run / "metrics.jsonl").exists() else False, p)
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=TIMEOUT)
    assert p.returncode == 0, err[-3000:]
    stopped = [e for e in metrics(run) if e["event"] == "stopped"]
    assert stopped and stopped[0]["signal"] == "SIGTERM" and stopped[0]["stage"] == "stage2"
    run_vision(1, config, run, *SETS, resume="auto")
    a, b = losses(straight), losses(run)
    assert [b[s] for s in range(1, 11)] == [a[s] for s in range(1, 11)]


def test_oom_message_names_the_settings(config, tmp_path, capsys):
    import os

    os.environ["PHIFORGE_FAULT"] = "oom@1"
    try:
        code, _, err = run_cli(capsys, "vision", "finetune", "--config", config, "--set", f"out_dir={tmp_path / 'o'}",
                               "--set", "progress_bar=false", *[x for s in SETS for x in ("--set", s)])
    finally:
        del os.environ["PHIFORGE_FAULT"]
    assert_one_line_error(code, err, "out of memory at step 1", "micro_batch_size=4", "activation_checkpointing",
                          "stage=stage1")
    assert not (tmp_path / "o").exists()  # failed inside its first step: no run directory left behind


def test_resume_auto_skips_a_damaged_vision_checkpoint(config, tmp_path):
    straight = tmp_path / "straight"
    run_vision(1, config, straight, *SETS)
    run = tmp_path / "damaged"
    kill_at(config, run, 8)  # checkpoints at steps 3, 4 and 6
    (run / "checkpoints" / "step-00000006" / "__0_0.distcp").unlink()
    p = _start_vision(config, run, *SETS, resume="auto")
    out, err = p.communicate(timeout=TIMEOUT)
    assert p.returncode == 0, err[-3000:]
    assert "skipping damaged checkpoint" in err and "step-00000006" in err
    start = [e for e in metrics(run) if e["event"] == "start"][-1]
    assert start["resumed_from"].endswith("step-00000004")
    a, b = losses(straight), losses(run)
    assert [b[s] for s in range(5, 11)] == [a[s] for s in range(5, 11)]
