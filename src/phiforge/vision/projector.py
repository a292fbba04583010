"""Projectors: encoder features [B, N, D] -> context tokens [B, M, context_dim] for the cross-attention layers."""

from __future__ import annotations

import torch
import torch.nn as nn

from phiforge.model.xattn import CrossAttention, feed_forward
from phiforge.vision.config import ProjectorConfig


class MLPProjector(nn.Module):
    """LLaVA-1.5's two-layer MLP, token by token: M = N."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_dim, out_dim), nn.GELU(approximate="tanh"), nn.Linear(out_dim, out_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class ResamplerLayer(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.norm_x, self.norm_latents = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = CrossAttention(dim, dim, heads)
        self.ff_norm = nn.LayerNorm(dim)
        self.ff = feed_forward(dim, 4 * dim)

    def forward(self, latents: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        lat = self.norm_latents(latents)
        # Flamingo: the latents attend to the features and to themselves
        kv = self.attn.context_kv(torch.cat([self.norm_x(x), lat], dim=1))
        latents = latents + self.attn(lat, kv)
        return latents + self.ff(self.ff_norm(latents))


class PerceiverResampler(nn.Module):
    """Flamingo's Perceiver resampler: num_tokens learned latents read any number of features, so M is fixed."""

    def __init__(self, cfg: ProjectorConfig, in_dim: int, out_dim: int):
        super().__init__()
        self.proj_in = nn.Linear(in_dim, out_dim)
        self.latents = nn.Parameter(torch.randn(cfg.num_tokens, out_dim) * 0.02)
        self.layers = nn.ModuleList(ResamplerLayer(out_dim, cfg.heads) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj_in(x)
        latents = self.latents.expand(x.size(0), -1, -1)
        for layer in self.layers:
            latents = layer(latents, x)
        return self.norm(latents)


def build_projector(cfg: ProjectorConfig, in_dim: int, out_dim: int) -> nn.Module:
    return MLPProjector(in_dim, out_dim) if cfg.type == "mlp" else PerceiverResampler(cfg, in_dim, out_dim)
