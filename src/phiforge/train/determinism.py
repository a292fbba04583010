"""`deterministic: true`: the same run gives the same bits on a GPU too, so resume is exact there as on a CPU
(docs/training.md, "Exactness: what resume guarantees where").

    with deterministic_mode(cfg.deterministic):     # run_distributed() wraps both trainers' runs in it
        ...

What it sets for the run, and puts back afterwards:

    torch.use_deterministic_algorithms(True)   every op with a deterministic kernel uses it (on CUDA: scatter_add_,
                                               index_add, index_put, the backward of gather, index_select,
                                               repeat_interleave and embedding, ...); an op with none raises
    CUBLAS_WORKSPACE_CONFIG=:4096:8            unless the user set it: cuBLAS's fixed per-stream workspaces, which
                                               torch requires in this mode. cuBLAS reads it when its handle is made,
                                               so it is set before the run's first cuBLAS call
    cudnn.deterministic, not cudnn.benchmark   no timing-based kernel choice
    SDPA: cuDNN attention off                  torch's own selection drops it in this mode too (sdp_utils.cpp,
                                               check_cudnn_deterministic); flash and memory-efficient attention stay:
                                               under the flag torch runs their backward deterministically
                                               (attention_backward.cu: FlashAttention-2's deterministic dq, and one
                                               key split for memory-efficient attention); math is deterministic
    MoE impl auto -> padded                    index_put / gather / bmm, all deterministic under the flag, rather
                                               than torch._grouped_mm, whose backward torch does not document as
                                               deterministic (model/moe.py, _grouped_mm_ok)

Cost: the deterministic kernels (FA2's serialised dq accumulation, sort-based index_add, one key split, padded
MoE) are slower; not measured here (no GPU in CI).
"""

from __future__ import annotations

import os
from contextlib import contextmanager

import torch

CUBLAS_ENV = "CUBLAS_WORKSPACE_CONFIG"
CUBLAS_WORKSPACE = ":4096:8"


def _current() -> dict:
    return {"algorithms": torch.are_deterministic_algorithms_enabled(),
            "warn_only": torch.is_deterministic_algorithms_warn_only_enabled(),
            "cublas_env": os.environ.get(CUBLAS_ENV), "cudnn_deterministic": torch.backends.cudnn.deterministic,
            "cudnn_benchmark": torch.backends.cudnn.benchmark, "cudnn_sdp": torch.backends.cuda.cudnn_sdp_enabled()}


def _apply(state: dict) -> None:
    torch.use_deterministic_algorithms(state["algorithms"], warn_only=state["warn_only"])
    if state["cublas_env"] is None:
        os.environ.pop(CUBLAS_ENV, None)
    else:
        os.environ[CUBLAS_ENV] = state["cublas_env"]
    torch.backends.cudnn.deterministic = state["cudnn_deterministic"]
    torch.backends.cudnn.benchmark = state["cudnn_benchmark"]
    torch.backends.cuda.enable_cudnn_sdp(state["cudnn_sdp"])


@contextmanager
def deterministic_mode(enabled: bool = True):
    """Deterministic algorithms for the body (see the module docstring); nothing when not enabled. Yields the
    settings in force."""
    if not enabled:
        yield _current()
        return
    before = _current()
    if before["cublas_env"] is None and torch.cuda.is_initialized():
        from phiforge.train.rundir import warn

        warn(f"deterministic: CUDA was initialised before {CUBLAS_ENV} was set, so cuBLAS may keep its default "
             f"workspaces; set {CUBLAS_ENV}={CUBLAS_WORKSPACE} in the environment before starting Python")
    _apply({"algorithms": True, "warn_only": False, "cublas_env": before["cublas_env"] or CUBLAS_WORKSPACE,
            "cudnn_deterministic": True, "cudnn_benchmark": False, "cudnn_sdp": False})
    try:
        yield _current()
    finally:
        _apply(before)
