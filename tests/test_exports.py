"""Exports other tools read unchanged (issue 17, item 13), `vision eval` with unusable images (item 10), and the
small ones of item 15: plan's HSDP layouts and units, the LitGPT example config."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
import torch
import yaml

from conftest import assert_one_line_error, run_cli
from phiforge.model import Phi2, Phi2Config
from phiforge.model_files import save_checkpoint
from phiforge.tokenizer import EOT, builtin_tokenizer

ROOT = Path(__file__).resolve().parents[1]
TEXT = "It is a truth universally acknowledged,  that a   single man<|endoftext|>\n\nAhab 1851 — ünïcödé 日本"


def tiny_checkpoint(path: Path, tokenizer_dir: Path | None = None, **overrides) -> Path:
    torch.manual_seed(0)
    return save_checkpoint(Phi2(Phi2Config.from_preset("tiny", **overrides)), path, tokenizer_dir=tokenizer_dir)


def small_bpe(d: Path):
    """A byte-level BPE that is not GPT-2's: 400 tokens learnt from a few sentences, with <|endoftext|>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=[EOT],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([TEXT, "a truth a truth universally, single men and women"] * 20, trainer)
    d.mkdir(parents=True)
    tok.save(str(d / "tokenizer.json"))
    return tok


@pytest.mark.parametrize("which", ["gpt2", "own-bpe"])
def test_to_hf_slow_tokenizer_matches_ours(capsys, tmp_path, which):
    import transformers
    if which == "gpt2":
        ours, ckpt = builtin_tokenizer(), tiny_checkpoint(tmp_path / "ckpt", vocab_size=50304)
    else:
        ours = small_bpe(tmp_path / "tok")
        ckpt = tiny_checkpoint(tmp_path / "ckpt", tokenizer_dir=tmp_path / "tok")
    code, _, err = run_cli(capsys, "convert", "to-hf", ckpt, tmp_path / "hf")
    assert code == 0, err
    for name in ("vocab.json", "merges.txt", "special_tokens_map.json"):
        assert (tmp_path / "hf" / name).is_file(), name
    slow = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf", use_fast=False)
    fast = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert not slow.is_fast and fast.is_fast
    want = ours.encode(TEXT).ids
    assert slow.encode(TEXT) == fast.encode(TEXT) == want
    assert slow.decode(want) == TEXT
    assert slow.eos_token == EOT and slow.model_max_length == 256  # the tiny preset's context, not 2048
    assert json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text())["model_max_length"] == 256


def test_to_litgpt_prompt_style_is_default(capsys, tmp_path):
    from litgpt import Config
    from litgpt.prompts import Default, Phi2, PromptStyle, has_prompt_style, load_prompt_style

    ckpt = tiny_checkpoint(tmp_path / "ckpt")
    assert run_cli(capsys, "convert", "to-litgpt", ckpt, tmp_path / "lit")[0] == 0
    lit = tmp_path / "lit"
    config = Config.from_file(lit / "model_config.yaml")
    # without the file LitGPT picks a style by name; ours starts with "phi-2" and would get Phi-2's Instruct style
    assert isinstance(PromptStyle.from_config(config), Phi2)
    assert has_prompt_style(lit)  # what litgpt.generate.base checks first
    style = load_prompt_style(lit)
    assert type(style) is Default and style.apply("Call me Ishmael.") == "Call me Ishmael."


def test_exports_are_world_readable_whatever_the_umask(capsys, tmp_path):
    ckpt = tiny_checkpoint(tmp_path / "ckpt")
    old = os.umask(0o077)
    try:
        outs = []
        for fmt in ("to-hf", "to-litgpt"):
            outs.append(tmp_path / fmt)
            assert run_cli(capsys, "convert", fmt, ckpt, outs[-1])[0] == 0
        outs.append(tiny_checkpoint(tmp_path / "saved"))
    finally:
        os.umask(old)
    for out in [*outs, ckpt]:
        assert stat.S_IMODE(out.stat().st_mode) == 0o755, out
        modes = {p.name: oct(stat.S_IMODE(p.stat().st_mode)) for p in out.iterdir()}
        assert set(modes.values()) == {"0o644"}, (out, modes)
    assert "model.safetensors" in {p.name for p in (tmp_path / "to-hf").iterdir()}  # the file that was 0600


def test_rope_theta_warning_and_model_card(capsys, tmp_path):
    plain = tiny_checkpoint(tmp_path / "plain")
    code, _, err = run_cli(capsys, "convert", "to-hf", plain, tmp_path / "hf")
    assert code == 0 and err == ""
    card = (tmp_path / "hf" / "README.md").read_text()
    assert "no training record" in card and "context: 256 tokens" in card and "llama.cpp" not in card
    theta = tiny_checkpoint(tmp_path / "theta", rope_theta=500000.0)
    code, _, err = run_cli(capsys, "convert", "to-hf", theta, tmp_path / "hf2")
    assert code == 0
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("phiforge: warning: rope_theta is 500000")
    assert "llama.cpp" in lines[0]
    assert "llama.cpp" in (tmp_path / "hf2" / "README.md").read_text()


# ---------------------------------------------------------------------------------------------- vision eval

@pytest.fixture(scope="module")
def vision(tmp_path_factory):
    from phiforge.cli import main
    from phiforge.vision.config import EncoderConfig, ProjectorConfig, VisionConfig
    from phiforge.vision.model import VisionLM, save_vision_checkpoint

    root = tmp_path_factory.mktemp("vision")
    assert main(["vision", "synth", "--out", str(root / "synth"), "--n", "8", "--heldout", "0.5"]) == 0
    torch.manual_seed(0)
    lm = Phi2(Phi2Config(vocab_size=50257, n_layer=1, n_embd=32, n_head=2, intermediate_size=64, max_seq_len=128,
                         xattn={"every": 1, "context_dim": 32}))
    vcfg = VisionConfig(encoder=EncoderConfig(type="conv", image_size=32, dim=32),
                        projector=ProjectorConfig(type="resampler", num_tokens=4, heads=2))
    return save_vision_checkpoint(VisionLM(lm, vcfg), root / "ckpt"), root / "synth"


def test_vision_eval_counts_unusable_images_and_fails_when_none_is_left(capsys, tmp_path, vision):
    ckpt, synth = vision
    records = json.loads((synth / "heldout.json").read_text())  # 4 records
    (tmp_path / "images").mkdir()
    for r in records[2:]:
        (tmp_path / r["image"]).write_bytes((synth / r["image"]).read_bytes())
    (tmp_path / records[1]["image"]).write_bytes(b"not a png")  # corrupt; records[0]'s image is missing
    (tmp_path / "heldout.json").write_text(json.dumps(records))
    code, out, err = run_cli(capsys, "vision", "eval", "--checkpoint", ckpt, "--data", tmp_path / "heldout.json",
                             "--ablations", "none", "--out", tmp_path / "eval.json")
    assert code == 0, err
    assert "skipped 2 of 4 records: {'missing_image': 1, 'unreadable_image': 1}" in out
    assert "8 questions on 2 images" in out
    result = json.loads((tmp_path / "eval.json").read_text())
    assert result["records"] == {"records": 4, "missing_image": 1, "unreadable_image": 1, "used": 2}

    for r in records[2:]:
        (tmp_path / r["image"]).unlink()
    code, out, err = run_cli(capsys, "vision", "eval", "--checkpoint", ckpt, "--data", tmp_path / "heldout.json")
    assert_one_line_error(code, err, "none of its 4 record(s) is usable", "missing_image 3", "unreadable_image 1")
    assert "questions" not in out

    answers_first = [{**records[0], "conversations": records[0]["conversations"][1::-1]}]  # gpt, then human
    (tmp_path / "odd.json").write_text(json.dumps(answers_first))
    code, _, err = run_cli(capsys, "vision", "eval", "--checkpoint", ckpt, "--data", tmp_path / "odd.json",
                           "--image-dir", synth)
    assert_one_line_error(code, err, "no question/answer pairs", "1 usable record(s)")


# ---------------------------------------------------------------------------------------------- item 15

def test_plan_refuses_hsdp_on_part_of_a_node(capsys):
    sets = ["--set", "model.preset=tiny", "--set", "parallel.strategy=hsdp"]
    code, _, err = run_cli(capsys, "plan", *sets, "--gpus", "6", "--gpus-per-node", "4")
    assert_one_line_error(code, err, "hsdp over 6 GPUs at 4 per node is not a whole number of nodes")
    code, out, err = run_cli(capsys, "plan", *sets, "--gpus", "8", "--gpus-per-node", "4")
    assert code == 0 and "shard degree 4" in out, err
    code, out, err = run_cli(capsys, "plan", *sets, "--gpus", "6", "--gpus-per-node", "4",
                             "--set", "parallel.hsdp_replicate=2")
    assert code == 0 and "shard degree 3" in out, err


def test_plan_shows_small_sizes_in_a_unit_that_shows_them(capsys):
    code, out, err = run_cli(capsys, "plan", "--set", "model.preset=tiny", "--set", "data.seq_len=64")
    assert code == 0, err
    rows = [line for line in out.splitlines() if line.startswith("  ")]
    assert rows and not any(" 0.00 " in line for line in rows), out
    assert any(line.split()[-1] in ("MiB", "KiB") for line in rows)
    code, out, _ = run_cli(capsys, "plan", "--set", "model.preset=phi-2", "--set", "micro_batch_size=1")
    assert "predicted peak" in out and " GiB" in [line for line in out.splitlines() if "predicted peak" in line][0]


def test_litgpt_example_config_loads(capsys):
    from phiforge.config import load_config
    from phiforge.litgpt.pretrain import LitPretrainConfig, litgpt_yaml

    path = ROOT / "configs" / "litgpt-cpu.yaml"
    code, out, err = run_cli(capsys, "litgpt", "pretrain", "--config", path, "--print-config")
    assert code == 0, err
    printed = yaml.safe_load(out)
    assert printed["data"]["dir"] == "data/lit-gutenberg" and printed["model"] == {"preset": "small"}
    cfg = load_config(LitPretrainConfig, path, [])
    y = litgpt_yaml(cfg, Path("runs/x"), None)
    assert y["model_config"]["n_layer"] == 4 and y["train"]["max_seq_length"] == 128
    assert y["train"]["max_tokens"] == 300 * 8 * 128
    # phiforge's data path on LitGPT's side: one background worker, and (on this CPU) no pinning, as Prefetcher does
    from phiforge.data.prefetch import Prefetcher

    with Prefetcher(lambda: torch.zeros(1), "cpu") as ours:
        assert y["data"]["init_args"]["num_workers"] == 1 and y["data"]["init_args"]["pin_memory"] is ours.pin is False
