"""`phiforge plan`: predict per-device training memory, and the largest micro-batch that fits.

The model (dense Phi-2 blocks; bytes per device, P = parameters, S = FSDP shard degree, BT = tokens per
micro-batch, d = n_embd, V = vocab_size, c = compute bytes (2 for bf16, 4 for fp32), m = master bytes
(4 for fp32 and bf16-mixed, 2 for bf16-true)):

  parameters     P * m / S                      (fp32 master weights; sharded under fsdp/hsdp)
  optimizer      2 * P * m / S                  (AdamW exp_avg and exp_avg_sq, same dtype as the weights)
                 optim.name=muon: (2 * (P - M) + M) * m / S, M = the Muon matrices' parameters (one momentum)
  muon step      n * (2 r c + 2 k^2) + 4 r c / S (transient, largest Muon matrix r x c, k = min(r, c), n = 2
                 for bf16 Newton-Schulz, 4 for fp32: the gathered matrix, its Gram matrices and the result)
  gradients      P * m / S                      (exist from the backward pass to the optimizer step)
  ddp buckets    P * m                          (DDP only: the all-reduce buffers)
  fsdp buffers   (root + 2 blocks) * c          (gathered bf16 parameters of the block in use + the prefetched
                 + 1 block * (c + 4)             one, the root's embedding/head, and one block's unsharded grads;
                                                 fsdp, hsdp, and none/ddp under bf16-mixed, which FSDP2 casts on a
                                                 1-rank or (N, 1) mesh: S = 1 for those two)
  fsdp accum     P * 4                          (grad_accum_steps > 1 with defer_grad_sync: unsharded fp32
                                                 gradients kept between micro-steps, no communication)
  activations    BT * L * a + BT * head         (what autograd keeps for the backward pass)
  head           BT * (2 * d * c + 4 * V) saved, + BT * 4 * V transient in fp32 (logsumexp's temporary: the
                 loss's backward writes the logits' gradient into the fp32 logits themselves, model/fused.py),
                 BT * 8 * V in bf16 (measured; the bf16 logits and their bf16 gradient add to it)

Activation bytes per token and layer, counted from this implementation (tests/test_engine_plan.py checks the
counts against measured peaks): a block keeps its input (d), the LayerNorm output (d), the qkv output (3d), the
rotated q and k (2d), the attention output (d) and its [B, T, d] copy (d), fc1's output (4d) and GELU's (4d):
17 d values, each in the compute dtype (the residual stream included: no autocast, train/precision.py).
Checkpointing keeps less:
  full                 the block input only (d), plus one block's full set while it is recomputed
  selective, layer     full for every ac_every-th block, none for the others
  selective, op        the input + the outputs of the matmuls and attention (qkv 3d, attention d, dense d,
                       fc1 4d, fc2 d): 11 d, plus one block's remainder while it is recomputed

Float8 (`float8: tensorwise | rowwise`, train/float8.py), F = the weights float8 converts per block, (i, o) the
in and out features of the largest converted linear:
  activations    unchanged: torchao's Float8Linear saves its bf16 input and weight for the backward pass, as
                 nn.Linear does, and casts them to float8 again there (eager; under compile inductor may save
                 the float8 casts instead, which would only lower the peak)
  fsdp buffers   - 3 F (c - 1)      tensorwise under fully_shard: the gathered blocks hold their converted
                                    weights in float8 (1 byte), not bf16 (FSDP2's float8 all-gather)
  float8 casts   BT (2 i + 2 o) + 2 i o   transient, in a block's backward: the float8 copies of its input,
                                    gradient and weight (one byte each), in the two layouts the grad-input and
                                    grad-weight GEMMs take; the scales are one fp32 per tensor (tensorwise) or
                                    per row (rowwise), negligible beside them

Muon's communication under fsdp/hsdp (reported, not part of the memory): every step each rank all-gathers
every 2-D Muon matrix's update (n bytes per value; expert stacks sharded on the expert dimension need none)
and runs Newton-Schulz on the whole matrix, ns_steps * (4 k^2 l + 2 k^3) FLOPs (l = max(r, c)), redundantly
on every rank of the shard group.

Peak = max(forward end + head transient, end of backward / optimizer step): the first wins with long
sequences and large vocabularies, the second (all gradients plus optimizer state) with small batches.
MoE layers' routed activations are not modelled. The largest micro-batch is the largest B whose peak fits
in gpu_mem minus a reserve (the CUDA context, NCCL buffers and allocator fragmentation: 10% + 1 GiB).

On a CPU the prediction is compared with the peak of live tensor bytes that torch's CPU allocator reports to
the profiler (`measure_cpu_peak`): the CPU analogue of torch.cuda.max_memory_allocated. Process RSS would
add the Python interpreter, libraries and the allocator's cached pages, which are not training state.
"""

from __future__ import annotations

import json
import os
import socket
import tempfile
from dataclasses import dataclass, field, replace

import torch

from phiforge.errors import ConfigError
from phiforge.model import Phi2Config, count_params_meta
from phiforge.model.init import BLOCK_VALUES
from phiforge.train.config import TrainConfig
from phiforge.train.engine import Job
from phiforge.train.float8 import check_float8
from phiforge.train.parallelize import mesh_shape, resolve_strategy, uses_fully_shard
from phiforge.train.precision import Precision, resolve_ns_dtype, resolve_precision

GiB = 2**30


@dataclass
class MemoryPlan:
    strategy: str
    precision: str
    world_size: int
    shard: int
    micro_batch_size: int
    seq_len: int
    activation_checkpointing: str
    params: int
    components: dict = field(default_factory=dict)  # bytes
    peak_bytes: float = 0.0
    peak_phase: str = ""
    muon: dict = field(default_factory=dict)  # optim.name=muon: matrices, step traffic and FLOPs per device
    float8: dict = field(default_factory=dict)  # float8 != none: what it converts and what it changes
    startup: dict = field(default_factory=dict)  # bytes per rank once the weights are materialised

    def to_dict(self) -> dict:
        d = dict(self.__dict__)
        d["peak_gib"] = self.peak_bytes / GiB
        d["components_gib"] = {k: v / GiB for k, v in self.components.items()}
        d["startup_gib"] = {k: v / GiB for k, v in self.startup.items()}
        return d


_COUNTS: dict[str, int] = {}


def _param_counts(mcfg: Phi2Config) -> dict:
    d, V, L = mcfg.n_embd, mcfg.vocab_size, mcfg.n_layer
    key = json.dumps(mcfg.to_dict(), sort_keys=True, default=str)
    if key not in _COUNTS:  # building even a meta model is slow enough to matter in max_micro_batch's search
        _COUNTS[key] = count_params_meta(mcfg)[0]
    total = _COUNTS[key]
    embed = V * d
    head = V * d + V + 2 * d  # lm_head (+ bias) and the final LayerNorm
    block = (total - embed - head) // max(1, L)
    return {"total": total, "embed": embed, "root": embed + head, "block": block}


_MUON_SHAPES: dict[str, list] = {}


def _muon_shapes(mcfg: Phi2Config) -> list[tuple[int, ...]]:
    """Shapes of the parameters Muon updates (train/optim.py's split), from a meta model."""
    from phiforge.model import Phi2
    from phiforge.model.init import on_meta
    from phiforge.train.optim import MUON_ROLES, param_roles

    key = json.dumps(mcfg.to_dict(), sort_keys=True, default=str)
    if key not in _MUON_SHAPES:
        with on_meta():
            model = Phi2(mcfg)
        roles = param_roles(model)
        _MUON_SHAPES[key] = [tuple(p.shape) for n, p in model.named_parameters() if roles[n] in MUON_ROLES]
    return _MUON_SHAPES[key]


def muon_costs(cfg: TrainConfig, shard: int, device_type: str = "cuda") -> dict:
    """Muon per device and step: its parameters, the bytes each rank receives in its all-gathers (fsdp/hsdp),
    Newton-Schulz FLOPs, and the transient bytes of the largest matrix's orthogonalisation."""
    shapes = _muon_shapes(cfg.model_config())
    n = 2 if resolve_ns_dtype(cfg.optim.muon.ns_dtype, device_type) == "bf16" else 4
    params = gathered = flops = transient = 0
    for shape in shapes:
        r, c = shape[-2:]
        k, l = min(r, c), max(r, c)
        stacked = shape[0] if len(shape) == 3 else 1
        local = stacked if len(shape) == 2 or shard == 1 else -(-stacked // shard)  # experts per rank
        params += stacked * r * c
        if len(shape) == 2 and shard > 1:
            gathered += n * r * c * (shard - 1) / shard
        flops += local * cfg.optim.muon.ns_steps * (4 * k * k * l + 2 * k ** 3)
        step = n * (2 * r * c + 2 * k * k) + 4 * r * c * (local if len(shape) == 3 else 1 / shard)
        transient = max(transient, step + (n * local * r * c if len(shape) == 3 else 0))
    return {"params": params, "gathered_bytes": gathered, "ns_flops": flops, "transient_bytes": transient}


_FLOAT8_SHAPES: dict[str, list] = {}


def float8_linear_shapes(mcfg: Phi2Config) -> list[tuple[int, int]]:
    """(in_features, out_features) of every linear float8 converts (train/float8.py's float8_eligible), from a
    meta model."""
    from phiforge.model import Phi2
    from phiforge.model.init import on_meta
    from phiforge.train.float8 import float8_eligible

    key = json.dumps(mcfg.to_dict(), sort_keys=True, default=str)
    if key not in _FLOAT8_SHAPES:
        with on_meta():
            model = Phi2(mcfg)
        _FLOAT8_SHAPES[key] = [(m.in_features, m.out_features) for name, m in model.named_modules()
                               if float8_eligible(m, name)]
    return _FLOAT8_SHAPES[key]


def float8_costs(cfg: TrainConfig, precision: Precision, fully_shard: bool, tokens: int) -> dict:
    """What float8 changes per device ({} for float8=none): the weights it converts, the FSDP2 buffer bytes its
    float8 all-gather saves, and the transient bytes of one linear's float8 casts in the backward pass."""
    check_float8(cfg.float8, precision.name)
    if cfg.float8 == "none":
        return {}
    mcfg = cfg.model_config()
    shapes = float8_linear_shapes(mcfg)
    per_block = sum(i * o for i, o in shapes) / mcfg.n_layer
    all_gather = fully_shard and cfg.float8 == "tensorwise"
    saving = 3 * per_block * (precision.param.itemsize - 1) if all_gather else 0.0
    casts = max((tokens * (2 * i + 2 * o) + 2 * i * o for i, o in shapes), default=0)
    return {"recipe": cfg.float8, "linears": len(shapes), "params": sum(i * o for i, o in shapes),
            "all_gather": all_gather, "gather_saving_bytes": saving, "cast_transient_bytes": casts}


def activation_bytes_per_token(mcfg: Phi2Config, precision: str, ac: str, ac_policy: str,
                               ac_every: int) -> tuple[float, float]:
    """(bytes kept per token for all blocks at the end of the forward pass, extra transient bytes per token)."""
    d, L = mcfg.n_embd, mcfg.n_layer
    c = 4 if precision == "fp32" else 2
    full = 17 * d * c
    inp = c * d  # the residual stream (block input), in the compute dtype
    if ac == "none":
        return L * full, 0.0
    if ac == "full":
        return L * inp, full
    if ac_policy == "layer":
        n_ck = len(range(0, L, ac_every))
        return n_ck * inp + (L - n_ck) * full, full
    op = inp + 10 * d * c  # qkv, attention, dense, fc1, fc2 outputs
    return L * op, full - op


def plan_layout(cfg: TrainConfig, n_gpus: int, gpus_per_node: int, device_type: str) -> tuple[str, Precision, int]:
    """(strategy, precision policy, FSDP shard degree) that a run of cfg on n_gpus resolves (train/parallelize.py)."""
    strategy = resolve_strategy(cfg.parallel.strategy, n_gpus)
    precision = resolve_precision(cfg.precision, device_type)
    if not uses_fully_shard(strategy, precision):
        return strategy, precision, 1
    if strategy == "hsdp" and not cfg.parallel.hsdp_replicate and n_gpus > gpus_per_node and n_gpus % gpus_per_node:
        # one replica per node needs whole nodes (torchrun starts as many processes on every node)
        raise ConfigError(f"hsdp over {n_gpus} GPUs at {gpus_per_node} per node is not a whole number of nodes; "
                          f"use a multiple of {gpus_per_node} GPUs, --gpus-per-node, or set parallel.hsdp_replicate")
    shape = mesh_shape(strategy, n_gpus, cfg.parallel.hsdp_replicate, max(1, n_gpus // gpus_per_node))
    return strategy, precision, shape[-1]


def plan_memory(cfg: TrainConfig, n_gpus: int, gpus_per_node: int = 8, device_type: str = "cuda",
                micro_batch_size: int | None = None) -> MemoryPlan:
    strategy, precision, shard = plan_layout(cfg, n_gpus, gpus_per_node, device_type)
    B = micro_batch_size or cfg.micro_batch_size
    counts = _param_counts(cfg.model_config())
    muon = muon_costs(cfg, shard, device_type) if cfg.optim.name == "muon" else {}
    comp, grads = state_bytes(cfg, strategy, precision, shard, counts, muon.get("params", 0))
    mcfg, BT = cfg.model_config(), B * cfg.data.seq_len
    f8 = float8_costs(cfg, precision, uses_fully_shard(strategy, precision), BT)
    if f8.get("all_gather"):
        comp["fsdp_buffers"] -= f8["gather_saving_bytes"]
    c = precision.param.itemsize
    kept, transient = activation_bytes_per_token(mcfg, precision.name, cfg.parallel.activation_checkpointing,
                                                 cfg.parallel.ac_policy, cfg.parallel.ac_every)
    comp["activations"] = BT * kept
    comp["head_activations"] = BT * (2 * mcfg.n_embd * c + 4 * mcfg.vocab_size)
    head_transient = BT * (4 if c == 4 else 8) * mcfg.vocab_size
    # later micro-steps of an accumulated step run with the (sharded, or DDP/none: full) gradients alive
    accum_grads = grads if cfg.grad_accum_steps > 1 and "fsdp_accumulated_grads" not in comp else 0
    block_transient = BT * transient + f8.get("cast_transient_bytes", 0)  # in a block's backward
    fwd = sum(comp.values()) + accum_grads + max(head_transient, block_transient)
    # end of the backward pass: every gradient exists, activations are gone (the optimizer step adds at most a
    # weight-sized temporary on CPU; fused AdamW on GPUs adds none)
    static = sum(comp.get(k, 0) for k in ("parameters", "optimizer", "ddp_buckets", "fsdp_buffers",
                                            "fsdp_accumulated_grads"))
    m = precision.master.itemsize
    step_transient = max(2 * counts["embed"] * m if device_type == "cpu" else 0, muon.get("transient_bytes", 0))
    bwd = static + grads + step_transient
    comp["gradients (at the step)"] = grads
    comp["transient (loss grad / recompute)"] = max(head_transient, block_transient)
    if muon:
        comp["muon step transient"] = muon["transient_bytes"]
    plan = MemoryPlan(strategy, precision.name, n_gpus, shard, B, cfg.data.seq_len,
                      cfg.parallel.activation_checkpointing, counts["total"], comp, muon=muon, float8=f8,
                      startup=startup_bytes(cfg, counts, m, shard))
    plan.peak_bytes, plan.peak_phase = (fwd, "forward end + loss gradient") if fwd >= bwd else \
        (bwd, "end of backward + optimizer step")
    return plan


def state_bytes(cfg: TrainConfig, strategy: str, precision: Precision, shard: int, counts: dict,
                muon_params: int) -> tuple[dict, float]:
    """({parameters, optimizer state and the layout's buffers: bytes}, gradient bytes) per device."""
    P, m, c = counts["total"], precision.master.itemsize, precision.param.itemsize
    comp = {"parameters": P * m / shard, "optimizer": (2 * P - muon_params) * m / shard}
    if uses_fully_shard(strategy, precision):
        # gathered root + current and prefetched block (+ the last block, kept gathered), one block's grads
        comp["fsdp_buffers"] = (counts["root"] + 2 * counts["block"]) * c + counts["block"] * (c + 4)
        if cfg.grad_accum_steps > 1 and cfg.parallel.defer_grad_sync:
            # FSDP2 accumulates unsynced gradients unsharded, upcast to the reduce dtype
            comp["fsdp_accumulated_grads"] = P * precision.reduce.itemsize
    elif strategy == "ddp":
        comp["ddp_buckets"] = P * m
    return comp, P * m / shard


def startup_bytes(cfg: TrainConfig, counts: dict, m: int, shard: int) -> dict:
    """Memory per rank once the model is materialised (train/build.py): the parameter shard on the device; on
    the host, beyond Python and torch, one block of values being drawn, or with init_from the largest tensor's
    rows being copied (the embedding or the head, whichever this rank's slice of it is)."""
    host = BLOCK_VALUES * 4 if not cfg.init_from else counts["embed"] * 4 / shard
    return {"device": counts["total"] * m / shard, "host": host}


def usable_bytes(gpu_mem_gib: float) -> float:
    return gpu_mem_gib * GiB * 0.9 - 1 * GiB


def max_micro_batch(cfg: TrainConfig, n_gpus: int, gpu_mem_gib: float, gpus_per_node: int = 8,
                    limit: int = 4096) -> int:
    """Largest micro-batch whose predicted peak fits (0 if not even 1 does)."""
    budget = usable_bytes(gpu_mem_gib)
    best, lo, hi = 0, 1, limit
    while lo <= hi:  # peak is increasing in B
        mid = (lo + hi) // 2
        if plan_memory(cfg, n_gpus, gpus_per_node, micro_batch_size=mid).peak_bytes <= budget:
            best, lo = mid, mid + 1
        else:
            hi = mid - 1
    return best


def format_bytes(n: float) -> str:
    """A size in the largest binary unit that keeps it at 1 or more, e.g. '  312.50 KiB', '   12.03 GiB'."""
    for unit, size in (("GiB", GiB), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:8.2f} {unit}"
    return f"{n:8.0f} B  "


def format_plan(cfg: TrainConfig, n_gpus: int, gpu_mem_gib: float, gpus_per_node: int = 8) -> str:
    plan = plan_memory(cfg, n_gpus, gpus_per_node)
    best = max_micro_batch(cfg, n_gpus, gpu_mem_gib, gpus_per_node)
    mcfg = cfg.model_config()
    lines = [f"model: {plan.params:,} parameters, {mcfg.n_layer} layers, d={mcfg.n_embd}, vocab {mcfg.vocab_size}; "
             f"seq_len {plan.seq_len}",
             f"layout: {plan.strategy} on {n_gpus} GPU(s) (shard degree {plan.shard}), precision {plan.precision}, "
             f"activation checkpointing {plan.activation_checkpointing}"
             + (f" ({cfg.parallel.ac_policy})" if plan.activation_checkpointing == "selective" else ""),
             f"per-GPU memory at micro_batch_size={plan.micro_batch_size}:"]
    for k, v in plan.components.items():
        lines.append(f"  {k:<36} {format_bytes(v)}")
    lines.append(f"  {'predicted peak':<36} {format_bytes(plan.peak_bytes)}   (at the {plan.peak_phase})")
    dev, host = (format_bytes(plan.startup[k]).strip() for k in ("device", "host"))
    lines.append(f"at start-up, per rank (built on the meta device, each rank fills only its shard): device {dev}, "
                 f"host {host} beyond what Python and torch take (~0.7 GB)")
    fits = plan.peak_bytes <= usable_bytes(gpu_mem_gib)
    lines.append(f"{'fits' if fits else 'does NOT fit'} in {gpu_mem_gib:g} GiB (usable {usable_bytes(gpu_mem_gib) / GiB:.1f} "
                 f"GiB after the reserve); largest micro_batch_size that fits: {best}{'+' if best == 4096 else ''}")
    if best == 0:
        lines.append("  not even 1 fits: use more GPUs with fsdp, activation_checkpointing=full, or a shorter seq_len")
    if plan.float8:
        lines.append(float8_line(plan.float8))
    if plan.muon:
        lines += muon_lines(cfg, plan)
    return "\n".join(lines)


def float8_line(f8: dict) -> str:
    """What float8 converts and what it changes in the plan above."""
    gather = (f"FSDP2 all-gathers them in float8 ({format_bytes(f8['gather_saving_bytes']).strip()} less in the "
              "gathered blocks)" if f8["all_gather"] else "no float8 all-gather")
    return (f"float8 ({f8['recipe']}): {f8['linears']} block linears, {f8['params']:,} weights (the LM head and "
            f"MoE experts stay bf16); {gather}; their casts add "
            f"{format_bytes(f8['cast_transient_bytes']).strip()} in a block's backward; activations unchanged")


def muon_lines(cfg: TrainConfig, plan: MemoryPlan) -> list[str]:
    """What Muon costs per optimizer step and device, beside FSDP's own traffic for comparison."""
    mu, S = plan.muon, plan.shard
    lines = [f"muon: {mu['params']:,} matrix parameters ({mu['params'] / plan.params:.0%}); one momentum buffer "
             f"instead of AdamW's two; Newton-Schulz {mu['ns_flops'] / 1e12:.3f} TFLOP per step per GPU"]
    if S > 1:
        c = 4 if plan.precision == "fp32" else 2
        reduce = 4 if plan.precision in ("fp32", "bf16-mixed") else 2
        gathers = 2 if cfg.parallel.reshard_after_forward else 1
        fsdp = (gathers * c + reduce) * plan.params * (S - 1) / S
        ns = resolve_ns_dtype(cfg.optim.muon.ns_dtype, "cuda")
        lines.append(f"  every rank all-gathers each 2-D matrix's update ({ns}): "
                     f"{format_bytes(mu['gathered_bytes']).strip()} received per step per GPU, against "
                     f"{format_bytes(fsdp).strip()} for FSDP's parameter gathers and gradient reduce-scatter per "
                     "micro-step; every rank of the shard group orthogonalises every matrix")
    return lines


# ---------------------------------------------------------------------------------------------
# Measurement on CPU


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _measure_worker() -> None:
    """Entry point of one measuring process (see measure_cpu_peak); arguments come in PHIFORGE_MEASURE."""
    from phiforge.config import from_dict

    args = json.loads(os.environ["PHIFORGE_MEASURE"])
    torch.set_num_threads(1)
    peak = measure_peak_in_process(from_dict(TrainConfig, args["cfg"]), args["steps"])
    with open(f"{args['out']}.{os.environ['RANK']}", "w") as f:
        json.dump({"peak": peak}, f)


class _RandomTokens(Job):
    """The Job `plan --measure` runs: random tokens on `device`, a constant lr, no validation and no checkpoints."""

    def __init__(self, cfg: TrainConfig, vocab: int, rank: int, world: int, device: torch.device | str = "cpu"):
        self.cfg, self.vocab, self.device = cfg, vocab, device
        self.units_per_step = cfg.micro_batch_size * cfg.data.seq_len * cfg.grad_accum_steps * world
        self.gen = torch.Generator().manual_seed(rank)

    def next_batch(self):
        x = torch.randint(0, self.vocab, (self.cfg.micro_batch_size, self.cfg.data.seq_len), generator=self.gen)
        x = x.to(self.device)
        return x, x

    def loss(self, model, batch):
        return model(*batch)

    def lr(self, step: int) -> float:
        return self.cfg.optim.lr


def measure_peak_in_process(cfg: TrainConfig, steps: int) -> int:
    """Peak live tensor bytes of `steps` steps of the training engine itself (the trainers' build path and step),
    in this process's world (one, or this rank of a torchrun launch), on cfg.device: on CUDA the allocator's
    max_memory_allocated over the steps run directly (the Loop restarts CUDA's peak at each log line), on a
    CPU the profiler's count of live tensor bytes over the Loop (with its cadence)."""
    from torch.profiler import ProfilerActivity, profile

    from phiforge.train.build import build_step, build_text_model
    from phiforge.train.distributed import init_distributed, shutdown
    from phiforge.train.engine import Cadence, Loop, StopRequest
    from phiforge.train.metrics import Sinks
    from phiforge.train.parallelize import resolve_layout

    env = init_distributed(cfg.device, cfg.parallel.collective_timeout_s)
    try:
        layout = resolve_layout(cfg, env)
        if env.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(env.device)
            model, train_model = build_text_model(cfg, cfg.model_config(), env, layout)
            step = build_step(model, train_model, cfg, cfg.optim, env, layout)
            job = _RandomTokens(cfg, model.cfg.vocab_size, env.rank, env.world_size, env.device)
            for s in range(1, steps + 1):
                step(s, job, False)
            return torch.cuda.max_memory_allocated(env.device)
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=False) as prof:
            model, train_model = build_text_model(cfg, cfg.model_config(), env, layout)
            step = build_step(model, train_model, cfg, cfg.optim, env, layout)
            cadence = Cadence(log_interval=steps, eval_interval=steps, save_interval=0, progress_bar=False)
            loop = Loop(env, cadence, Sinks(None, enabled=False), StopRequest())
            loop.run(_RandomTokens(cfg, model.cfg.vocab_size, env.rank, env.world_size), step, 0, steps)
        return profiled_peak(prof)
    finally:
        shutdown(env)


def profiled_peak(prof) -> int:
    """The peak of live CPU tensor bytes a torch.profiler session (profile_memory=True) saw."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f)["traceEvents"]
    mem = sorted((e for e in events if e.get("name") == "[memory]" and e.get("args", {}).get("Device Type") == 0),
                 key=lambda e: e["ts"])
    if not mem:
        return 0
    base = mem[0]["args"]["Total Allocated"] - mem[0]["args"]["Bytes"]  # counted before this session
    return max(e["args"]["Total Allocated"] for e in mem) - base


def measure_cpu_peak(cfg: TrainConfig, world_size: int = 1, steps: int = 3, timeout: float = 600) -> list[int]:
    """Peak live tensor bytes per rank over `steps` training steps on CPU (gloo, random tokens), each rank in a
    fresh process (the allocator's profiling counters are per process)."""
    import subprocess
    import sys

    from phiforge.config import to_dict

    cfg = replace(cfg, device="cpu")
    port = _free_port()
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "peak")
        arg = json.dumps({"cfg": to_dict(cfg), "steps": steps, "out": out})
        procs = []
        for r in range(world_size):
            env = {**os.environ, "PHIFORGE_MEASURE": arg, "OMP_NUM_THREADS": "1"}
            if world_size > 1:
                env.update(RANK=str(r), WORLD_SIZE=str(world_size), LOCAL_RANK=str(r),
                           LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
            else:
                for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
                    env.pop(k, None)
                env["RANK"] = "0"  # names the output file; without WORLD_SIZE it is not a launch
            procs.append(subprocess.Popen([sys.executable, "-c",
                                           "from phiforge.train.plan import _measure_worker; _measure_worker()"],
                                          env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
        errors = []
        for p in procs:
            _, err = p.communicate(timeout=timeout)
            if p.returncode:
                errors.append(err.decode(errors="replace").strip().splitlines()[-1:] or ["?"])
        if errors:
            raise RuntimeError(f"memory measurement failed: {errors[0][0]}")
        peaks = []
        for r in range(world_size):
            with open(f"{out}.{r}") as f:
                peaks.append(int(json.load(f)["peak"]))
    return peaks


def cpu_plan(cfg: TrainConfig, world_size: int = 1) -> MemoryPlan:
    """The prediction for a CPU run of `cfg` on world_size processes (what measure_cpu_peak measures)."""
    return plan_memory(replace(cfg, device="cpu"), world_size, gpus_per_node=world_size, device_type="cpu")

