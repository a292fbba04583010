"""Lay a plain Phi2 model out for training: activation checkpointing, then torch.compile, then data parallelism.

    model = Phi2(cfg)                      # the model file knows nothing about any of this
    mesh = build_mesh(train_cfg, env)      # None, 1-D (dp_shard) or 2-D (dp_replicate, dp_shard)
    train_model = parallelize(model, train_cfg, mesh)

The order matters and is torchtitan's: AC wraps each block, compile traces the wrapped block (so the
recomputation is compiled too), and FSDP2's `fully_shard` goes on last, per block and then at the root, so
every block's parameters are gathered just before it runs and freed after.

Strategies (`parallel.strategy`):
  none   one process holds everything (bf16-mixed: autocast over fp32 weights)
  ddp    DistributedDataParallel: full replicas, gradients all-reduced (small models)
  fsdp   FSDP2 over all ranks (1-D mesh): parameters, gradients and optimizer state sharded (ZeRO-3)
  hsdp   FSDP2 on a 2-D mesh (replicate, shard): sharded within a group (a node), replicated across groups
  auto   fsdp with more than one rank, none with one
Precision: bf16-mixed under FSDP is MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32) with fp32
sharded master weights; bf16-true casts the weights (and so the optimizer state) to bf16; fp32 does nothing.
"""

from __future__ import annotations

import contextlib
from functools import partial

import torch
import torch.nn as nn

from phiforge.errors import ConfigError

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


def resolve_strategy(cfg, world_size: int) -> str:
    s = cfg.parallel.strategy
    if s == "auto":
        return "fsdp" if world_size > 1 else "none"
    if s in ("ddp", "fsdp", "hsdp"):
        return s
    if world_size > 1:
        raise ConfigError(f"parallel.strategy=none runs on one process, but {world_size} were launched; "
                          "use fsdp, hsdp or ddp")
    return s


def resolve_precision(cfg, device: torch.device) -> str:
    if cfg.precision == "auto":
        return "bf16-mixed" if device.type == "cuda" else "fp32"
    return cfg.precision


def build_mesh(cfg, env):
    """The device mesh for fsdp/hsdp (None for none/ddp)."""
    from torch.distributed.device_mesh import init_device_mesh

    strategy = resolve_strategy(cfg, env.world_size)
    if strategy not in ("fsdp", "hsdp"):
        return None
    dev = env.device.type
    if strategy == "fsdp":
        return init_device_mesh(dev, (env.world_size,), mesh_dim_names=("dp_shard",))
    replicate = cfg.parallel.hsdp_replicate or env.num_nodes
    if env.world_size % replicate:
        raise ConfigError(f"parallel.hsdp_replicate={replicate} does not divide the world size {env.world_size}")
    return init_device_mesh(dev, (replicate, env.world_size // replicate),
                            mesh_dim_names=("dp_replicate", "dp_shard"))


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
    for block in model.layers:
        block.compile(backend=cfg.parallel.compile_backend, dynamic=False)


def apply_fsdp(model: nn.Module, mesh, param_dtype: torch.dtype | None, reshard_after_forward: bool) -> None:
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32) if param_dtype else None
    kw = {"mesh": mesh, **({"mp_policy": mp} if mp else {})}
    n = len(model.layers)
    for i, block in enumerate(model.layers):
        # the last block's parameters are needed again at once by the backward pass: keep them gathered
        fully_shard(block, reshard_after_forward=reshard_after_forward and i < n - 1, **kw)
    fully_shard(model, reshard_after_forward=reshard_after_forward, **kw)


def parallelize(model: nn.Module, cfg, mesh, env=None, materialize=None) -> nn.Module:
    """Apply AC -> compile -> FSDP2 in place, then `materialize(model)` (a model built on the meta device gets its
    weights here, each rank only its shards), then DDP. Returns the module to call in training: a DDP wrapper for
    ddp, otherwise `model` itself. Without `materialize` the model must already hold its weights on the device."""
    world = env.world_size if env is not None else 1
    strategy = resolve_strategy(cfg, world)
    device = env.device if env is not None else next(model.parameters()).device
    precision = resolve_precision(cfg, device)
    if precision == "bf16-true":
        model.to(torch.bfloat16)  # the RoPE tables stay fp32: they are buffers rebuilt by reset_rope
        if materialize is None:
            model.reset_rope()
    if cfg.parallel.activation_checkpointing != "none":
        apply_activation_checkpointing(model, cfg)
    if cfg.compile:
        apply_compile(model, cfg)
    if strategy in ("fsdp", "hsdp"):
        if mesh is None:
            raise ConfigError(f"parallel.strategy={strategy} needs a device mesh")
        apply_fsdp(model, mesh, torch.bfloat16 if precision == "bf16-mixed" else None,
                   cfg.parallel.reshard_after_forward)
    if materialize is not None:
        materialize(model)
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        dev = next(model.parameters()).device
        # an MoE expert that receives no token in a step has no gradient: DDP must be told to expect that
        return DDP(model, device_ids=[dev.index] if dev.type == "cuda" else None,
                   find_unused_parameters=bool(model.moe_layers()))
    return model


def autocast_for(precision: str, strategy: str, device: torch.device):
    """The autocast context the forward runs under: only bf16-mixed without FSDP (FSDP casts by its policy)."""
    if precision == "bf16-mixed" and strategy not in ("fsdp", "hsdp"):
        return lambda: torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext


def grad_sync(train_model: nn.Module, strategy: str, sync: bool, defer: bool = True):
    """Context for one micro-step's forward and backward: no gradient communication unless `sync` (the last
    micro-step). With defer=False, FSDP reduce-scatters every micro-step (sharded accumulation) and HSDP skips
    only its cross-replica all-reduce until the last one."""
    if strategy in ("fsdp", "hsdp"):
        if defer:
            train_model.set_requires_gradient_sync(sync)
        else:
            train_model.set_requires_gradient_sync(True)
            if strategy == "hsdp":
                train_model.set_requires_all_reduce(sync)
        return contextlib.nullcontext()
    if strategy == "ddp" and not sync:
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
