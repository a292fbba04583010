"""How every trainer builds what it trains (`phiforge train`, `phiforge vision finetune`, `phiforge plan --measure`):

    layout = resolve_layout(cfg, env)                       # strategy, precision policy, mesh: once per run
    model, train_model = build_model(make, cfg, layout, fill)   # meta -> parallelize() -> fill
    step = build_step(model, train_model, cfg, optim_cfg, env, layout, ...)   # the optimizer, then TrainStep

The model is built on the meta device (no memory), laid out by parallelize() (activation checkpointing,
compile, FSDP2/DDP), and only then materialised, each rank filling just its own shards: from seeded generators
(phiforge.model.init: the same weights for any strategy and world size), from the `init_from` checkpoint's
safetensors (each rank reads its rows only), or (the vision fine-tune) from a model built on the host.

Host memory at start-up is therefore a rank's shard plus one block of 2^20 values being drawn, not the whole
fp32 model per rank (docs/training.md, "Start-up memory"; bench/startup_memory.py measures it).
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn

from phiforge.model_files import load_weights_, read_config, resolve_checkpoint
from phiforge.model import Phi2, Phi2Config
from phiforge.model.init import canonical_name, init_weights_, on_meta
from phiforge.train.engine import RunHooks, TrainStep
from phiforge.train.float8 import float8_step_hooks
from phiforge.train.optim import build_optimizer
from phiforge.train.parallelize import Layout, parallelize, reshard


def train_model_config(cfg) -> Phi2Config:
    """The architecture a run trains: the `init_from` checkpoint's (its config.json wins), else `model:`."""
    if cfg.init_from:
        return read_config(resolve_checkpoint(Path(cfg.init_from)))
    return cfg.model_config()


def build_model(make: Callable[[], nn.Module], cfg, layout: Layout, fill: Callable[[nn.Module], None],
                body: Callable[[nn.Module], nn.Module] = lambda m: m) -> tuple[nn.Module, nn.Module]:
    """(the model, the module to call in training): `make()` on the meta device -> parallelize() -> `fill(model)`.
    body(model): the part that holds the transformer blocks (`.layers`)."""
    with on_meta():
        model = make()
    train_model = parallelize(model, cfg, layout, materialize=fill, body=body(model))
    model.train()
    return model, train_model


def build_step(model: nn.Module, train_model: nn.Module, cfg, optim_cfg, env, layout: Layout, hooks=(),
               run_hooks: RunHooks | None = None) -> TrainStep:
    """The optimizer over `model`'s trainable parameters and the TrainStep that drives it (with `hooks` and the
    ones the layout needs: float8's scale precompute)."""
    if layout.fully_sharded:
        reshard(model)  # the optimizer must hold the sharded parameters, also after a validation
    optimizer = build_optimizer(model, optim_cfg)
    hooks = [*hooks, *float8_step_hooks(model, layout.float8)]
    return TrainStep(train_model, optimizer, env, layout, cfg.grad_accum_steps, optim_cfg.grad_clip,
                     cfg.parallel.defer_grad_sync, hooks=hooks, run_hooks=run_hooks)


# ---------------------------------------------------------------------------------------------
# Filling a model laid out on the meta device


@torch.no_grad()
def materialize(model: nn.Module, device: torch.device, seed: int, init_from: str | None = None) -> None:
    """Allocate `model`'s (possibly sharded) meta tensors on `device` and fill them."""
    model.to_empty(device=device)
    model.init_buffers()  # RoPE tables, MoE balancing biases (init_from then loads the saved biases)
    if init_from:
        load_weights_(model, resolve_checkpoint(Path(init_from)))
    else:
        init_weights_(model, seed)


@torch.no_grad()
def copy_from(source: nn.Module, model: nn.Module, device: torch.device) -> None:
    """Allocate `model`'s meta tensors on `device` and copy `source` (the same architecture, with weights, on the
    host) into them: each rank keeps its shards of every parameter, and every buffer whole."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    model.to_empty(device=device)
    set_model_state_dict(model, source.state_dict(), options=StateDictOptions(full_state_dict=True))
    buffers = dict(source.named_buffers())  # non-persistent ones too (RoPE tables, pixel statistics)
    for name, buf in model.named_buffers():
        buf.copy_(buffers[canonical_name(name)])


def build_text_model(cfg, mcfg: Phi2Config, env, layout: Layout) -> tuple[Phi2, nn.Module]:
    """The language model `phiforge train` and `plan --measure` train."""
    make = partial(Phi2, mcfg, loss_chunk_rows=cfg.loss_chunk_rows, eval_context=cfg.data.seq_len)
    fill = partial(materialize, device=env.device, seed=cfg.seed, init_from=cfg.init_from)
    return build_model(make, cfg, layout, fill)
