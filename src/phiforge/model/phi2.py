"""The Phi-2 architecture in one file: config, presets, model and KV cache.

Matches transformers' PhiForCausalLM (microsoft/phi-2) exactly:
  h = LN(x);  x = x + attn(h) + mlp(h)       (parallel attention and MLP from one LayerNorm)
with partial NeoX rotary embeddings on the first `rotary_dim` dims of each head, gelu-tanh, biases
everywhere, a final LayerNorm and an untied lm_head with bias. q, k and v live in one fused `qkv`
Linear (rows ordered [q; k; v]) so a single matmul serves all three; the HF converter splits it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from phiforge.config import check_fields, check_range, from_dict
from phiforge.errors import ConfigError
from phiforge.model.fused import cross_entropy, linear_cross_entropy
from phiforge.model.init import ONES, ZEROS, Init, init_weights_, on_meta, random_seed
from phiforge.model.moe import MoE, MoEConfig
from phiforge.model.xattn import GatedCrossAttention, XAttnConfig


@dataclass
class Phi2Config:
    vocab_size: int = 51200  # embedding rows; rounded up to a multiple of pad_vocab_multiple
    n_layer: int = 32
    n_embd: int = 2560
    n_head: int = 32
    n_kv_head: int | None = None  # None: same as n_head (Phi-2 has no GQA, but HF's PhiConfig allows it)
    intermediate_size: int = 10240
    max_seq_len: int = 2048
    rotary_pct: float = 0.4  # HF partial_rotary_factor
    rope_theta: float = 10000.0
    layer_norm_eps: float = 1e-5
    qk_layernorm: bool = False
    init_std: float = 0.02
    embd_pdrop: float = 0.0
    resid_pdrop: float = 0.0
    attn_pdrop: float = 0.0
    pad_vocab_multiple: int = 64
    moe: MoEConfig | None = None  # mixture-of-experts sublayers (model/moe.py, docs/moe.md); None: dense
    xattn: XAttnConfig | None = None  # gated cross-attention to context tokens (model/xattn.py, docs/vision.md)

    def __post_init__(self):
        check_fields(self)  # types first (also for configs built in Python), so the checks below see numbers
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        for name, most in MAX_SIZES.items():
            check_range(name, getattr(self, name), 1)
            check_range(name, getattr(self, name), hi=most, note=" (phiforge's limit)")
        check_range("rotary_pct", self.rotary_pct, 0.0, 1.0)
        check_range("rope_theta", self.rope_theta, 0.0, lo_open=True)
        check_range("layer_norm_eps", self.layer_norm_eps, 0.0, lo_open=True)
        check_range("init_std", self.init_std, 0.0)
        for name in ("embd_pdrop", "resid_pdrop", "attn_pdrop"):
            check_range(name, getattr(self, name), 0.0, 1.0, hi_open=True)
        m = self.pad_vocab_multiple
        if m > 1 and self.vocab_size % m:
            self.vocab_size = (self.vocab_size + m - 1) // m * m
        if self.n_embd % self.n_head:
            raise ConfigError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if self.n_head % self.n_kv_head:
            raise ConfigError(f"n_head ({self.n_head}) must be divisible by n_kv_head ({self.n_kv_head})")
        if self.rotary_dim % 2:
            raise ConfigError(f"rotary dim {self.rotary_dim} (head_dim x rotary_pct) must be even")
        if self.moe is not None and self.moe.expert_hidden is None:  # equal active FLOPs to the dense MLP
            self.moe = replace(self.moe, expert_hidden=max(1, self.intermediate_size // self.moe.top_k))

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.rotary_pct)  # HF: int(head_dim * partial_rotary_factor)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict, prefix: str = "") -> "Phi2Config":
        """Strict: unknown keys, wrong types and values out of range raise ConfigError naming prefix + key."""
        return from_dict(cls, d, prefix=prefix)

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "Phi2Config":
        return cls.from_dict({**preset_values(name), **overrides})


# Sizes far beyond any model phiforge can train (phi-2: 32 layers, 2560 wide, 51200 tokens, 2048 context), so that
# a typo such as n_layer=10**12 is a one-line error, not a hang while the model is built on the meta device or
# an integer overflow inside torch; every product of two of them still fits in 64 bits.
MAX_SIZES = {"vocab_size": 2**24, "n_layer": 4096, "n_embd": 2**18, "n_head": 2**14, "n_kv_head": 2**14,
             "intermediate_size": 2**20, "max_seq_len": 2**24, "pad_vocab_multiple": 2**16}

PRESETS: dict[str, dict] = {
    # microsoft/phi-2: 2,779,683,840 parameters
    "phi-2": dict(n_layer=32, n_embd=2560, n_head=32, intermediate_size=10240, rotary_pct=0.4),
    # microsoft/phi-1_5 and microsoft/phi-1 share one shape (1.42B)
    "phi-1_5": dict(n_layer=24, n_embd=2048, n_head=32, intermediate_size=8192, rotary_pct=0.5),
    "phi-1": dict(n_layer=24, n_embd=2048, n_head=32, intermediate_size=8192, rotary_pct=0.5),
    # CPU sizes. `tiny` (~0.9M) has a 4096-token vocab for unit tests on synthetic tokens;
    # `small` (~14M) and `base` (~125M) take the full GPT-2/Phi-2 vocabulary.
    "tiny": dict(vocab_size=4096, n_layer=3, n_embd=80, n_head=4, intermediate_size=320, max_seq_len=256),
    "small": dict(n_layer=4, n_embd=128, n_head=4, intermediate_size=512, max_seq_len=512),
    "base": dict(n_layer=12, n_embd=640, n_head=10, intermediate_size=2560, rotary_pct=0.5, max_seq_len=1024),
}


def preset_values(name: str) -> dict:
    """The Phi2Config values of preset `name` (the fields it sets; the rest keep their defaults)."""
    if not isinstance(name, str) or name not in PRESETS:
        raise ConfigError(f"unknown preset '{name}' (choose from: {', '.join(PRESETS)})")
    return dict(PRESETS[name])


# ---------------------------------------------------------------------------------------------
# Rotary embedding (NeoX rotate_half, applied to the first rotary_dim dims of each head)


def rope_cache(cfg: Phi2Config, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    dim = cfg.rotary_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim))
    t = torch.arange(cfg.max_seq_len, device=device).float()
    freqs = torch.outer(t, inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, H, T, hd]; cos/sin: [T, rotary_dim] fp32. Dims past rotary_dim pass through unchanged. The rotation
    runs in fp32 whatever x's dtype (a bf16 angle table is off by up to 2^-8 of a turn), then casts back."""
    r = cos.size(-1)
    x_rot, x_pass = x[..., :r].float(), x[..., r:]
    x_rot = x_rot * cos + rotate_half(x_rot) * sin
    return torch.cat((x_rot.to(x.dtype), x_pass), dim=-1)


# ---------------------------------------------------------------------------------------------
# KV cache


class KVCache:
    """Preallocated per-layer K/V buffers for incremental decoding. `pos` is the number of cached tokens."""

    def __init__(self, cfg: Phi2Config, batch_size: int, max_len: int | None = None, device=None, dtype=None):
        self.max_len = max_len or cfg.max_seq_len
        self.context_kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # cross-attention K/V by layer
        shape = (batch_size, cfg.n_kv_head, self.max_len, cfg.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layer)]
        self.pos = 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        start, end = self.pos, self.pos + k.size(2)
        if end > self.max_len:
            raise ValueError(f"KV cache full: {end} tokens > max_len {self.max_len}")
        self.k[layer][:, :, start:end] = k
        self.v[layer][:, :, start:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


# ---------------------------------------------------------------------------------------------
# Model


class Attention(nn.Module):
    def __init__(self, cfg: Phi2Config, layer_idx: int):
        super().__init__()
        self.cfg, self.layer_idx = cfg, layer_idx
        hd = cfg.head_dim
        self.qkv = nn.Linear(cfg.n_embd, (cfg.n_head + 2 * cfg.n_kv_head) * hd, bias=True)
        self.dense = nn.Linear(cfg.n_head * hd, cfg.n_embd, bias=True)
        if cfg.qk_layernorm:
            self.q_layernorm = nn.LayerNorm(hd, eps=cfg.layer_norm_eps)
            self.k_layernorm = nn.LayerNorm(hd, eps=cfg.layer_norm_eps)

    def forward(self, x, cos, sin, cache: KVCache | None = None):
        cfg = self.cfg
        B, T, _ = x.shape
        hd, nh, nkv = cfg.head_dim, cfg.n_head, cfg.n_kv_head
        q, k, v = self.qkv(x).split([nh * hd, nkv * hd, nkv * hd], dim=-1)
        q = q.view(B, T, nh, hd).transpose(1, 2)
        k = k.view(B, T, nkv, hd).transpose(1, 2)
        v = v.view(B, T, nkv, hd).transpose(1, 2)
        if cfg.qk_layernorm:
            q, k = self.q_layernorm(q), self.k_layernorm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)
        S = k.size(2)
        if T == S:
            mask, causal = None, True
        elif T == 1:
            mask, causal = None, False  # one new token sees the whole cache
        else:  # a chunk appended to a non-empty cache: query i sits at position S - T + i
            mask = torch.ones(T, S, dtype=torch.bool, device=x.device).tril(diagonal=S - T)
            causal = False
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=causal, dropout_p=cfg.attn_pdrop if self.training else 0.0,
            scale=1.0 / math.sqrt(hd), enable_gqa=nkv != nh,
        )
        return self.dense(y.transpose(1, 2).reshape(B, T, nh * hd))


class MLP(nn.Module):
    def __init__(self, cfg: Phi2Config):
        super().__init__()
        self.fc1 = nn.Linear(cfg.n_embd, cfg.intermediate_size, bias=True)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.n_embd, bias=True)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class Block(nn.Module):
    """h = LN(x);  x = x + attn(h) + mlp(h), with an optional MoE sublayer (docs/moe.md):
    after_mlp: then x = x + moe(LN_moe(x));  parallel: x + attn(h) + mlp(h) + moe(h);  replace_mlp: moe is the mlp."""

    def __init__(self, cfg: Phi2Config, layer_idx: int):
        super().__init__()
        self.input_layernorm = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_eps)
        self.attn = Attention(cfg, layer_idx)
        moe = cfg.moe if cfg.moe is not None and cfg.moe.applies_to(layer_idx) else None
        position = moe.position if moe is not None else None
        self.mlp = MoE(moe, cfg.n_embd, cfg.init_std) if position == "replace_mlp" else MLP(cfg)
        self.moe = MoE(moe, cfg.n_embd, cfg.init_std) if position in ("after_mlp", "parallel") else None
        # after_mlp has its own LayerNorm and residual update; parallel reads the block's h like attn and mlp
        self.moe_layernorm = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_eps) if position == "after_mlp" else None
        self.resid_drop = nn.Dropout(cfg.resid_pdrop)
        xa = cfg.xattn
        self.xattn = None
        if xa is not None and (layer_idx + 1) % xa.every == 0:
            self.xattn = GatedCrossAttention(xa, cfg.n_embd, cfg.n_head, layer_idx, cfg.layer_norm_eps)

    def forward(self, x, cos, sin, cache: KVCache | None = None, context: torch.Tensor | None = None):
        if self.xattn is not None and context is not None:
            x = self.xattn(x, context, cache)
        h = self.input_layernorm(x)
        x = x + self.resid_drop(self.attn(h, cos, sin, cache)) + self.resid_drop(self.mlp(h))
        if self.moe is not None and self.moe_layernorm is None:  # parallel
            x = x + self.resid_drop(self.moe(h))
        elif self.moe is not None:  # after_mlp
            x = x + self.resid_drop(self.moe(self.moe_layernorm(x)))
        return x


class Phi2(nn.Module):
    """The model. Two run options that are not architecture (not in Phi2Config, not saved with the weights):
    loss_chunk_rows > 0 computes the training loss with the chunked linear + cross-entropy (model/fused.py), this
    many rows at a time: no [tokens, vocab] fp32 logits (GPU memory; on CPU the plain path is a little faster).
    eval_context: the tokens of context evaluations give the model (evaluation.scoring.eval_context), e.g. the
    sequence length it was trained with; None: max_seq_len."""

    def __init__(self, cfg: Phi2Config, loss_chunk_rows: int = 0, eval_context: int | None = None):
        super().__init__()
        self.cfg, self.loss_chunk_rows, self.eval_context = cfg, loss_chunk_rows, eval_context
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.embed_drop = nn.Dropout(cfg.embd_pdrop)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.final_layernorm = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_eps)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=True)
        self._init_rope(device=None)
        if not self.lm_head.weight.is_meta:  # on the meta device the engine initialises after parallelize()
            init_weights_(self, random_seed())

    def _init_rope(self, device):
        if self.lm_head.weight.is_meta:  # shapes only: init_buffers() computes them once the model is real
            cos = sin = torch.empty(self.cfg.max_seq_len, self.cfg.rotary_dim, device="meta")
        else:
            cos, sin = rope_cache(self.cfg, device=device)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def init_rule(self, module: nn.Module, leaf: str) -> Init:
        """How parameter `leaf` of `module` starts (phiforge.model.init draws it): N(0, init_std) for Linear
        and Embedding weights, zero biases, LayerNorms at identity, MoE and cross-attention gates by their own
        rules (both start as exact no-ops)."""
        if isinstance(module, (nn.Linear, nn.Embedding)):
            return Init("normal", self.cfg.init_std) if leaf == "weight" else ZEROS
        if isinstance(module, nn.LayerNorm):
            return ONES if leaf == "weight" else ZEROS
        if isinstance(module, MoE):
            return Init("normal", module.init_std) if leaf in MoE.RANDOM_INIT else ZEROS
        if isinstance(module, GatedCrossAttention):
            return Init("const", module.gate_init)
        raise ValueError(f"no initialisation rule for parameter '{leaf}' of {type(module).__name__}")

    @torch.no_grad()
    def init_buffers(self) -> None:
        """Buffers after `to_empty()`: the RoPE tables recomputed, MoE balancing biases at zero."""
        self.reset_rope()
        for moe in self.moe_layers().values():
            if moe.cfg.bias_balancing:
                moe.expert_bias.zero_()

    def reset_rope(self):
        """Recompute the RoPE tables on the current device, e.g. after building on the meta device."""
        self._init_rope(device=self.lm_head.weight.device)

    def num_params(self, exclude_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n - self.embed_tokens.weight.numel() if exclude_embedding else n

    def moe_layers(self) -> dict[int, MoE]:
        """MoE sublayers by block index; empty for a dense model. Each holds its last forward's `stats`."""
        return {i: m for i, block in enumerate(self.layers) for m in block.modules() if isinstance(m, MoE)}

    def moe_aux_loss(self) -> torch.Tensor | None:
        """Sum of the MoE layers' balancing and z-losses from the last forward (None for a dense model)."""
        losses = [m.aux_loss for m in self.moe_layers().values() if m.aux_loss is not None]
        return torch.stack(losses).sum() if losses else None

    def hidden_states(self, idx: torch.Tensor, cache: KVCache | None = None,
                      context: torch.Tensor | None = None) -> torch.Tensor:
        """Final-LayerNorm output [B, T, d] for token ids idx [B, T]; context [B, S, context_dim] feeds xattn."""
        T = idx.size(1)
        start = cache.pos if cache is not None else 0
        if start + T > self.cfg.max_seq_len:
            raise ValueError(f"sequence of {start + T} tokens exceeds max_seq_len {self.cfg.max_seq_len}")
        cos, sin = self.rope_cos[start : start + T].float(), self.rope_sin[start : start + T].float()
        x = self.embed_drop(self.embed_tokens(idx))
        for block in self.layers:
            x = block(x, cos, sin, cache, context)
        if cache is not None:
            cache.pos += T
        return self.final_layernorm(x)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, cache: KVCache | None = None,
                context: torch.Tensor | None = None):
        """Logits [B, T, V]; with targets, a LossOutput instead: the mean cross-entropy (ignore_index -100) and,
        in training mode, the MoE routers' balancing and z-losses."""
        h = self.hidden_states(idx, cache, context)
        if targets is not None and self.loss_chunk_rows:  # never holds the full [tokens, vocab] fp32 logits
            loss = linear_cross_entropy(h, self.lm_head.weight, self.lm_head.bias, targets, self.loss_chunk_rows)
        else:
            logits = self.lm_head(h)
            if targets is None:
                return logits
            loss = cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100)
        return LossOutput(loss, self.moe_aux_loss() if self.training else None)


class LossOutput(NamedTuple):
    """What a forward pass with targets computes. Backpropagate `loss`; log `lm_loss`."""

    lm_loss: torch.Tensor  # mean cross-entropy of the language model
    aux_loss: torch.Tensor | None  # MoE balancing + z-losses (training mode only; None for a dense model)

    @property
    def loss(self) -> torch.Tensor:
        return self.lm_loss if self.aux_loss is None else self.lm_loss + self.aux_loss


def count_params_meta(cfg: Phi2Config) -> tuple[int, int]:
    """(total, non-embedding) parameter counts without allocating weights."""
    with on_meta():
        model = Phi2(cfg)
    return model.num_params(), model.num_params(exclude_embedding=True)
