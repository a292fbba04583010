"""One build path (issue 22, item 1): `phiforge train`, `phiforge vision finetune` and `plan --measure` build
their model the same way, phiforge.train.build.build_model: on the meta device, through parallelize(), then
filled, then build_step's optimizer and TrainStep. A spy on the one parallelize() sees each trainer's model
arrive on the meta device and leave with real weights."""

from __future__ import annotations

import pytest
import torch
import yaml

from engine_helpers import CONFIG, make_synthetic

from conftest import run_cli


@pytest.fixture()
def spy(monkeypatch):
    """Every model that goes through parallelize(): (class name, on meta when it arrived, on meta when it left)."""
    from phiforge.train import build

    seen, real = [], build.parallelize

    def parallelize(model, cfg, layout=None, materialize=None, body=None):
        before = next(model.parameters()).is_meta
        out = real(model, cfg, layout, materialize, body)
        seen.append((type(model).__name__, before, next(model.parameters()).is_meta))
        return out

    monkeypatch.setattr(build, "parallelize", parallelize)
    return seen


def test_text_vision_and_plan_build_through_parallelize(spy, capsys, tmp_path):
    data = make_synthetic(tmp_path / "data", train_docs=4, val_docs=1)
    code, _, err = run_cli(capsys, "train", "--config", CONFIG, "--set", f"data.dir={data}", "--set",
                           f"out_dir={tmp_path / 'text'}", "--set", "max_steps=2", "--set", "save_interval=0")
    assert code == 0, err
    assert spy == [("Phi2", True, False)]

    assert run_cli(capsys, "vision", "synth", "--out", tmp_path / "synth", "--n", "8", "--seed", "1")[0] == 0
    cfg = {"model": {"vocab_size": 50257, "n_layer": 1, "n_embd": 32, "n_head": 2, "intermediate_size": 64,
                     "max_seq_len": 64}, "vision": {"encoder": {"type": "conv", "image_size": 32, "dim": 32}},
           "data": {"train": str(tmp_path / "synth" / "train.json")}, "micro_batch_size": 2, "device": "cpu",
           "stage1": {"steps": 1}, "stage2": {"steps": 1}, "out_dir": str(tmp_path / "vision"), "progress_bar": False}
    (tmp_path / "vision.yaml").write_text(yaml.safe_dump(cfg), encoding="utf-8")
    code, _, err = run_cli(capsys, "vision", "finetune", "--config", tmp_path / "vision.yaml")
    assert code == 0, err
    assert spy[1:] == [("VisionLM", True, False)]  # one model for both stages (ddp would rewrap it per stage)

    from phiforge.config import load_config
    from phiforge.train.config import TrainConfig
    from phiforge.train.plan import measure_peak_in_process

    cfg = load_config(TrainConfig, CONFIG, ["micro_batch_size=2"])
    assert measure_peak_in_process(cfg, steps=1) > 0
    assert spy[2:] == [("Phi2", True, False)]
    assert not torch.distributed.is_initialized()  # each one gave its world of one back
