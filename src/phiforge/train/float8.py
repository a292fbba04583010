"""Float8 training with torchao (`float8: tensorwise | rowwise`; docs/performance.md, "Float8").

    layout = resolve_layout(cfg, env)        # layout.float8: the recipe, emulated or not, float8 all-gather or not
    parallelize(model, cfg, layout, ...)     # apply_float8 first (on the meta model), then AC, compile, FSDP2
    build_step(...)                          # + float8_step_hooks: the FSDP2 scales precomputed after each step

torchao's `convert_to_float8_training` swaps the block linears (attention qkv and dense, MLP fc1 and fc2, and
cross-attention linears) for `Float8Linear`: their three matmuls (forward, grad input, grad weight) take float8
operands with dynamic scales and accumulate in fp32. The LM head stays bf16 (its logits feed the loss; torchtitan
keeps its output layer out too), and so does every linear with a dimension that is not a multiple of 16 (the
float8 GEMM's requirement). MoE experts stay bf16: they are stacked parameters, not nn.Linear, and torchao
0.18's float8 grouped GEMM (prototype.moe_training) wants each expert's weight column-major ([E, out, in]
transposed), which our [E, in, out] layout is not, and has CUDA kernels only.

On a CPU there is no float8 matmul: the run uses torchao's emulation (the same casts and scales, the matmul
upcast to fp32), with a warning. It gives float8's numerics, not its speed: for tests.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn as nn

from phiforge.errors import ConfigError

FLOAT8_RECIPES = ("none", "tensorwise", "rowwise")
FLOAT8_PRECISIONS = ("bf16-mixed", "bf16-true")  # float8 casts from bf16 weights and activations
INSTALL_HINT = "pip install 'phiforge[float8]'"
GEMM_MULTIPLE = 16  # float8 GEMMs (torch._scaled_mm) need both dimensions of the weight to be multiples of 16


@dataclass(frozen=True)
class Float8:
    """How a run converts to float8, resolved once with the layout (resolve_float8)."""

    recipe: str  # tensorwise | rowwise (torchao's recipe names)
    emulate: bool  # no float8 matmul on this device (CPU): torchao's emulation, numerics only
    all_gather: bool  # FSDP2 all-gathers the converted weights in float8 (tensorwise under fully_shard)


def check_float8(recipe: str, precision: str, note: str = "") -> None:
    """The float8 key's value, and the precision it needs (`note`: how precision was resolved)."""
    if recipe not in FLOAT8_RECIPES:
        raise ConfigError(f"float8 must be one of {', '.join(FLOAT8_RECIPES)}, got '{recipe}'")
    if recipe != "none" and precision not in FLOAT8_PRECISIONS and precision != "auto":
        raise ConfigError(f"float8={recipe} needs precision bf16-mixed or bf16-true, got {precision}{note}")


def resolve_float8(recipe: str, precision: str, device: torch.device, fully_sharded: bool,
                   precision_note: str = "", announce: bool = False, compiled: bool = True) -> Float8 | None:
    """The run's float8 conversion (None for float8=none) on `device` under the resolved `precision`; `announce`
    (rank 0): warn that a CPU run emulates float8, or that a GPU run without compile is slow."""
    check_float8(recipe, precision, precision_note)
    if recipe == "none":
        return None
    capability = torch.cuda.get_device_capability(device) if device.type == "cuda" else None
    if capability is not None and capability < (8, 9):
        major, minor = capability
        raise ConfigError(f"float8={recipe} needs a GPU with float8 matmuls (compute capability 8.9 or newer: "
                          f"H100, H200, L40S, B200), but {device} is {major}.{minor}; use float8=none")
    _torchao_float8()  # missing: said now, before any data is read or a run directory is made
    f8 = Float8(recipe, emulate=device.type != "cuda", all_gather=fully_sharded and recipe == "tensorwise")
    if announce and (f8.emulate or not compiled):
        from phiforge.train.rundir import warn

        warn(f"float8={recipe} on {device.type}: torchao's emulation (the float8 casts and scales, each matmul "
             "upcast to fp32): float8's numerics, not its speed; GPUs of compute capability 8.9+ run it natively"
             if f8.emulate else
             f"float8={recipe} without compile: torchao's casts and scales run as separate kernels, usually slower "
             "than bf16; set compile: true (docs/performance.md, \"Float8\")")
    return f8


def float8_eligible(module: nn.Module, fqn: str) -> bool:
    """torchao's module_filter_fn: convert this linear? Not the LM head, not a linear with a dimension that is
    not a multiple of 16."""
    if not isinstance(module, nn.Linear) or fqn.rsplit(".", 1)[-1] == "lm_head":
        return False
    return module.in_features % GEMM_MULTIPLE == 0 and module.out_features % GEMM_MULTIPLE == 0


def _torchao_float8():
    try:
        import torchao.float8 as ao_float8
    except ImportError:
        raise ConfigError(f"float8 training needs torchao, which is not installed: {INSTALL_HINT}") from None
    return ao_float8


def float8_linear_config(f8: Float8):
    """torchao's Float8LinearConfig for `f8`: tensorwise (float8 all-gather under FSDP2) or the rowwise recipe."""
    ao = _torchao_float8()
    if f8.recipe == "rowwise":
        return replace(ao.Float8LinearConfig.from_recipe_name("rowwise"), emulate=f8.emulate)
    return ao.Float8LinearConfig(enable_fsdp_float8_all_gather=f8.all_gather, emulate=f8.emulate)


def apply_float8(body: nn.Module, f8: Float8) -> list[str]:
    """Swap `body`'s eligible linears for torchao's Float8Linear, in place; returns their names. Runs on the
    meta-device model before AC, compile and FSDP2 (torchtitan's order: they then wrap the converted blocks)."""
    _torchao_float8().convert_to_float8_training(body, config=float8_linear_config(f8),
                                                 module_filter_fn=float8_eligible)
    from torchao.float8.float8_linear import Float8Linear

    return [name for name, m in body.named_modules() if isinstance(m, Float8Linear)]


class Float8ScalePrecompute:
    """Step hook (TrainStep's `hooks`) for tensorwise float8 under FSDP2: after each optimizer step, one
    all-reduce computes every converted weight's scale (its global amax), so FSDP2's all-gathers send float8
    shards already scaled instead of each rank reducing per weight in the forward pass."""

    def __init__(self, model: nn.Module):
        self.model = model

    def after_step(self) -> None:
        _torchao_float8().precompute_float8_dynamic_scale_for_fsdp(self.model)

    def after_skip(self) -> None:
        """The weights did not change: their scales still hold."""


def float8_step_hooks(model: nn.Module, f8: Float8 | None) -> list:
    """The step hooks a run with `f8` needs (build_step adds them)."""
    return [Float8ScalePrecompute(model)] if f8 is not None and f8.all_gather else []
