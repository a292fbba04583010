"""The training engine's model construction: built on the meta device (no memory), laid out by parallelize()
(activation checkpointing, compile, FSDP2), and only then materialised, each rank filling just its own shards:
from seeded generators (phiforge.model.init: the same weights for any strategy and world size) or from the
`init_from` checkpoint's safetensors (each rank reads its rows only).

Host memory at start-up is therefore a rank's shard plus one block of 2^20 values being drawn, not the whole
fp32 model per rank (docs/training.md, "Start-up memory"; bench/startup_memory.py measures it).
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import torch
import torch.nn as nn

from phiforge.model_files import load_weights_, read_config, resolve_checkpoint
from phiforge.model import Phi2, Phi2Config
from phiforge.model.init import init_weights_, on_meta


def train_model_config(cfg) -> Phi2Config:
    """The architecture a run trains: the `init_from` checkpoint's (its config.json wins), else `model:`."""
    if cfg.init_from:
        return read_config(resolve_checkpoint(Path(cfg.init_from)))
    return cfg.model_config()


@torch.no_grad()
def materialize(model: nn.Module, device: torch.device, seed: int, init_from: str | None = None) -> None:
    """Allocate `model`'s (possibly sharded) meta tensors on `device` and fill them."""
    model.to_empty(device=device)
    model.init_buffers()  # RoPE tables, MoE balancing biases (init_from then loads the saved biases)
    if init_from:
        load_weights_(model, resolve_checkpoint(Path(init_from)))
    else:
        init_weights_(model, seed)


def build_train_model(cfg, mcfg: Phi2Config, env, mesh) -> tuple[Phi2, nn.Module]:
    """(the plain model, the module to call in training): meta -> parallelize -> materialise on env.device."""
    from phiforge.train.parallelize import parallelize

    with on_meta():
        model = Phi2(mcfg)
    model.loss_chunk_rows = cfg.loss_chunk_rows
    fill = partial(materialize, device=env.device, seed=cfg.seed, init_from=cfg.init_from)
    train_model = parallelize(model, cfg, mesh, env, materialize=fill)
    model.train()
    return model, train_model
