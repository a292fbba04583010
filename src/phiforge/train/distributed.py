"""Process group setup: one code path for 1 process (plain `phiforge train`) and N processes (torchrun).

Under torchrun (RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR in the environment) the default process group is
initialised from the environment: `cpu:gloo,cuda:nccl` on GPUs (NCCL for tensors on the GPU, gloo for CPU
tensors such as checkpoint bookkeeping), gloo on CPUs. Without torchrun a world of one is initialised on an
in-process store, so FSDP, DCP and the collectives below run unchanged.

Launched ranks meet through env:// (MASTER_ADDR/MASTER_PORT: torchrun's agent store, or rank 0's TCPStore when
the ranks are started directly, as `srun` starts them); that store is kept in DistEnv.store, where a failing
rank leaves its message for the others (fail_together.py). A collective waits at most `timeout_s` for its
peers (parallel.collective_timeout_s).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from phiforge.errors import ConfigError
from phiforge.train.precision import configure_cuda

RENDEZVOUS_S = 600  # the least time the launched ranks are given to arrive, whatever collective_timeout_s is


@dataclass
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device
    launched: bool  # started by torchrun (or another launcher that sets RANK/WORLD_SIZE)
    owns_group: bool  # we initialised the default process group, so we destroy it
    store: "dist.Store | None" = None  # the launched ranks' rendezvous store (None: a world of one, or joined)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def num_nodes(self) -> int:
        return max(1, self.world_size // max(1, self.local_world_size))


def _env_int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        raise ConfigError(f"environment variable {name} must be an integer, got {os.environ[name]!r}") from None


def resolve_device(name: str = "auto", local_rank: int = 0) -> torch.device:
    """auto | cpu | cuda | cuda:N as a device; a bare `cuda` is this process's GPU (LOCAL_RANK under torchrun)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"unknown device '{name}' (use auto, cpu, cuda or cuda:N)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device '{name}' requested but CUDA is not available")
        if device.index is None:  # one GPU per process: LOCAL_RANK picks it
            if local_rank >= torch.cuda.device_count():
                raise ConfigError(f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} GPUs are visible")
            device = torch.device("cuda", local_rank)
    return device


def cuda_allocator_defaults() -> None:
    """Expandable segments for the CUDA caching allocator (it grows segments instead of leaving fragments between
    fixed-size ones), unless the user configured the allocator. Read when CUDA first allocates: call before that."""
    if "PYTORCH_CUDA_ALLOC_CONF" not in os.environ and "PYTORCH_ALLOC_CONF" not in os.environ:
        os.environ["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"


def init_distributed(device_name: str = "auto", timeout_s: float = 600) -> DistEnv:
    """Initialise (or join) the default process group and pick this rank's device. A collective gives up after
    waiting `timeout_s` seconds for the other ranks."""
    launched = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    rank, world = (_env_int("RANK", 0), _env_int("WORLD_SIZE", 1)) if launched else (0, 1)
    local_rank = _env_int("LOCAL_RANK", 0) if launched else 0
    local_world = _env_int("LOCAL_WORLD_SIZE", world) if launched else 1
    device = resolve_device(device_name, local_rank)
    if device.type == "cuda":
        cuda_allocator_defaults()  # before CUDA allocates anything
        torch.cuda.set_device(device)
        configure_cuda()
    backend = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"
    owns, store, timeout = False, None, timedelta(seconds=timeout_s)
    if dist.is_initialized():  # e.g. a caller set it up already: join it as is
        rank, world = dist.get_rank(), dist.get_world_size()
    elif launched:
        kwargs = {"device_id": device} if device.type == "cuda" else {}
        # env:// as init_process_group does it, keeping the store (the group's keys under their own prefix). The
        # ranks may arrive minutes apart (nodes that start late): the store waits RENDEZVOUS_S at least
        arrive = timedelta(seconds=max(timeout_s, RENDEZVOUS_S))
        store, rank, world = next(dist.rendezvous("env://", timeout=arrive))
        dist.init_process_group(backend=backend, store=dist.PrefixStore("default_pg", store), rank=rank,
                                world_size=world, timeout=timeout, **kwargs)
        owns = True
    else:
        dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
        owns = True
    return DistEnv(rank, world, local_rank, local_world, device, launched, owns, store)


def shutdown(env: DistEnv | None) -> None:
    if env is not None and env.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def barrier(env: DistEnv) -> None:
    if env.world_size > 1:
        dist.barrier()


def all_reduce_(t: torch.Tensor, env: DistEnv, op=dist.ReduceOp.SUM) -> torch.Tensor:
    if env.world_size > 1:
        dist.all_reduce(t, op=op)
    return t


def broadcast_object(obj, env: DistEnv, src: int = 0):
    if env.world_size == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]
