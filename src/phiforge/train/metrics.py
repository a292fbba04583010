"""Training metrics: FLOPs per token, MFU against a bf16 dense peak table, peak memory, perplexity, and the log
sinks.

MFU = tokens/s per device x flops_per_token / peak_flops per device, with

    flops_per_token = 6 * N_matmul + 12 * L * d * T

N_matmul = parameters taking part in matmuls per token: every parameter except the input embedding (a lookup,
not a matmul); for MoE layers only the active share top_k / num_experts of the routed experts counts. The
second term is attention's QK^T and AV (forward 2 * 2 * L * d * T per token, times 3 for forward + backward),
with T = data.seq_len and without causal-mask savings (the PaLM / nanoGPT / torchtitan convention). Phi-2 at
T = 2048: 6 * 2,648,611,840 + 12 * 32 * 2560 * 2048 = 17.90 GFLOP per token. Activation recomputation is not
counted (that is hardware FLOPs utilisation, not model FLOPs). There is no MFU on CPUs.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import torch

# bf16 dense (no sparsity) tensor-core peaks in TFLOP/s, from NVIDIA/AMD datasheets. Matched in order against
# torch.cuda.get_device_name(); the first match wins, so more specific names come first.
PEAK_BF16_TFLOPS: list[tuple[str, float | None, str]] = [
    ("GB200", 2500.0, "GB200 (per GPU)"),
    ("B200", 2250.0, "B200 SXM"),
    ("B100", 1750.0, "B100"),
    ("H200 NVL", 835.0, "H200 NVL"),
    ("H200", 989.4, "H200 SXM"),
    ("GH200", 989.4, "GH200"),
    ("H100 NVL", 835.0, "H100 NVL"),
    ("H100 PCIe", 756.0, "H100 PCIe"),
    ("H100", 989.4, "H100 SXM (e.g. 'NVIDIA H100 80GB HBM3')"),
    ("H800", 989.4, "H800 SXM"),
    ("H20", 148.0, "H20"),
    ("A100", 312.0, "A100 (SXM and PCIe)"),
    ("A800", 312.0, "A800"),
    ("L40S", 362.05, "L40S"),
    ("L40", 181.05, "L40"),
    ("L4", 121.0, "L4"),
    ("A10G", None, "A10G (no published bf16 peak)"),
    ("A10", 125.0, "A10"),
    ("A6000", 154.8, "RTX A6000"),
    ("RTX 6000 Ada", 364.2, "RTX 6000 Ada"),
    ("4090", 165.2, "GeForce RTX 4090 (fp32 accumulate)"),
    ("3090", 71.0, "GeForce RTX 3090 (fp32 accumulate)"),
    ("MI300X", 1307.4, "AMD Instinct MI300X"),
    ("MI325X", 1307.4, "AMD Instinct MI325X"),
    ("MI250X", 383.0, "AMD Instinct MI250X"),
]


def peak_flops(device: torch.device, override_tflops: float = 0.0) -> tuple[float | None, str]:
    """(peak bf16 dense FLOP/s per device, what it was matched as); (None, reason) where MFU is not defined."""
    if override_tflops and override_tflops > 0:
        return override_tflops * 1e12, "mfu_peak_tflops (config)"
    if device.type != "cuda":
        return None, f"no MFU on {device.type}"
    name = torch.cuda.get_device_name(device)
    for key, tflops, label in PEAK_BF16_TFLOPS:
        if key.lower() in name.lower():
            if tflops is None:
                break
            return tflops * 1e12, label
    return None, f"unknown GPU '{name}': set mfu_peak_tflops"


def matmul_params(model: torch.nn.Module) -> int:
    """N_matmul: parameters used in matmuls per token (no input embedding; MoE experts at top_k/E)."""
    from phiforge.model.moe import MoE

    n = 0
    seen = set()
    for mod in model.modules():
        for name, p in mod.named_parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            numel = p.numel()
            if isinstance(mod, MoE) and name in ("w1", "b1", "w2", "b2"):
                numel = numel * mod.cfg.top_k // mod.cfg.num_experts
            n += numel
    embed = getattr(model, "embed_tokens", None)
    if embed is not None:
        n -= embed.weight.numel()
    return n


def flops_per_token(n_matmul: int, n_layer: int, d_model: int, seq_len: int) -> float:
    return 6.0 * n_matmul + 12.0 * n_layer * d_model * seq_len


def rss_peak_bytes() -> int | None:
    """This process's peak resident set size (VmHWM), Linux only."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def peak_memory(device: torch.device) -> dict:
    """Peak memory as train-event fields: on GPUs, since the last reset_peak_memory (each log interval), the CUDA
    allocator's peak of allocated tensors (peak_mem_gib) and of memory reserved from the driver
    (peak_mem_reserved_gib: allocated + the allocator's cache, close to what nvidia-smi shows); on CPUs the
    process's peak RSS."""
    if device.type == "cuda":
        return {"peak_mem_gib": torch.cuda.max_memory_allocated(device) / 2**30, "peak_mem_kind": "cuda_max_allocated",
                "peak_mem_reserved_gib": torch.cuda.max_memory_reserved(device) / 2**30}
    rss = rss_peak_bytes()
    return {} if rss is None else {"peak_mem_gib": rss / 2**30, "peak_mem_kind": "rss_peak"}


def reset_peak_memory(device: torch.device) -> None:
    """Start a new CUDA peak. (A CPU's peak RSS stays the process's: resetting it would also lower the ru_maxrss
    that a parent, such as the study runner, reads for the whole run.)"""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def perplexity(loss: float) -> float:
    """exp(loss), capped at exp(50) so a diverged run logs a number, not an overflow."""
    return math.exp(min(loss, 50))


class Sinks:
    """Rank 0's metric destinations: RUN/metrics.jsonl always, TensorBoard and W&B when installed and enabled."""

    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool = True, wandb_project: str | None = None,
                 config: dict | None = None):
        self.enabled = enabled
        if enabled:
            Path(run_dir).mkdir(parents=True, exist_ok=True)
        self.file = open(Path(run_dir) / "metrics.jsonl", "a", encoding="utf-8") if enabled else None
        self.tb = self.wandb = None
        if not enabled:
            return
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(Path(run_dir) / "tensorboard"))
            except ImportError:  # the tensorboard package is an extra: pip install phiforge[tensorboard]
                self.tb = None
        if wandb_project:
            try:
                import wandb
            except ImportError:
                print("phiforge: wandb_project is set but wandb is not installed; not logging to W&B",
                      file=sys.stderr)
            else:
                self.wandb = wandb.init(project=wandb_project, dir=str(run_dir), config=config or {},
                                        name=Path(run_dir).name, resume="allow")

    def write(self, **record) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        step = record.get("step")
        scalars = {k: v for k, v in record.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
                   and k != "step" and math.isfinite(v)}
        event = record.get("event", "log")
        if self.tb is not None and step is not None and event in ("train", "eval"):
            for k, v in scalars.items():
                self.tb.add_scalar(f"{event}/{k}", v, step)
        if self.wandb is not None and step is not None and event in ("train", "eval"):
            self.wandb.log({f"{event}/{k}": v for k, v in scalars.items()}, step=step)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None
        if self.tb is not None:
            self.tb.close()
            self.tb = None
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None
