"""The optimizer (AdamW, or Muon for the weight matrices + AdamW for the rest) and learning-rate schedules.

Which parameter goes where (`param_roles`, decided by module type, not by name):
  matrix         the weight of every nn.Linear except the LM head: attention, MLP, cross-attention, projector
  matrix_in_out  MoE expert weights (w1, w2: [E, in, out] stacks, each expert's matrix orthogonalised on its
                 own) and shared-expert weights (shared_w1, shared_w2), stored as x @ W
  decay          the LM head's weight, MoE routers and any other >= 2-D non-embedding weight (AdamW, decayed)
  no_decay       embeddings, biases (MoE's b1/b2 too), norms, cross-attention gates, 1-D tensors (AdamW, no decay)
optim.name=adamw: AdamW for all four (matrices decayed); optim.name=muon: Muon for the two matrix roles.

Muon under FSDP2/HSDP (`MuonWithAdamW`): the momentum stays sharded like the weight; each step every rank
all-gathers each 2-D matrix's Nesterov update in the dtype Newton-Schulz runs in (ns_dtype auto: bf16 where
the device computes bf16 natively, else fp32; the result is what one process computes), orthogonalises the whole matrix and keeps its own rows. Expert stacks
sharded on the expert dimension hold whole experts per rank and need no gather. docs/training.md, "Optimizers".
"""

from __future__ import annotations

import math
import re
from collections import defaultdict

import torch
import torch.nn as nn

from phiforge.errors import ConfigError
from phiforge.train.config import OptimConfig
from phiforge.train.precision import resolve_ns_dtype

ROLES = ("matrix", "matrix_in_out", "decay", "no_decay")
MUON_ROLES = ("matrix", "matrix_in_out")
_MOE_MATRICES = ("w1", "w2", "shared_w1", "shared_w2")
_WRAPPERS = re.compile(r"(?<![^.])(_checkpoint_wrapped_module|_orig_mod|module)\.")  # AC, compile, DDP


def _role(module: nn.Module, name: str, full_name: str, p: torch.Tensor, heads: set[int]) -> str:
    from phiforge.model.moe import MoE

    if isinstance(module, nn.Linear) and name == "weight":
        return "decay" if id(module) in heads else "matrix"
    if isinstance(module, MoE):
        if name in _MOE_MATRICES:
            return "matrix_in_out"
        return "decay" if name == "router" else "no_decay"
    if isinstance(module, nn.Embedding) or name == "bias" or p.ndim < 2:
        return "no_decay"
    return "no_decay" if "embed" in full_name else "decay"


def param_roles(model: nn.Module) -> dict[str, str]:
    """Every parameter's name (as model.named_parameters() gives it) -> its role (module docstring)."""
    from phiforge.model import Phi2

    heads = {id(m.lm_head) for m in model.modules() if isinstance(m, Phi2)}
    roles, seen = {}, set()
    for mname, module in model.named_modules():
        for name, p in module.named_parameters(recurse=False):
            if id(p) not in seen:
                seen.add(id(p))
                full_name = f"{mname}.{name}" if mname else name
                roles[full_name] = _role(module, name, full_name, p, heads)
    return roles


def _pattern(name: str) -> str:
    return re.sub(r"(^|\.)\d+(\.|$)", r"\1*\2", _WRAPPERS.sub("", name))


_GROUP_ORDER = ("muon", "muon (MoE, x @ W layout; each expert on its own)", "adamw (weight decay)",
                "adamw (no weight decay)")


def describe_split(model: nn.Module, cfg: OptimConfig) -> list[str]:
    """One line per optimizer group: which optimizer, how many tensors and values, the name patterns."""
    roles = param_roles(model)
    by_group: dict[str, list] = defaultdict(list)
    for name, p in model.named_parameters():
        if p.requires_grad:
            by_group[_group_name(roles[name], cfg)].append((name, p.numel()))
    lines = []
    for group, items in sorted(by_group.items(), key=lambda kv: _GROUP_ORDER.index(kv[0])):
        patterns = list(dict.fromkeys(_pattern(n) for n, _ in items))
        lines.append(f"{group}: {len(items)} tensors, {sum(n for _, n in items):,} values: {', '.join(patterns)}")
    return lines


def _group_name(role: str, cfg: OptimConfig) -> str:
    if cfg.name == "muon" and role in MUON_ROLES:
        return _GROUP_ORDER[0] if role == "matrix" else _GROUP_ORDER[1]
    return _GROUP_ORDER[3] if role == "no_decay" else _GROUP_ORDER[2]


def fused_kernels(params: list[torch.Tensor]) -> bool:
    """The one rule for AdamW's fused kernel (one kernel per step instead of a loop of them): on every CUDA
    parameter, and on CPU for plain tensors, where it is ~2x foreach's speed (torch's CPU kernel takes no
    DTensor shards)."""
    from torch.distributed.tensor import DTensor

    return bool(params) and all(p.device.type == "cuda" or not isinstance(p, DTensor) for p in params)


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """AdamW over every trainable parameter, or (optim.name=muon) Muon for the matrices and AdamW for the rest,
    as one optimizer. Matrices are decayed; biases, norms and embeddings never."""
    roles = param_roles(model)
    params: dict[str, list] = {r: [] for r in ROLES}
    for name, p in model.named_parameters():
        if p.requires_grad:
            params[roles[name]].append(p)
    trainable = [p for ps in params.values() for p in ps]
    adamw = {"lr": cfg.lr, "betas": (cfg.beta1, cfg.beta2), "eps": cfg.eps, "fused": fused_kernels(trainable)}
    if cfg.name == "adamw":
        groups = [{"params": params["matrix"] + params["matrix_in_out"] + params["decay"],
                   "weight_decay": cfg.weight_decay}, {"params": params["no_decay"], "weight_decay": 0.0}]
        return torch.optim.AdamW(groups, **adamw)
    muon_pieces()  # a clear error on a torch without Muon, before anything is built
    muon_lr = cfg.muon.lr or cfg.lr
    ns_dtype = resolve_ns_dtype(cfg.muon.ns_dtype, trainable[0].device.type if trainable else "cpu")
    muon = {"algorithm": "muon", "lr": muon_lr, "lr_scale": muon_lr / cfg.lr, "weight_decay": cfg.weight_decay,
            "momentum": cfg.muon.momentum, "nesterov": cfg.muon.nesterov, "ns_steps": cfg.muon.ns_steps,
            "ns_dtype": ns_dtype, "adjust_lr_fn": cfg.muon.adjust_lr_fn}
    groups = [{"params": params["matrix"], **muon, "layout": "out_in"},
              {"params": params["matrix_in_out"], **muon, "layout": "in_out"},
              {"params": params["decay"], "algorithm": "adamw", "weight_decay": cfg.weight_decay},
              {"params": params["no_decay"], "algorithm": "adamw", "weight_decay": 0.0}]
    return MuonWithAdamW([g for g in groups if g["params"]], adamw)


def muon_pieces():
    """torch's own Muon building blocks: (Newton-Schulz, lr adjustment, default coefficients, eps)."""
    if not hasattr(torch.optim, "Muon"):
        raise ConfigError(f"optim.name=muon needs torch.optim.Muon (PyTorch 2.9 or newer); this is torch "
                          f"{torch.__version__}: upgrade torch or use optim.name=adamw")
    from torch.optim import _muon

    return _muon._zeropower_via_newtonschulz, _muon._adjust_lr, (_muon.DEFAULT_A, _muon.DEFAULT_B,
                                                                 _muon.DEFAULT_C), _muon.EPS


class MuonWithAdamW(torch.optim.Optimizer):
    """One optimizer: torch.optim.Muon's update on the groups with algorithm=muon (2-D matrices, 3-D expert
    stacks matrix by matrix, FSDP2/HSDP DTensor shards), torch's AdamW (its functional form,
    torch.optim.adamw.adamw) on the groups with algorithm=adamw. One state and one list of param groups, so DCP
    saves, loads and reshards it like AdamW. adamw_kwargs: AdamW's lr, betas, eps and fused, the defaults of
    every group."""

    def __init__(self, groups: list[dict], adamw_kwargs: dict):
        super().__init__(groups, defaults={"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "fused": None,
                                           **adamw_kwargs})
        for g in self.param_groups:
            for p in g["params"] if g["algorithm"] == "muon" else ():
                if p.ndim not in (2, 3):
                    raise ValueError(f"Muon takes 2-D matrices and 3-D expert stacks, got shape {tuple(p.shape)}")

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            if group["algorithm"] == "muon":
                for p in group["params"]:
                    if p.grad is not None:
                        self._muon_update(p, group)
            else:
                self._adamw_step(group)
        return loss

    def _adamw_step(self, group: dict) -> None:
        """torch.optim.AdamW's step for one group: its state, started as AdamW starts it, and its math."""
        from torch.optim.adamw import adamw

        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            return
        for p in params:
            state = self.state[p]
            if not state:  # the step count lives on the host unless the fused kernel reads it on the device
                state["step"] = torch.zeros((), dtype=torch.float32, device=p.device if group["fused"] else "cpu")
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        states = [self.state[p] for p in params]
        beta1, beta2 = group["betas"]
        adamw(params, [p.grad for p in params], [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states],
              [], [s["step"] for s in states], fused=group["fused"], amsgrad=False, beta1=beta1, beta2=beta2,
              lr=group["lr"], weight_decay=group["weight_decay"], eps=group["eps"], maximize=False)

    def _muon_update(self, p: torch.Tensor, group: dict) -> None:
        """torch.optim.Muon's _single_tensor_muon for one parameter, with the orthogonalisation made whole."""
        _, adjust_lr, _, _ = muon_pieces()
        grad, momentum, lr = p.grad, group["momentum"], group["lr"]
        state = self.state[p]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(grad, memory_format=torch.preserve_format)
        buf = state["momentum_buffer"]
        buf.lerp_(grad, 1 - momentum)
        update = grad.lerp(buf, momentum) if group["nesterov"] else buf
        update = orthogonalize(update, group["ns_steps"], group["ns_dtype"])
        rows, cols = p.shape[-2:]
        out_in = torch.Size((cols, rows) if group["layout"] == "in_out" else (rows, cols))
        p.mul_(1 - lr * group["weight_decay"])
        p.add_(update, alpha=-adjust_lr(lr, group["adjust_lr_fn"], out_in))


def newton_schulz_fp32(x: torch.Tensor, coefficients: tuple, ns_steps: int, eps: float) -> torch.Tensor:
    """torch.optim.Muon's quintic Newton-Schulz iteration (torch.optim._muon) kept in fp32 instead of bf16."""
    a, b, c = coefficients
    tall = x.size(0) > x.size(1)
    y = x.float().T if tall else x.float()
    y = y / y.norm().clamp(min=eps)
    for _ in range(ns_steps):
        gram = y @ y.T
        y = torch.addmm(y, torch.addmm(gram, gram, gram, beta=b, alpha=c), y, beta=a)
    return y.T if tall else y


def _orthogonalize_local(x: torch.Tensor, ns_steps: int, ns_dtype: str) -> torch.Tensor:
    torch_newton_schulz, _, coefficients, eps = muon_pieces()
    newton_schulz = torch_newton_schulz if ns_dtype == "bf16" else newton_schulz_fp32
    if x.ndim == 2:
        return newton_schulz(x, coefficients, ns_steps, eps)
    out = torch.empty_like(x, dtype=torch.bfloat16 if ns_dtype == "bf16" else torch.float32)
    for i in range(x.size(0)):  # each expert's matrix on its own
        out[i] = newton_schulz(x[i], coefficients, ns_steps, eps)
    return out


def orthogonalize(update: torch.Tensor, ns_steps: int, ns_dtype: str = "bf16") -> torch.Tensor:
    """Newton-Schulz of a matrix (or of each matrix of a 3-D stack). A DTensor is orthogonalised as the whole
    matrix: its local piece when that holds whole matrices (a stack sharded on dim 0), else gathered."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if not isinstance(update, DTensor):
        return _orthogonalize_local(update, ns_steps, ns_dtype)
    mesh, placements = update.device_mesh, update.placements
    if update.ndim == 3 and all(pl.is_replicate() or pl.is_shard(0) for pl in placements):
        local = _orthogonalize_local(update.to_local(), ns_steps, ns_dtype)
        return DTensor.from_local(local, mesh, placements, shape=update.shape, stride=update.stride())
    # bf16 Newton-Schulz starts by casting to bf16: casting before the gather halves the traffic, same result
    whole = (update.to(torch.bfloat16) if ns_dtype == "bf16" else update).full_tensor()
    return distribute_tensor(_orthogonalize_local(whole, ns_steps, ns_dtype), mesh, placements, src_data_rank=None)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set this step's learning rate on every parameter group (a group may scale it by its `lr_scale`)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def lr_at(step: int, max_steps: int, cfg: OptimConfig) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup, then the chosen decay."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    min_lr = cfg.lr * cfg.min_lr_ratio
    span = max(1, max_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    if cfg.schedule == "constant":
        return cfg.lr
    if cfg.schedule == "cosine":
        return min_lr + 0.5 * (cfg.lr - min_lr) * (1 + math.cos(math.pi * progress))
    if cfg.schedule == "linear":
        return cfg.lr - (cfg.lr - min_lr) * progress
    # wsd: warmup, stable at lr, then linear decay over the last decay_fraction of the steps
    decay_start = max_steps - int(cfg.decay_fraction * max_steps)
    if step < decay_start:
        return cfg.lr
    return cfg.lr - (cfg.lr - min_lr) * min(1.0, (step - decay_start) / max(1, max_steps - decay_start))


def muon_ns_dtype(optimizer: torch.optim.Optimizer) -> str | None:
    """The dtype Muon's Newton-Schulz runs in (optim.muon.ns_dtype as resolved for the device); None without Muon."""
    return next((g["ns_dtype"] for g in optimizer.param_groups if g.get("algorithm") == "muon"), None)
