"""VisionLM = vision encoder -> projector -> context tokens -> Phi-2 with gated cross-attention layers.

A vision checkpoint is an ordinary phiforge checkpoint of the language model (config.json's `model` carries
the `xattn` section, so `load_checkpoint` still gives a working text model) plus:
    config.json  "vision": {encoder, projector}      (phiforge.vision.config.VisionConfig)
    vision.safetensors     encoder.* and projector.* weights
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file

from phiforge.model_files import check_state_dict, load_checkpoint, write_model_files
from phiforge.config import from_dict, to_dict
from phiforge.errors import CheckpointError, ConfigError
from phiforge.fileio import output_dir
from phiforge.model import Phi2
from phiforge.model.phi2 import LossOutput
from phiforge.model.xattn import GatedCrossAttention, XAttnConfig
from phiforge.vision.config import PARTS, VisionConfig
from phiforge.vision.encoders import build_encoder
from phiforge.vision.projector import build_projector

VISION_WEIGHTS = "vision.safetensors"


class VisionLM(nn.Module):
    def __init__(self, lm: Phi2, vcfg: VisionConfig, load_encoder_weights: bool = True):
        super().__init__()
        if lm.cfg.xattn is None:
            raise ConfigError("the language model has no cross-attention layers: set model.xattn")
        self.lm, self.vcfg = lm, vcfg
        if not self.gates():
            raise ConfigError(f"xattn.every ({lm.cfg.xattn.every}) exceeds n_layer ({lm.cfg.n_layer}): no cross-attention")
        self.encoder = build_encoder(vcfg.encoder, load_weights=load_encoder_weights)
        context_dim = lm.cfg.xattn.context_dim or lm.cfg.n_embd
        self.projector = build_projector(vcfg.projector, self.encoder.out_dim, context_dim)

    def encode(self, visual: torch.Tensor) -> torch.Tensor:
        """Context tokens [B, M, context_dim] for a batch of images or precomputed features."""
        return self.projector(self.encoder(visual))

    def forward(self, visual: torch.Tensor, idx: torch.Tensor, labels: torch.Tensor) -> LossOutput:
        """Mean cross-entropy over the positions whose label is not -100 (the assistant's tokens), and in
        training mode the MoE balancing terms, as a LossOutput (backpropagate `.loss`)."""
        h = self.lm.hidden_states(idx, context=self.encode(visual))
        keep = labels != -100  # only supervised positions need logits: most of a conversation is masked
        loss = F.cross_entropy(self.lm.lm_head(h[keep]).float(), labels[keep])
        return LossOutput(loss, self.lm.moe_aux_loss() if self.training else None)

    def parts(self) -> dict[str, list[nn.Parameter]]:
        """Parameters by trainable part (see vision.config.PARTS)."""
        lm = dict(self.lm.named_parameters())
        return {"encoder": list(self.encoder.parameters()), "projector": list(self.projector.parameters()),
                "xattn": [p for n, p in lm.items() if ".xattn." in n],
                "lm": [p for n, p in lm.items() if ".xattn." not in n]}

    def set_trainable(self, parts: list[str]) -> int:
        """Train exactly `parts`, freeze the rest; returns the number of trainable parameters."""
        groups = self.parts()
        assert set(groups) == set(PARTS)
        for name, params in groups.items():
            for p in params:
                p.requires_grad_(name in parts)
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def gates(self) -> list[nn.Parameter]:
        return [p for m in self.lm.modules() if isinstance(m, GatedCrossAttention)
                for p in (m.attn_gate, getattr(m, "ff_gate", None)) if p is not None]

    def gate_values(self) -> list[float]:
        """tanh of every gate (0: closed). Under FSDP each gate is gathered: every rank must call this."""
        from torch.distributed.tensor import DTensor

        whole = [g.full_tensor() if isinstance(g, DTensor) else g for g in self.gates()]
        return [float(torch.tanh(g.detach()).item()) for g in whole]

    @contextlib.contextmanager
    def gates_closed(self):
        """Ablation: tanh(0) = 0 on every gate, so the model cannot see the context at all."""
        saved = [g.detach().clone() for g in self.gates()]
        with torch.no_grad():
            for g in self.gates():
                g.zero_()
        try:
            yield self
        finally:
            with torch.no_grad():
                for g, v in zip(self.gates(), saved):
                    g.copy_(v)


def add_cross_attention(lm: Phi2, xcfg: XAttnConfig) -> Phi2:
    """A copy of text model `lm` with gated cross-attention layers added; the new gates start closed (gate_init)."""
    new = Phi2(replace(lm.cfg, xattn=xcfg)).to(lm.lm_head.weight.device)
    missing, unexpected = new.load_state_dict(lm.state_dict(), strict=False)
    if unexpected or any(".xattn." not in k for k in missing):
        raise CheckpointError(f"cannot add cross-attention: unexpected {unexpected[:3]}, missing {missing[:3]}")
    return new


def write_vision_files(state: dict[str, torch.Tensor], lm_cfg, vcfg: VisionConfig, out_dir: Path,
                       tokenizer_dir: Path | None = None, extra: dict | None = None) -> None:
    """A vision checkpoint's files, from a VisionLM's full state dict, into existing directory out_dir (the
    fine-tune's training checkpoints carry them beside the DCP files); config.json comes last."""
    lm_state = {k[len("lm."):]: v for k, v in state.items() if k.startswith("lm.")}
    vision_state = {k: v for k, v in state.items() if not k.startswith("lm.")}
    write_model_files(out_dir, lm_state, lm_cfg, tokenizer_dir=tokenizer_dir,
                      extra={"vision": to_dict(vcfg), **(extra or {})}, extra_weights={VISION_WEIGHTS: vision_state})


def save_vision_checkpoint(model: VisionLM, out_dir: Path, tokenizer_dir: Path | None = None,
                           extra: dict | None = None, overwrite: bool = False) -> Path:
    with output_dir(out_dir, "model", inputs=[tokenizer_dir], overwrite=overwrite) as tmp:
        write_vision_files(model.state_dict(), model.lm.cfg, model.vcfg, tmp, tokenizer_dir=tokenizer_dir, extra=extra)
    return Path(out_dir)


def is_vision_checkpoint(ckpt_dir: Path) -> bool:
    try:
        return "vision" in json.loads((Path(ckpt_dir) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False


def load_vision_checkpoint(ckpt_dir: Path, device: str | torch.device = "cpu") -> VisionLM:
    ckpt_dir = Path(ckpt_dir)
    lm = load_checkpoint(ckpt_dir)  # validates config.json and the language model's weights
    if not is_vision_checkpoint(ckpt_dir):
        raise CheckpointError(f"{ckpt_dir} is a text-only checkpoint (config.json has no 'vision' section)")
    meta = json.loads((ckpt_dir / "config.json").read_text(encoding="utf-8"))
    try:
        vcfg = from_dict(VisionConfig, meta["vision"], prefix="vision.")
        model = VisionLM(lm, vcfg, load_encoder_weights=False)
    except ConfigError as e:
        raise CheckpointError(f"bad vision config in {ckpt_dir / 'config.json'}: {e}") from None
    path = ckpt_dir / VISION_WEIGHTS
    try:
        state = load_file(str(path))
    except FileNotFoundError:
        raise CheckpointError(f"vision weights not found: {path}") from None
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"corrupt safetensors file {path}: {e}") from None
    expected = {k: v for k, v in model.state_dict().items() if not k.startswith("lm.")}
    check_state_dict(expected, state, str(path))
    model.load_state_dict(state, strict=False)
    return model.to(device).eval()
