"""Lay a plain model out for training: float8 conversion, activation checkpointing, torch.compile, then data
parallelism.

    layout = resolve_layout(train_cfg, env)   # strategy, precision policy, float8 and device mesh, resolved once
    train_model = parallelize(model, train_cfg, layout, materialize)   # the model file knows nothing of this

The order matters and is torchtitan's: float8 (`float8: tensorwise | rowwise`, train/float8.py) swaps the block
linears for torchao's Float8Linear on the meta-device model first, so everything after wraps the converted
modules; AC wraps each block, compile traces the wrapped block (so the recomputation is compiled too), and
FSDP2's `fully_shard` goes on last, per block and then at the root, so every block's parameters are gathered
just before it runs and freed after.

Strategies (`parallel.strategy`):
  none   one process holds everything
  ddp    full replicas, gradients all-reduced (small models)
  fsdp   FSDP2 over all ranks (1-D mesh): parameters, gradients and optimizer state sharded (ZeRO-3)
  hsdp   FSDP2 on a 2-D mesh (replicate, shard): sharded within a group (a node), replicated across groups
  auto   fsdp with more than one rank, none with one (the vision fine-tune: ddp)
Precision (train/precision.py): fp32 and bf16-true need no casts, so `none` is the plain module and `ddp` torch's
DistributedDataParallel. bf16-mixed casts with FSDP2's MixedPrecisionPolicy on every strategy: `none` is
fully_shard on a 1-rank mesh, `ddp` fully_shard on an (N, 1) mesh (replicas, gradients all-reduced in fp32):
the same casts in the same places as fsdp/hsdp, hence the same numerics on 1 process and on N ranks.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn as nn

from phiforge.errors import ConfigError
from phiforge.train.float8 import Float8, apply_float8, resolve_float8
from phiforge.train.precision import Precision, resolve_precision

# Ops whose outputs op-level selective checkpointing keeps: the matmuls and attention (expensive to redo);
# everything else in a block (LayerNorm, GELU, RoPE, reshapes, adds) is recomputed in the backward pass.
_SAC_SAVE_NAMES = ("mm", "addmm", "bmm", "baddbmm", "_scaled_dot_product_flash_attention",
                   "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention",
                   "_scaled_dot_product_flash_attention_for_cpu", "_grouped_mm")


def _sac_save_ops() -> set:
    ops = set()
    for name in _SAC_SAVE_NAMES:
        packet = getattr(torch.ops.aten, name, None)
        if packet is not None:
            ops.add(packet.default)
    return ops


@dataclass(frozen=True)
class Layout:
    """How a run lays its model out, resolved once (resolve_layout) and handed to everything that depends on it."""

    strategy: str  # none | ddp | fsdp | hsdp
    precision: Precision
    mesh: object | None = None  # the DeviceMesh fully_shard uses; None: no fully_shard (plain module or DDP)
    float8: Float8 | None = None  # the float8 conversion (train/float8.py); None: float8=none

    @property
    def fully_sharded(self) -> bool:
        return self.mesh is not None

    @property
    def wraps_ddp(self) -> bool:
        """torch's DistributedDataParallel holds the model (ddp without casts)."""
        return self.strategy == "ddp" and self.mesh is None


def resolve_strategy(strategy: str, world_size: int, auto_many: str = "fsdp") -> str:
    """parallel.strategy for `world_size` processes (auto: `auto_many` with several, none with one)."""
    if strategy == "auto":
        return auto_many if world_size > 1 else "none"
    if strategy == "none" and world_size > 1:
        raise ConfigError(f"parallel.strategy=none runs on one process, but {world_size} were launched; "
                          "use fsdp, hsdp or ddp")
    return strategy


def uses_fully_shard(strategy: str, precision: Precision) -> bool:
    """fsdp and hsdp always; none and ddp when the precision casts the weights (FSDP2 makes the casts)."""
    return strategy in ("fsdp", "hsdp") or precision.casts


def mesh_shape(strategy: str, world_size: int, hsdp_replicate: int, num_nodes: int) -> tuple[int, ...]:
    """The fully_shard mesh: (shard,) for fsdp and none, (replicate, shard) for hsdp and ddp."""
    if strategy in ("none", "fsdp"):
        return (world_size,)
    if strategy == "ddp":
        return (world_size, 1)
    replicate = hsdp_replicate or num_nodes
    if world_size % replicate:
        raise ConfigError(f"parallel.hsdp_replicate={replicate} does not divide the world size {world_size}")
    return (replicate, world_size // replicate)


def resolve_layout(cfg, env, auto_many: str = "fsdp") -> Layout:
    """The run's strategy, precision policy, float8 conversion and (when fully_shard is used) its device mesh."""
    strategy = resolve_strategy(cfg.parallel.strategy, env.world_size, auto_many)
    precision = resolve_precision(cfg.precision, env.device.type)
    sharded = uses_fully_shard(strategy, precision)
    note = f" (precision {cfg.precision} on {env.device.type})" if cfg.precision == "auto" else ""
    f8 = resolve_float8(cfg.float8, precision.name, env.device, sharded, note, env.is_main, cfg.compile)
    if not sharded:
        return Layout(strategy, precision, float8=f8)
    from torch.distributed.device_mesh import init_device_mesh

    shape = mesh_shape(strategy, env.world_size, cfg.parallel.hsdp_replicate, env.num_nodes)
    names = ("dp_shard",) if len(shape) == 1 else ("dp_replicate", "dp_shard")
    return Layout(strategy, precision, init_device_mesh(env.device.type, shape, mesh_dim_names=names), f8)


def _checkpointed_blocks(cfg, n_layer: int) -> list[int]:
    p = cfg.parallel
    if p.activation_checkpointing == "full":
        return list(range(n_layer))
    if p.activation_checkpointing == "selective" and p.ac_policy == "layer":
        return [i for i in range(n_layer) if i % p.ac_every == 0]
    if p.activation_checkpointing == "selective":  # op-level: every block, matmul outputs kept
        return list(range(n_layer))
    return []


def apply_activation_checkpointing(model: nn.Module, cfg) -> None:
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    p = cfg.parallel
    kwargs = {"preserve_rng_state": True}
    if p.activation_checkpointing == "selective" and p.ac_policy == "op":
        from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

        save = _sac_save_ops()

        def policy(ctx, op, *args, **kw):
            return CheckpointPolicy.MUST_SAVE if op in save else CheckpointPolicy.PREFER_RECOMPUTE

        kwargs["context_fn"] = partial(create_selective_checkpoint_contexts, policy)
    for i in _checkpointed_blocks(cfg, len(model.layers)):
        model.layers[i] = checkpoint_wrapper(model.layers[i], **kwargs)


def apply_compile(model: nn.Module, cfg) -> None:
    """torch.compile each block, whole (fullgraph: a graph break is an error, not a silent slow path). The MoE
    layers read one value on the host (dropless padded: the largest expert's count) and route with data-dependent
    shapes (loop): captured as unbacked sizes instead of breaking the graph. They also record their aux loss and
    statistics on the module: under activation checkpointing that happens in the forward pass only, not again in
    the backward's recomputation (eager checkpointing repeats it with the same values)."""
    torch._dynamo.config.capture_scalar_outputs = True
    torch._dynamo.config.capture_dynamic_output_shape_ops = True
    torch._dynamo.config.skip_fwd_side_effects_in_bwd_under_checkpoint = True
    for block in model.layers:
        block.compile(backend=cfg.parallel.compile_backend, dynamic=False, fullgraph=True)


def apply_fsdp(model: nn.Module, body: nn.Module, layout: Layout, reshard_after_forward: bool) -> None:
    from torch.distributed.fsdp import fully_shard

    n, policy = len(body.layers), layout.precision
    for i, block in enumerate(body.layers):
        # the last block's parameters are needed again at once by the backward pass: keep them gathered
        fully_shard(block, mesh=layout.mesh, reshard_after_forward=reshard_after_forward and i < n - 1,
                    mp_policy=policy.mp_policy(cast_inputs=False))
    # the root casts the model's own floating-point inputs (e.g. precomputed image features)
    fully_shard(model, mesh=layout.mesh, reshard_after_forward=reshard_after_forward, mp_policy=policy.mp_policy())


def apply_ddp(model: nn.Module) -> nn.Module:
    """DistributedDataParallel over `model`; it registers the parameters that need gradients when built (the vision
    fine-tune builds one per stage)."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    from phiforge.model.moe import MoE

    dev = next(model.parameters()).device
    # an MoE expert that receives no token in a step has no gradient: DDP must be told to expect that
    return DDP(model, device_ids=[dev.index] if dev.type == "cuda" else None,
               find_unused_parameters=any(isinstance(m, MoE) for m in model.modules()))


def parallelize(model: nn.Module, cfg, layout: Layout | None = None, materialize=None,
                body: nn.Module | None = None) -> nn.Module:
    """Apply float8 -> AC -> compile -> FSDP2 in place to the blocks of `body` (`model` itself, or the part of it
    that holds `.layers`: the vision model's LM), then `materialize(model)` (a model built on the meta device gets
    its weights here, each rank only its shards), then DDP. Returns the module to call in training: the DDP wrapper
    for ddp without casts, otherwise `model` itself. Without `materialize` the model must already hold its weights;
    without `layout`, one process with cfg's precision and float8 on the model's device."""
    body = model if body is None else body
    if layout is None:
        device = next(model.parameters()).device
        precision = resolve_precision(cfg.precision, device.type)
        layout = Layout(resolve_strategy(cfg.parallel.strategy, 1), precision,
                        float8=resolve_float8(cfg.float8, precision.name, device, fully_sharded=False))
        if layout.precision.casts:
            raise ValueError(f"precision {layout.precision.name} casts through fully_shard: pass resolve_layout()'s")
    if layout.float8 is not None:
        apply_float8(body, layout.float8)
    if layout.precision.name == "bf16-true":
        model.to(torch.bfloat16)  # the RoPE tables stay fp32: they are buffers rebuilt by reset_rope
        if materialize is None:
            body.reset_rope()
    if cfg.parallel.activation_checkpointing != "none":
        apply_activation_checkpointing(body, cfg)
    if cfg.compile:
        apply_compile(body, cfg)
    if layout.fully_sharded:
        apply_fsdp(model, body, layout, cfg.parallel.reshard_after_forward)
    if materialize is not None:
        materialize(model)
    return apply_ddp(model) if layout.wraps_ddp else model


def reshard(model: nn.Module) -> None:
    """Put every fully_shard module back on its shards. A forward without a backward (validation) leaves the
    root's and the last block's parameters gathered, and named_parameters() then gives those gathered copies:
    an optimizer built at that moment would hold tensors FSDP2 no longer updates."""
    from torch.distributed.fsdp import FSDPModule

    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


def grad_sync(train_model: nn.Module, layout: Layout, sync: bool, defer: bool = True):
    """Context for one micro-step's forward and backward: no gradient communication unless `sync` (the last
    micro-step). With defer=False, FSDP reduce-scatters every micro-step (sharded accumulation) and a 2-D mesh
    skips only its cross-replica all-reduce until the last one."""
    if layout.fully_sharded:
        if defer:
            train_model.set_requires_gradient_sync(sync)
        else:
            train_model.set_requires_gradient_sync(True)
            if layout.mesh.ndim == 2:
                train_model.set_requires_all_reduce(sync)
        return contextlib.nullcontext()
    if layout.wraps_ddp and not sync:
        return train_model.no_sync()
    return contextlib.nullcontext()


def clip_grad_norm_(params: list[torch.nn.Parameter], max_norm: float) -> torch.Tensor:
    """Global gradient norm (over all shards and ranks) and in-place clipping; returns the norm before clipping.

    With FSDP the gradients are DTensors: the norm of the local shards is a partial value, and `full_tensor()`
    reduces it over the mesh, so the clipping factor is the same on every rank and equals the 1-process one."""
    from torch.distributed.tensor import DTensor

    grads = [p.grad for p in params if p.grad is not None]
    total = torch.nn.utils.get_total_norm(grads, norm_type=2.0, foreach=None)
    if isinstance(total, DTensor):
        total = total.full_tensor()
    if max_norm and max_norm > 0:
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, total, foreach=None)
    return total
