"""Gated cross-attention (Flamingo): lets a Phi-2 block read a sequence of context tokens, e.g. image features.

    x = x + tanh(attn_gate) * xattn(LN(x), context)
    x = x + tanh(ff_gate)   * ff(LN(x))

Both gates start at `gate_init` (0 by default), so adding these sublayers to a text-only model leaves its
outputs exactly unchanged until training opens the gates. The context is attended to without a mask: every
text position may look at every context token. During generation the context's K/V is computed once per
sequence and kept in the KVCache (`cache.context_kv`). Each gate is a one-element vector, not a scalar: FSDP2
shards every parameter on its first dimension.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from phiforge.config import check_fields, check_range, from_dict
from phiforge.errors import ConfigError


@dataclass
class XAttnConfig:
    every: int = 1  # a cross-attention sublayer in every every-th block: blocks every-1, 2*every-1, ... (0-based)
    context_dim: int | None = None  # width of the context tokens; None: the model's n_embd
    heads: int | None = None  # None: the model's n_head
    ff: bool | float = True  # gated feed-forward after the cross-attention: False, True (4x) or a width multiple
    gate_init: float = 0.0

    def __post_init__(self):
        check_fields(self)
        check_range("every", self.every, 1)
        for name in ("context_dim", "heads"):
            if getattr(self, name) is not None:
                check_range(name, getattr(self, name), 1)
        if not isinstance(self.ff, bool):
            check_range("ff", self.ff, 0.0, lo_open=True, note=" (or true / false)")
        check_range("gate_init", self.gate_init)

    @property
    def ff_mult(self) -> float:
        return 4.0 if self.ff is True else float(self.ff)

    @classmethod
    def from_dict(cls, d: dict, prefix: str = "xattn.") -> "XAttnConfig":
        return from_dict(cls, d, prefix=prefix)  # strict keys and types, errors name the key


def feed_forward(dim: int, hidden: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))


class CrossAttention(nn.Module):
    """Multi-head attention of queries x [B, T, d] over context K/V, through SDPA with no mask."""

    def __init__(self, dim: int, context_dim: int, heads: int):
        super().__init__()
        if dim % heads:
            raise ConfigError(f"cross-attention width {dim} must be divisible by its heads ({heads})")
        self.heads, self.head_dim = heads, dim // heads
        self.q = nn.Linear(dim, dim, bias=True)
        self.kv = nn.Linear(context_dim, 2 * dim, bias=True)
        self.dense = nn.Linear(dim, dim, bias=True)

    def context_kv(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V [B, heads, S, head_dim] for context [B, S, context_dim]."""
        B, S, _ = context.shape
        k, v = self.kv(context).view(B, S, 2, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        return k, v

    def forward(self, x: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        B, T, d = x.shape
        q = self.q(x).view(B, T, self.heads, self.head_dim).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, *kv)
        return self.dense(y.transpose(1, 2).reshape(B, T, d))


class GatedCrossAttention(nn.Module):
    def __init__(self, cfg: XAttnConfig, dim: int, n_head: int, layer_idx: int, eps: float = 1e-5):
        super().__init__()
        self.layer_idx, self.gate_init = layer_idx, cfg.gate_init
        self.attn_norm = nn.LayerNorm(dim, eps=eps)
        self.attn = CrossAttention(dim, cfg.context_dim or dim, cfg.heads or n_head)
        self.attn_gate = nn.Parameter(torch.full((1,), float(cfg.gate_init)))
        self.ff = None
        if cfg.ff is not False:
            self.ff_norm = nn.LayerNorm(dim, eps=eps)
            self.ff = feed_forward(dim, int(dim * cfg.ff_mult))
            self.ff_gate = nn.Parameter(torch.full((1,), float(cfg.gate_init)))

    def forward(self, x: torch.Tensor, context: torch.Tensor, cache=None) -> torch.Tensor:
        kv = cache.context_kv.get(self.layer_idx) if cache is not None else None
        if kv is None:
            kv = self.attn.context_kv(context)
            if cache is not None:  # the context is fixed for the whole sequence: project it once
                cache.context_kv[self.layer_idx] = kv
        x = x + torch.tanh(self.attn_gate) * self.attn(self.attn_norm(x), kv)
        if self.ff is not None:
            x = x + torch.tanh(self.ff_gate) * self.ff(self.ff_norm(x))
        return x
