"""The `phiforge vision` commands end to end on a tiny model: synth -> 2-step finetune -> generate -> eval."""

from __future__ import annotations

import json

import pytest
import yaml

from conftest import assert_one_line_error, run_cli

TINY = {"vocab_size": 50257, "n_layer": 2, "n_embd": 32, "n_head": 2, "intermediate_size": 64, "max_seq_len": 128,
        "xattn": {"every": 1, "context_dim": 32}}


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("vision") / "synth"
    from phiforge.cli import main

    assert main(["vision", "synth", "--out", str(out), "--n", "24", "--seed", "1"]) == 0
    return out


def test_finetune_generate_eval(tmp_path, capsys, synth_dir):
    config = {"model": TINY, "vision": {"encoder": {"type": "conv", "image_size": 32, "dim": 32},
                                        "projector": {"type": "resampler", "num_tokens": 4, "heads": 2}},
              "data": {"train": str(synth_dir / "train.json"), "val": str(synth_dir / "heldout.json")},
              "micro_batch_size": 4, "eval_batches": 1, "device": "cpu", "out_dir": str(tmp_path / "run")}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    code, out, err = run_cli(capsys, "vision", "finetune", "--config", tmp_path / "cfg.yaml",
                             "--set", "stage1.steps=1", "--set", "stage2.steps=1", "--set", "log_interval=1")
    assert code == 0, err
    assert "done: 2 steps" in out
    events = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    stages = [e for e in events if e["event"] == "stage"]
    assert [s["train"] for s in stages] == [["projector", "xattn"], ["projector", "xattn", "lm"]]
    assert stages[0]["trainable_params"] < stages[1]["trainable_params"]
    assert [e["stage"] for e in events if e["event"] == "train"] == ["stage1", "stage2"]
    ckpt = tmp_path / "run" / "checkpoints" / "step-00000002"
    assert (ckpt / "vision.safetensors").exists() and (tmp_path / "run" / "latest").read_text().strip() == ckpt.name

    code, out, err = run_cli(capsys, "vision", "generate", "--checkpoint", tmp_path / "run", "--image",
                             synth_dir / "images" / "000000.png", "--prompt", "What color are the shapes?",
                             "--max-new-tokens", "3")
    assert code == 0, err
    assert len(out.splitlines()) == 1

    code, out, err = run_cli(capsys, "vision", "eval", "--checkpoint", ckpt, "--data", synth_dir / "heldout.json",
                             "--out", tmp_path / "eval.json")
    assert code == 0, err
    result = json.loads((tmp_path / "eval.json").read_text())
    assert set(result["results"]) == {"none", "blank", "gates0"}
    assert result["questions"] == 4 * result["images"] > 0
    assert set(result["results"]["none"]) == {"color", "shape", "count", "position"}
    assert "gates0" in out and "chance" in out


def test_user_errors_are_one_line(tmp_path, capsys, synth_dir):
    code, _, err = run_cli(capsys, "vision", "finetune", "--set", "vision.encoder.type=resnet")
    assert_one_line_error(code, err, "vision.encoder.type must be one of")
    code, _, err = run_cli(capsys, "vision", "finetune", "--set", "stage1.train=[projector, eyes]")
    assert_one_line_error(code, err, "unknown part(s) to train: eyes")
    bad = tmp_path / "bad.json"
    bad.write_text('[{"id": 1,}]', encoding="utf-8")
    code, _, err = run_cli(capsys, "vision", "finetune", "--set", f"data.train={bad}", "--set", "model.preset=tiny",
                           "--set", "model.vocab_size=50257", "--set", "device=cpu")
    assert_one_line_error(code, err, "malformed JSON at line 1")
    code, _, err = run_cli(capsys, "vision", "generate", "--checkpoint", tmp_path / "nope", "--image", "x.png",
                           "--prompt", "hi")
    assert_one_line_error(code, err, "checkpoint directory not found")
