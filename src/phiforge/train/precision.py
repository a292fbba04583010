"""The precision policy: one object, resolved once per run, that every strategy follows (docs/training.md,
"Precision").

    precision    weights in the forward/backward   master weights + optimizer state   gradient reduce
    fp32         fp32                              fp32                               fp32
    bf16-mixed   bf16 copies                       fp32                               fp32
    bf16-true    bf16                              bf16                               bf16

bf16-mixed makes its bf16 copies with FSDP2's MixedPrecisionPolicy on every strategy: `none` runs fully_shard
on a 1-rank mesh and `ddp` on an (N, 1) mesh (replicas whose gradients are all-reduced in fp32), so one process
and N ranks run the same ops in the same dtypes. There is no autocast anywhere. The model keeps three fp32
islands itself: RoPE (model/phi2.py apply_rope), the loss (logits upcast) and the MoE router; every other op
runs in the weights' dtype, LayerNorm and SDPA with their statistics and softmax in fp32 inside the kernel.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

PRECISIONS = ("fp32", "bf16-mixed", "bf16-true")
# which dtype each op class computes in: "param" = the weights' dtype in the forward (Precision.param)
OP_CLASSES = {
    "matmul": "param",  # Linear, MoE experts, the LM head (fp32 accumulation inside the kernel)
    "layer_norm": "param",  # in and out; mean and variance in fp32 inside the kernel
    "attention": "param",  # SDPA in and out; the softmax in fp32 inside the kernel
    "residual": "param",  # the residual stream and GELU
    "rope": "fp32",  # q and k rotated in fp32 against fp32 tables, then cast back
    "loss": "fp32",  # the logits upcast before log-softmax
    "router": "fp32",  # MoE routing scores
}


@dataclass(frozen=True)
class Precision:
    name: str
    param: torch.dtype  # the weights the forward and backward compute with
    master: torch.dtype  # the weights the optimizer updates, and its state
    reduce: torch.dtype  # gradients as they are reduced across ranks

    @property
    def casts(self) -> bool:
        """The forward runs on copies of the weights in another dtype (made by FSDP2 on every strategy)."""
        return self.param != self.master

    def mp_policy(self, cast_inputs: bool = True):
        """FSDP2's MixedPrecisionPolicy for this precision. cast_inputs=False leaves a module's floating-point
        inputs as they come (a block's: the residual stream, already in the compute dtype, and the fp32 RoPE
        tables, which FSDP2 would otherwise round to bf16)."""
        from torch.distributed.fsdp import MixedPrecisionPolicy

        if not self.casts:
            return MixedPrecisionPolicy()
        return MixedPrecisionPolicy(param_dtype=self.param, reduce_dtype=self.reduce, cast_forward_inputs=cast_inputs)

    def op_dtypes(self) -> dict[str, torch.dtype]:
        """The dtype each op class of OP_CLASSES computes in."""
        return {op: self.param if rule == "param" else torch.float32 for op, rule in OP_CLASSES.items()}


POLICIES = {
    "fp32": Precision("fp32", torch.float32, torch.float32, torch.float32),
    "bf16-mixed": Precision("bf16-mixed", torch.bfloat16, torch.float32, torch.float32),
    "bf16-true": Precision("bf16-true", torch.bfloat16, torch.bfloat16, torch.bfloat16),
}


def resolve_precision(name: str, device_type: str) -> Precision:
    """The policy for config value `name` (auto: bf16-mixed on GPUs, fp32 on CPUs)."""
    if name == "auto":
        name = "bf16-mixed" if device_type == "cuda" else "fp32"
    return POLICIES[name]


# ---------------------------------------------------------------------------------------------
# What the device does natively


def cpu_flags() -> set[str]:
    """The CPU feature flags Linux reports (x86 `flags`, Arm `Features`); empty elsewhere."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return set(value.split())
    return set()


def cpu_model() -> str:
    """The CPU's model name (for benchmark records and the figures in docs/)."""
    import platform

    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines():
            if line.split(":")[0].strip() == "model name":
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")  # x86 AVX512-BF16 / AMX, Arm BF16


def native_bf16(device_type: str) -> bool:
    """bf16 matmuls run natively: every CUDA GPU phiforge targets; a CPU only with AVX512-BF16, AMX or Arm's
    BF16 extension (elsewhere, e.g. AVX2-only CPUs, a bf16 matmul is emulated and ~17x slower than fp32)."""
    if device_type == "cuda":
        return True
    return any(f in cpu_flags() for f in NATIVE_BF16_FLAGS)


def resolve_ns_dtype(ns_dtype: str, device_type: str) -> str:
    """optim.muon.ns_dtype: auto is bf16 where bf16 is native (native_bf16), fp32 elsewhere."""
    if ns_dtype == "auto":
        return "bf16" if native_bf16(device_type) else "fp32"
    return ns_dtype


def configure_cuda() -> None:
    """Device defaults of a CUDA run, set once before the model is built: TF32 for the matmuls that stay in fp32
    (all of them with precision=fp32; the MoE router under bf16). set_float32_matmul_precision
    is torch's API for it: in torch 2.14 it sets torch.backends.cuda.matmul.fp32_precision to "tf32", and unlike
    that setter alone it keeps torch.get_float32_matmul_precision() (read by inductor's GEMM autotuning) valid."""
    torch.set_float32_matmul_precision("high")
    torch.backends.cudnn.allow_tf32 = True
