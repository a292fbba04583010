"""Encoders from local files only: a timm ViT, a transformers CLIP vision tower and precomputed features;
and a vision checkpoint that rebuilds all of them without the source files."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from phiforge.errors import DataError
from phiforge.model import Phi2, Phi2Config
from phiforge.vision.config import EncoderConfig, ProjectorConfig, VisionConfig
from phiforge.vision.encoders import build_encoder, load_visual
from phiforge.vision.model import VisionLM, load_vision_checkpoint, save_vision_checkpoint

LM = dict(vocab_size=256, n_layer=2, n_embd=32, n_head=2, intermediate_size=64, max_seq_len=64,
          xattn={"every": 1, "context_dim": 24})


def pixels(n: int, size: int) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))


def roundtrip(tmp_path, vcfg: VisionConfig, visual: torch.Tensor, source=None) -> None:
    """Save a VisionLM, delete the encoder's source file(s), load it back: same loss."""
    torch.manual_seed(0)
    model = VisionLM(Phi2(Phi2Config(**LM)), vcfg).eval()
    with torch.no_grad():
        for g in model.gates():
            g.fill_(0.5)
    idx = torch.randint(0, 256, (visual.size(0), 8))
    labels = idx.roll(-1, dims=1)
    ckpt = save_vision_checkpoint(model, tmp_path / "ckpt")
    if source is not None:
        shutil.rmtree(source) if source.is_dir() else source.unlink()
    loaded = load_vision_checkpoint(ckpt)
    torch.testing.assert_close(loaded(visual, idx, labels).lm_loss, model(visual, idx, labels).lm_loss,
                               rtol=1e-5, atol=1e-5)


def test_timm_vit_random_and_from_local_weights(tmp_path):
    kwargs = {"patch_size": 8, "depth": 2}
    cfg = EncoderConfig(type="timm", name="vit_tiny_patch16_224", image_size=32, kwargs=kwargs)
    torch.manual_seed(0)
    enc = build_encoder(cfg).eval()
    x = pixels(2, 32)
    tokens = enc(x)
    assert tokens.shape == (2, 1 + 16, 192)  # class token + 4x4 patches
    weights = tmp_path / "vit.safetensors"
    save_file(enc.backbone.model.state_dict(), str(weights))
    torch.manual_seed(1)  # a different random init, replaced by the file's weights
    loaded = build_encoder(EncoderConfig(type="timm", name=cfg.name, image_size=32, kwargs=kwargs,
                                         path=str(weights))).eval()
    torch.testing.assert_close(loaded(x), tokens)
    roundtrip(tmp_path, VisionConfig(encoder=EncoderConfig(type="timm", name=cfg.name, image_size=32, kwargs=kwargs,
                                                           path=str(weights)),
                                     projector=ProjectorConfig(type="resampler", num_tokens=4, heads=2)), x,
              source=weights)


def test_clip_vision_tower_from_a_local_directory(tmp_path):
    import transformers

    conf = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=2, image_size=32, patch_size=8)
    torch.manual_seed(0)
    clip = transformers.CLIPVisionModel(conf).eval()
    clip.save_pretrained(tmp_path / "clip")
    cfg = EncoderConfig(type="hf", path=str(tmp_path / "clip"), image_size=999)
    enc = build_encoder(cfg).eval()
    assert cfg.image_size == 32 and cfg.hf_config["model_type"] == "clip_vision_model"
    x = pixels(2, 32)
    expected = clip(pixel_values=(x / 255.0 - enc.mean) / enc.std).last_hidden_state
    torch.testing.assert_close(enc(x), expected)
    roundtrip(tmp_path, VisionConfig(encoder=cfg), x, source=tmp_path / "clip")  # rebuilt from the saved hf_config


@pytest.mark.parametrize("suffix", [".npy", ".safetensors"])
def test_precomputed_features(tmp_path, suffix):
    feats = torch.randn(5, 12)
    path = tmp_path / f"f{suffix}"
    if suffix == ".npy":
        np.save(path, feats.numpy())
    else:
        save_file({"features": feats}, str(path))
    cfg = EncoderConfig(type="features", dim=12)
    torch.testing.assert_close(load_visual(path, cfg), feats)
    with pytest.raises(DataError, match=r"shape \(5, 12\); expected \[tokens, 7\]"):
        load_visual(path, EncoderConfig(type="features", dim=7))
    roundtrip(tmp_path, VisionConfig(encoder=cfg), feats[None].repeat(2, 1, 1))


def test_conv_encoder_checkpoint(tmp_path):
    roundtrip(tmp_path, VisionConfig(encoder=EncoderConfig(type="conv", image_size=32, dim=16)), pixels(2, 32))
