"""Mixture-of-experts sublayer for Phi-2 blocks (see docs/moe.md).

    after_mlp (default):  h = LN(x);  x = x + attn(h) + mlp(h);  x = x + moe(LN_moe(x))
    parallel:             h = LN(x);  x = x + attn(h) + mlp(h) + moe(h)   (residual MoE, dense + MoE)
    replace_mlp:          h = LN(x);  x = x + attn(h) + moe(h)            (Mixtral style)

Token-choice top-k routing with the router in fp32. Experts are stacked parameters w1 [E, d, h] and
w2 [E, h, d] (plus biases) with gelu-tanh, like the dense MLP. Output projections start at zero, so a
model that gains `after_mlp` or `parallel` MoE layers computes exactly what it computed before.

Three ways to run the experts, all giving the same result (`MoE.impl`):
  grouped  tokens sorted by expert, one `torch._grouped_mm` per projection (CUDA, bf16, Hopper+)
  padded   tokens scattered into an [E, C, d] buffer, one batched matmul per projection (CPU, other GPUs)
  loop     a Python loop over experts: the reference the tests compare the other two against

The forward never calls .item(): losses and statistics stay on the device as tensors. The one exception is
the dropless padded path, which must read the largest expert's token count to size its buffer (torch.compile
captures it as an unbacked size: one graph for every count, no graph break, no recompile).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from phiforge.errors import ConfigError

POSITIONS = ("after_mlp", "parallel", "replace_mlp")
ROUTERS = ("softmax", "sigmoid")
IMPLS = ("auto", "grouped", "padded", "loop")
MAX_EXPERTS = 4096  # far beyond any MoE in use (DeepSeek-V3: 256), so a typo is a one-line error, not a hang
# Each expert's rows in the grouped GEMM start on a multiple of 8 (16 bytes in bf16): the weight-gradient GEMM
# contracts over tokens, and its TMA loads need 16-byte-aligned group starts (torchtitan pads the same way).
GROUP_ALIGN = 8


@dataclass
class MoEConfig:
    num_experts: int = 8
    top_k: int = 2
    expert_hidden: int | None = None  # None: the model's intermediate_size // top_k (same active FLOPs as the MLP)
    every: int = 1  # MoE in the blocks with layer_idx % every == every - 1 (every=2: blocks 1, 3, 5, ...)
    position: str = "after_mlp"  # after_mlp | parallel | replace_mlp
    shared_experts: int = 0  # always-on experts of width expert_hidden (DeepSeekMoE)
    router: str = "softmax"  # softmax | sigmoid
    aux_loss_coef: float = 0.01  # Switch balancing loss alpha * E * sum_i f_i * P_i
    z_loss_coef: float = 1e-3  # ST-MoE router z-loss mean(logsumexp(logits)^2)
    capacity_factor: float | None = None  # None: dropless; else in training each expert takes ceil(cf * tokens * k / E)
    bias_balancing: bool = False  # DeepSeek-V3 aux-loss-free balancing: per-expert bias for top-k selection only
    bias_update_rate: float = 1e-3  # gamma: bias += gamma * sign(mean_load - load_i) after each optimizer step

    def __post_init__(self):
        from phiforge.config import check_fields, check_range

        check_fields(self)  # types, also for a MoEConfig built in Python
        check_range("num_experts", self.num_experts, 1)
        check_range("num_experts", self.num_experts, hi=MAX_EXPERTS, note=" (phiforge's limit)")
        check_range("top_k", self.top_k, 1, self.num_experts, note=" (1 to num_experts)")
        if self.expert_hidden is not None:
            check_range("expert_hidden", self.expert_hidden, 1, note=" (or null: intermediate_size // top_k)")
            check_range("expert_hidden", self.expert_hidden, hi=2**20, note=" (phiforge's limit)")
        check_range("every", self.every, 1)
        check_range("shared_experts", self.shared_experts, 0, MAX_EXPERTS)
        if self.position not in POSITIONS:
            raise ConfigError(f"moe.position must be one of {', '.join(POSITIONS)}, got '{self.position}'")
        if self.router not in ROUTERS:
            raise ConfigError(f"moe.router must be one of {', '.join(ROUTERS)}, got '{self.router}'")
        for name in ("aux_loss_coef", "z_loss_coef", "bias_update_rate"):
            check_range(name, getattr(self, name), 0.0)
        if self.capacity_factor is not None:
            check_range("capacity_factor", self.capacity_factor, 0.0, lo_open=True, note=" (or null: dropless)")
            # from num_experts / top_k on, every expert can take every token: larger factors drop nothing more
            check_range("capacity_factor", self.capacity_factor, hi=float(self.num_experts),
                        note=" (num_experts already drops nothing; null: dropless)")

    @classmethod
    def from_dict(cls, d: dict) -> "MoEConfig":
        from phiforge.config import from_dict  # strict keys and types, errors name the key

        return from_dict(cls, d, prefix="moe.")

    def applies_to(self, layer_idx: int) -> bool:
        return layer_idx % self.every == self.every - 1


def _grouped_mm_ok(x: torch.Tensor, dtype: torch.dtype) -> bool:
    # torch._grouped_mm's fast kernel wants bf16 on Hopper or newer; elsewhere the padded bmm is the safe choice.
    return (x.is_cuda and dtype == torch.bfloat16 and hasattr(torch, "_grouped_mm")
            and torch.cuda.get_device_capability(x.device) >= (9, 0))


class _AddExpertBias(torch.autograd.Function):
    """h + bias[row_expert]: each row gets its expert's bias. The bias gradient is a sum over all of an expert's
    rows; autograd's gather backward accumulates it in the bias's dtype, which in bf16 loses most of it (0.7
    relative error at 4k tokens). A one-hot matmul sums it with the GEMM's fp32 accumulator instead, for
    E x rows x h FLOPs, E/d of an expert GEMM."""

    @staticmethod
    def forward(ctx, h, bias, row_expert):
        ctx.save_for_backward(row_expert)
        ctx.num_experts, ctx.bias_dtype = bias.size(0), bias.dtype
        return h + bias.to(h.dtype)[row_expert]

    @staticmethod
    def backward(ctx, grad):
        (row_expert,) = ctx.saved_tensors
        onehot = F.one_hot(row_expert.long(), ctx.num_experts).to(grad.dtype)  # [rows, E]
        return grad, (onehot.t() @ grad).to(ctx.bias_dtype), None


class MoE(nn.Module):
    """Top-k routed experts (+ optional shared experts). Input and output [..., d].

    After each forward: `aux_loss` (weighted balancing + z-loss, with grad) and `stats` (detached tensors:
    load [E] = share of routed assignments per expert, imbalance = max/mean load, dropped = assignments over
    capacity, aux and z = the weighted loss terms)."""

    RANDOM_INIT = ("router", "w1", "shared_w1")  # N(0, init_std); every other parameter starts at zero

    def __init__(self, cfg: MoEConfig, d_model: int, init_std: float = 0.02):
        super().__init__()
        if cfg.expert_hidden is None:
            raise ConfigError("moe.expert_hidden must be set (Phi2Config fills it from intermediate_size)")
        self.cfg, self.init_std = cfg, init_std
        E, d, h = cfg.num_experts, d_model, cfg.expert_hidden
        self.router = nn.Parameter(torch.empty(E, d))
        self.w1 = nn.Parameter(torch.empty(E, d, h))
        self.b1 = nn.Parameter(torch.empty(E, h))
        self.w2 = nn.Parameter(torch.empty(E, h, d))
        self.b2 = nn.Parameter(torch.empty(E, d))
        if cfg.shared_experts:  # S shared experts of width h == one always-on MLP of width S*h
            sh = cfg.shared_experts * h
            self.shared_w1 = nn.Parameter(torch.empty(d, sh))
            self.shared_b1 = nn.Parameter(torch.empty(sh))
            self.shared_w2 = nn.Parameter(torch.empty(sh, d))
            self.shared_b2 = nn.Parameter(torch.empty(d))
        if cfg.bias_balancing:  # a buffer, not a parameter: set by update_bias(), saved with the checkpoint
            self.register_buffer("expert_bias", torch.zeros(E))
        self.impl = "auto"  # see IMPLS; tests and the bench pin one
        self.aux_loss: torch.Tensor | None = None
        self.stats: dict[str, torch.Tensor] = {}
        self._load_sum: torch.Tensor | None = None  # routed assignments per expert since the last update_bias()
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        for name, p in self.named_parameters(recurse=False):
            if name in self.RANDOM_INIT:
                nn.init.normal_(p, mean=0.0, std=self.init_std)
            else:  # biases and output projections: zero, so a new MoE sublayer adds exactly nothing
                nn.init.zeros_(p)
        if self.cfg.bias_balancing:
            self.expert_bias.zero_()

    @torch.no_grad()
    def load_dense_mlp(self, fc1_weight, fc1_bias, fc2_weight, fc2_bias, noise: float = 0.0,
                       generator: torch.Generator | None = None) -> None:
        """Upcycling: every routed expert becomes a copy of a dense MLP (nn.Linear layouts), each weight times
        (1 + noise * N(0, 1)) elementwise so the experts differ. Shared experts keep their fresh (zero-output) init."""
        if fc1_weight.size(0) != self.cfg.expert_hidden:
            raise ConfigError(f"copying the dense MLP needs moe.expert_hidden == intermediate_size "
                              f"({fc1_weight.size(0)}), got {self.cfg.expert_hidden}")
        for p, src in ((self.w1, fc1_weight.t()), (self.b1, fc1_bias), (self.w2, fc2_weight.t()), (self.b2, fc2_bias)):
            src = src.float().expand(p.shape)
            if noise:
                src = src * (1 + noise * torch.randn(p.shape, generator=generator))
            p.copy_(src)

    @torch.no_grad()
    def update_bias(self) -> None:
        """DeepSeek-V3 balancing step, called after optimizer.step(): raise the bias of under-loaded experts,
        lower it for over-loaded ones. A no-op without bias_balancing or without training forwards since the last call."""
        if not self.cfg.bias_balancing or self._load_sum is None:
            return
        load = self._load_sum.float()
        # Only the sign is used, so counting a recomputed forward twice (activation checkpointing) changes nothing.
        self.expert_bias += self.cfg.bias_update_rate * torch.sign(load.mean() - load)
        self._load_sum = None

    def balancing_load(self) -> torch.Tensor | None:
        """Routed assignments per expert since the last update_bias(), or None: the training engine sums it
        over the ranks before update_bias(), so every rank balances on the global load."""
        return self._load_sum

    def discard_load(self) -> None:
        """Forget the load of a step that was skipped (no balancing update from it)."""
        self._load_sum = None

    def capacity(self, n_tokens: int) -> int | None:
        cf = self.cfg.capacity_factor
        return None if cf is None else max(1, math.ceil(cf * n_tokens * self.cfg.top_k / self.cfg.num_experts))

    # -----------------------------------------------------------------------------------------

    def _route(self, x: torch.Tensor):
        """fp32 router: logits [N, E], scores [N, E], chosen experts idx [N, k] and their gates [N, k]."""
        with torch.autocast(x.device.type, enabled=False):
            logits = F.linear(x.float(), self.router.float())
        scores = logits.softmax(-1) if self.cfg.router == "softmax" else logits.sigmoid()
        select = scores + self.expert_bias if self.cfg.bias_balancing else scores  # bias steers selection only
        idx = select.topk(self.cfg.top_k, dim=-1).indices
        gates = scores.gather(1, idx)
        if self.cfg.top_k > 1:  # Mixtral: renormalise over the chosen k. For k=1 keep the raw score, else the
            gates = gates / gates.sum(-1, keepdim=True)  # gate is always 1 and the router gets no gradient
        return logits, scores, idx, gates

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape, dtype = x.shape, x.dtype
        x = x.reshape(-1, shape[-1])
        N, E, k = x.size(0), self.cfg.num_experts, self.cfg.top_k
        logits, scores, idx, gates = self._route(x)

        # Assignment a = t * k + c is the c-th choice of token t. Capacity goes to assignments in this order, so a
        # token's routing never depends on later tokens of its own sequence (no causal leak when dropping).
        expert = idx.reshape(-1)  # [A], A = N * k
        weight = gates.reshape(-1)  # [A] fp32
        # Running count per expert instead of bincount + sort: fixed shapes, so torch.compile keeps one graph.
        ranks = (expert[:, None] == torch.arange(E, device=x.device)).cumsum(0)  # [A, E]
        counts = ranks[-1]
        pos = ranks.gather(1, expert[:, None]).squeeze(1) - 1  # rank of each assignment within its expert
        C = self.capacity(N) if self.training else None  # eval and generation are dropless: batch-independent
        if C is None:
            dropped = counts.new_zeros(())
        else:
            keep = pos < C
            weight = weight * keep
            dropped = (~keep).sum()

        impl = self.impl
        if impl == "auto":
            impl = "grouped" if _grouped_mm_ok(x, self._compute_dtype(x)) else "padded"
        if impl == "loop":
            y = self._experts_loop(x, expert)
        elif impl == "padded":
            y = self._experts_padded(x, expert, pos, counts, C)
        elif impl == "grouped":
            y = self._experts_grouped(x, expert, pos, counts)
        else:
            raise ValueError(f"unknown MoE impl '{impl}' (choose from: {', '.join(IMPLS)})")
        out = (y * weight[:, None]).view(N, k, -1).sum(1)  # gate and sum each token's k expert outputs
        if self.cfg.shared_experts:
            out = out + F.gelu(x @ self.shared_w1 + self.shared_b1, approximate="tanh") @ self.shared_w2 + self.shared_b2

        # Switch balancing loss: f_i = share of assignments to expert i (no grad), P_i = mean router probability.
        load = counts.float() / (k * N)
        probs = scores if self.cfg.router == "softmax" else scores / scores.sum(-1, keepdim=True)
        aux = self.cfg.aux_loss_coef * E * (load * probs.mean(0)).sum()
        z = self.cfg.z_loss_coef * torch.logsumexp(logits, dim=-1).square().mean()
        self.aux_loss = aux + z
        self.stats = {"load": load, "imbalance": load.max() * E, "dropped": dropped.float(),
                      "aux": aux.detach(), "z": z.detach()}
        if self.training and self.cfg.bias_balancing:
            self._load_sum = counts if self._load_sum is None else self._load_sum + counts
        return out.to(dtype).view(shape)

    def _compute_dtype(self, x: torch.Tensor) -> torch.dtype:
        dev = x.device.type
        return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype

    def _expert(self, x: torch.Tensor, e: int) -> torch.Tensor:
        return F.gelu(x @ self.w1[e] + self.b1[e], approximate="tanh") @ self.w2[e] + self.b2[e]

    def _experts_loop(self, x, expert):
        """Reference: each expert on its own tokens. Returns [A, d] outputs in assignment order."""
        y = None
        for e in range(self.cfg.num_experts):
            a = (expert == e).nonzero().squeeze(1)
            ye = self._expert(x[a // self.cfg.top_k], e)
            y = ye.new_zeros(expert.numel(), ye.size(1)) if y is None else y
            y = y.index_copy(0, a, ye)
        return y

    def _experts_padded(self, x, expert, pos, counts, C):
        """Scatter assignments into an [E, C, d] buffer (C = capacity, or the largest expert's count rounded up to
        GROUP_ALIGN when dropless), two batched matmuls, gather back. Assignments past C are written to a spare row that is
        never computed and read from row 0: their weight is 0, so what they read does not matter."""
        E, d = self.cfg.num_experts, x.size(1)
        if C is None:
            # dropless: the one host sync, the buffer's size. Under torch.compile it is an unbacked size (one graph
            # for every value, not a recompile each); rounded up to GROUP_ALIGN rows, so it is never 1 (a size the
            # compiler would have to guard on) and each expert's rows start aligned
            most = counts.max().item()
            torch._check(most >= 1)
            C = (most + GROUP_ALIGN - 1) // GROUP_ALIGN * GROUP_ALIGN
        keep = pos < C
        slot = expert * C + pos
        xa = x.repeat_interleave(self.cfg.top_k, dim=0)  # [A, d]: each token once per choice
        buf = x.new_zeros(E * C + 1, d).index_put((torch.where(keep, slot, E * C),), xa)
        h = torch.baddbmm(self.b1.unsqueeze(1), buf[:-1].view(E, C, d), self.w1)
        y = torch.baddbmm(self.b2.unsqueeze(1), F.gelu(h, approximate="tanh"), self.w2)
        return y.view(E * C, d)[torch.where(keep, slot, 0)]

    def _experts_grouped(self, x, expert, pos, counts):
        """Tokens sorted by expert into groups padded to GROUP_ALIGN rows, one grouped GEMM per projection,
        gathered back. Fixed buffer size (no host sync): the last group takes the slack rows, which are zero
        inputs whose outputs are never read. Dropped assignments are computed but carry weight 0."""
        E, A, d, dt = self.cfg.num_experts, expert.numel(), x.size(1), self._compute_dtype(x)
        sizes = (counts + GROUP_ALIGN - 1) // GROUP_ALIGN * GROUP_ALIGN
        row = (sizes.cumsum(0) - sizes)[expert] + pos
        R = A + E * (GROUP_ALIGN - 1)  # >= sum(sizes) for any routing
        offs = sizes.cumsum(0).to(torch.int32)
        offs[-1] = R
        row_expert = torch.searchsorted(offs, torch.arange(R, device=x.device, dtype=torch.int32), right=True)
        buf = x.new_zeros(R, d, dtype=dt).index_put((row,), x.repeat_interleave(self.cfg.top_k, dim=0).to(dt))
        h = _AddExpertBias.apply(torch._grouped_mm(buf, self.w1.to(dt), offs=offs), self.b1, row_expert)
        y = _AddExpertBias.apply(torch._grouped_mm(F.gelu(h, approximate="tanh"), self.w2.to(dt), offs=offs),
                                 self.b2, row_expert)
        return y[row]

def moe_metrics(model: nn.Module) -> dict[str, dict]:
    """Per-MoE-layer stats of the last forward as plain numbers, keyed by block index: for metrics.jsonl.
    Reads the device once per layer, so call it at log intervals only."""
    out = {}
    for i, m in model.moe_layers().items():
        s = {k: v.tolist() for k, v in m.stats.items()}
        out[str(i)] = {"load": [round(v, 5) for v in s.pop("load")], **s}
    return out
