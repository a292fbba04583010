"""Bad checkpoints fail as one clear line: nonzero exit, `phiforge: error: ...` naming the problem, no traceback.

`convert to-hf` loads a phiforge checkpoint and `convert from-hf` a Hugging Face one, so they exercise both
readers. HF-format inputs are written with phiforge's own helpers: these tests do not need transformers.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from phiforge.checkpoint import load_state_dict, save_checkpoint, save_state_dict
from phiforge.cli import main
from phiforge.errors import CheckpointError
from phiforge.hf import config_from_hf, config_to_hf, state_dict_to_hf
from phiforge.model import Phi2, Phi2Config

CFG = dict(vocab_size=256, n_layer=2, n_embd=32, n_head=2, intermediate_size=64, max_seq_len=64)


@pytest.fixture
def ckpt(tmp_path) -> Path:
    torch.manual_seed(0)
    return save_checkpoint(Phi2(Phi2Config(**CFG)), tmp_path / "ckpt")


@pytest.fixture
def hf_dir(tmp_path) -> Path:
    cfg = Phi2Config(**CFG)
    torch.manual_seed(0)
    d = tmp_path / "hf"
    save_state_dict(state_dict_to_hf(Phi2(cfg).state_dict(), cfg), d)
    (d / "config.json").write_text(json.dumps(config_to_hf(cfg)))
    return d


def rewrite_weights(d: Path, edit) -> None:
    state = load_state_dict(d)
    edit(state)
    save_file(state, str(d / "model.safetensors"), metadata={"format": "pt"})


def fails(capsys, args: list[str], *needles: str) -> str:
    rc = main([str(a) for a in args])
    err = capsys.readouterr().err
    assert rc != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("phiforge: error: "), err
    assert "Traceback" not in err
    for n in needles:
        assert n in lines[0], f"{n!r} not in {lines[0]!r}"
    return lines[0]


# ---------------------------------------------------------------------------------------------
# phiforge checkpoints (read by `convert to-hf`)


def test_missing_checkpoint_dir(tmp_path, capsys):
    fails(capsys, ["convert", "to-hf", tmp_path / "nope", tmp_path / "out"], "not found", "nope")


def test_corrupt_config(ckpt, tmp_path, capsys):
    (ckpt / "config.json").write_text('{"format": "phiforge", "model": {')
    fails(capsys, ["convert", "to-hf", ckpt, tmp_path / "out"], "not valid JSON", "config.json")


@pytest.mark.parametrize("damage", [lambda b: os.urandom(4096), lambda b: b[: len(b) // 2]],
                         ids=["garbage", "truncated"])
def test_corrupt_safetensors(ckpt, tmp_path, capsys, damage):
    f = ckpt / "model.safetensors"
    f.write_bytes(damage(f.read_bytes()))
    fails(capsys, ["convert", "to-hf", ckpt, tmp_path / "out"], "corrupt safetensors", "model.safetensors")
    assert not (tmp_path / "out").exists()


def test_missing_tensor(ckpt, tmp_path, capsys):
    rewrite_weights(ckpt, lambda s: s.pop("layers.1.mlp.fc2.bias"))
    fails(capsys, ["convert", "to-hf", ckpt, tmp_path / "out"], "missing layers.1.mlp.fc2.bias")


def test_extra_tensor(ckpt, tmp_path, capsys):
    rewrite_weights(ckpt, lambda s: s.update({"layers.0.attn.rogue.weight": torch.zeros(2)}))
    fails(capsys, ["convert", "to-hf", ckpt, tmp_path / "out"], "unexpected layers.0.attn.rogue.weight")


def test_wrong_shape(ckpt, tmp_path, capsys):
    rewrite_weights(ckpt, lambda s: s.update({"layers.0.attn.qkv.weight": torch.zeros(96, 16)}))
    fails(capsys, ["convert", "to-hf", ckpt, tmp_path / "out"], "wrong shape for layers.0.attn.qkv.weight", "(96, 16)")


def test_unrepresentable_field_is_refused(ckpt, tmp_path, capsys):
    meta = json.loads((ckpt / "config.json").read_text())
    meta["model"]["moe"] = {"num_experts": 8, "top_k": 2}
    (ckpt / "config.json").write_text(json.dumps(meta))
    fails(capsys, ["convert", "to-hf", ckpt, tmp_path / "out"], "moe", "Hugging Face")


def test_config_to_hf_refuses_any_unmapped_extension_field():
    # stands in for a future Phi2Config with, e.g., cross-attention options
    Ext = dataclasses.make_dataclass("Ext", [("xattn", dict | None, None), ("xattn_every", int, 0)],
                                     bases=(Phi2Config,))
    config_to_hf(Ext(**CFG))  # extensions off: fine
    with pytest.raises(CheckpointError, match="xattn_every"):
        config_to_hf(Ext(**CFG, xattn_every=4))
    with pytest.raises(CheckpointError, match="xattn"):
        config_to_hf(Ext(**CFG, xattn={"every": 4}))


def test_error_without_traceback_in_a_real_process(ckpt, tmp_path):
    (ckpt / "model.safetensors").write_bytes(b"\x00garbage" * 100)
    p = subprocess.run([sys.executable, "-m", "phiforge", "convert", "to-hf", str(ckpt), str(tmp_path / "out")],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode != 0
    assert p.stderr.startswith("phiforge: error: corrupt safetensors file") and len(p.stderr.splitlines()) == 1
    assert "Traceback" not in p.stderr + p.stdout


# ---------------------------------------------------------------------------------------------
# Hugging Face checkpoints (read by `convert from-hf`)


def test_hf_missing_dir(tmp_path, capsys):
    fails(capsys, ["convert", "from-hf", tmp_path / "nope", tmp_path / "out"], "not found", "nope")


def test_hf_corrupt_config(hf_dir, tmp_path, capsys):
    (hf_dir / "config.json").write_text("not json")
    fails(capsys, ["convert", "from-hf", hf_dir, tmp_path / "out"], "not valid JSON")


def test_hf_missing_config(hf_dir, tmp_path, capsys):
    (hf_dir / "config.json").unlink()
    fails(capsys, ["convert", "from-hf", hf_dir, tmp_path / "out"], "config not found")


def test_hf_not_phi(hf_dir, tmp_path, capsys):
    cfg = json.loads((hf_dir / "config.json").read_text())
    (hf_dir / "config.json").write_text(json.dumps({**cfg, "model_type": "llama"}))
    fails(capsys, ["convert", "from-hf", hf_dir, tmp_path / "out"], "model_type 'llama'", "expected 'phi'")


def test_hf_missing_weights(hf_dir, tmp_path, capsys):
    (hf_dir / "model.safetensors").unlink()
    fails(capsys, ["convert", "from-hf", hf_dir, tmp_path / "out"], "no model.safetensors")


def test_hf_missing_tensor_is_named_by_its_hf_key(hf_dir, tmp_path, capsys):
    rewrite_weights(hf_dir, lambda s: s.pop("model.layers.1.self_attn.k_proj.weight"))
    fails(capsys, ["convert", "from-hf", hf_dir, tmp_path / "out"], "missing model.layers.1.self_attn.k_proj.weight")


def test_hf_vocab_mismatch(hf_dir, tmp_path, capsys):
    cfg = json.loads((hf_dir / "config.json").read_text())
    (hf_dir / "config.json").write_text(json.dumps({**cfg, "vocab_size": 300}))
    fails(capsys, ["convert", "from-hf", hf_dir, tmp_path / "out"], "wrong shape for lm_head.bias: (256,) in file, (300,) in model")


@pytest.mark.parametrize("key, value, needle", [
    ("hidden_act", "relu", "hidden_act 'relu'"),
    ("tie_word_embeddings", True, "tie_word_embeddings"),
    ("rope_scaling", {"rope_type": "linear", "factor": 2.0}, "rope_scaling"),
    ("num_key_value_heads", 3, "n_kv_head"),
])
def test_hf_config_we_cannot_reproduce(key, value, needle):
    cfg = config_to_hf(Phi2Config(**CFG))
    with pytest.raises(CheckpointError, match=needle):
        config_from_hf({**cfg, key: value})


def test_hf_config_keeps_vocab_unpadded():
    cfg = config_from_hf({**config_to_hf(Phi2Config(**CFG)), "vocab_size": 1000})
    assert cfg.vocab_size == 1000


def test_bad_shard_size_is_a_usage_error(ckpt, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["convert", "to-hf", str(ckpt), str(tmp_path / "out"), "--max-shard-size", "5XB"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1 and "bad size '5XB'" in err
