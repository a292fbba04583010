"""Weight initialisation that does not depend on how the weights are laid out over processes.

Each parameter is filled from its own seeded streams: its rows (dim 0) go in blocks of about 2^20 values, and
each block is drawn from a CPU generator seeded by (seed, parameter name, block number). A process that holds
rows [a, b) of a parameter (an FSDP shard) draws only the blocks that overlap them and gets exactly the values
the whole tensor has there. So one seed gives the same weights on 1 process, on DDP replicas and on FSDP
shards of any size, and no process ever holds more than its shard plus one block (the training engine builds
the model on the meta device and fills each rank's shard after `parallelize()`).
"""

from __future__ import annotations

import contextlib
import hashlib
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.overrides import TorchFunctionMode

BLOCK_VALUES = 1 << 20
# names that wrappers insert into parameter names (activation checkpointing, torch.compile, DDP)
_WRAPPER_PREFIXES = ("_checkpoint_wrapped_module.", "_orig_mod.", "module.")


@dataclass(frozen=True)
class Init:
    kind: str  # normal (value = std) | const (value)
    value: float = 0.0


ZEROS, ONES = Init("const", 0.0), Init("const", 1.0)


def canonical_name(name: str) -> str:
    """A parameter's name without wrapper prefixes: the name in the plain model's state dict."""
    for prefix in _WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def _block_seed(seed: int, name: str, block: int) -> int:
    digest = hashlib.blake2b(f"{seed}:{name}:{block}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def local_rows(p: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(the rows of `p` this process holds, index of the first one): all of a plain tensor, or the local shard
    of a DTensor sharded on dim 0 (FSDP2's layout, also under HSDP's replicate dimension)."""
    from torch.distributed.tensor import DTensor, Shard

    if not isinstance(p, DTensor):
        return p, 0
    start = 0
    coord = p.device_mesh.get_coordinate()
    for mesh_dim, placement in enumerate(p.placements):
        if isinstance(placement, Shard):
            if placement.dim != 0:
                raise NotImplementedError(f"parameter sharded on dim {placement.dim}; only dim 0 is supported")
            start += coord[mesh_dim] * math.ceil(p.shape[0] / p.device_mesh.size(mesh_dim))
    return p.to_local(), start


@torch.no_grad()
def fill_rows_(dst: torch.Tensor, full_shape: tuple[int, ...], row_start: int, rule: Init, seed: int,
               name: str) -> None:
    """Fill `dst`, rows [row_start, row_start + len(dst)) of a tensor of `full_shape`, by `rule`."""
    if rule.kind == "const":
        dst.fill_(rule.value)
        return
    if dst.numel() == 0:
        return
    shape = tuple(full_shape) or (1,)
    view = dst.reshape(-1) if dst.dim() == 0 else dst
    row_numel = math.prod(shape[1:])
    per_block = max(1, BLOCK_VALUES // max(1, row_numel))
    row_end = row_start + view.size(0)
    for b in range(row_start // per_block, (row_end - 1) // per_block + 1):
        lo, hi = b * per_block, min((b + 1) * per_block, shape[0])
        gen = torch.Generator().manual_seed(_block_seed(seed, name, b))
        values = torch.empty((hi - lo, *shape[1:])).normal_(0.0, rule.value, generator=gen)
        a, z = max(lo, row_start), min(hi, row_end)
        view[a - row_start : z - row_start].copy_(values[a - lo : z - lo])


def init_weights_(model: nn.Module, seed: int) -> None:
    """Fill every parameter of `model` by `model.init_rule(module, leaf_name)`: plain tensors whole, DTensors
    their local shard. Works on wrapped models (activation checkpointing, compile, FSDP2)."""
    for name, p in model.named_parameters():
        module_name, _, leaf = name.rpartition(".")
        rule = model.init_rule(model.get_submodule(module_name), leaf)
        local, start = local_rows(p)
        fill_rows_(local, tuple(p.shape), start, rule, seed, canonical_name(name))


class _SkipInitialisers(TorchFunctionMode):
    """Modules built on the meta device still run torch.nn.init on their (meta) weights, which goes through
    torch._refs and imports torch._dynamo: about 150 MB and a second per process, for values nobody reads.
    Skip them; the weights are drawn later (init_weights_) or loaded."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__module__", None) == "torch.nn.init":
            return args[0] if args else None
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def on_meta():
    """Build modules on the meta device (shapes only, no memory), skipping their initialisers."""
    with torch.device("meta"), _SkipInitialisers():
        yield


def random_seed() -> int:
    """A seed drawn from torch's global generator, so `torch.manual_seed(s); Phi2(cfg)` is reproducible."""
    return int(torch.randint(0, 2**62, (1,)).item())
