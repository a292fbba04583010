"""One precision policy for every strategy (issue 22, items 2 and 4): the dtype each op class runs in under
bf16-mixed is the same on 1 process and on 2 ranks with ddp and fsdp, and it is the table of docs/training.md;
the device-aware defaults (Muon's Newton-Schulz dtype, TF32, CUDA allocator, peak memory per interval)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from engine_helpers import ROOT, TIMEOUT, child_env

WORKER = ROOT / "tests" / "precision_worker.py"


def op_dtypes(tmp_path, strategy: str, precision: str, nproc: int) -> dict:
    out = tmp_path / f"{strategy}-{precision}-{nproc}.json"
    cmd = [sys.executable, str(WORKER), str(out), strategy, precision]
    if nproc > 1:
        cmd[1:1] = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    p = subprocess.run(cmd, env=child_env(), cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT)
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.slow  # three launches, two of them of 2 ranks
def test_bf16_mixed_runs_each_op_class_in_the_same_dtype_on_every_strategy(tmp_path):
    from phiforge.train.precision import resolve_precision

    runs = {"none": op_dtypes(tmp_path, "none", "bf16-mixed", 1), "ddp": op_dtypes(tmp_path, "ddp", "bf16-mixed", 2),
            "fsdp": op_dtypes(tmp_path, "fsdp", "bf16-mixed", 2)}
    assert all(r["fully_shard"] and r["precision"] == "bf16-mixed" for r in runs.values())  # FSDP2 casts, on all
    assert runs["none"]["records"] == runs["ddp"]["records"] == runs["fsdp"]["records"]  # op by op, in order
    table = {k: str(v) for k, v in resolve_precision("bf16-mixed", "cuda").op_dtypes().items()}
    forward_of = {"matmul": "matmul", "layer_norm": "layer_norm", "attention": "attention", "rope": "rope",
                  "loss": "loss", "router": "router"}
    seen = {}
    for cls, inputs, out in runs["none"]["records"]:
        seen.setdefault(cls, set()).add(out)
        if cls in ("rope", "router", "loss"):
            assert set(inputs) == {"torch.float32"}, (cls, inputs)  # computed in fp32, tables and weights too
    assert set(seen) == set(forward_of)
    for cls in ("layer_norm", "attention", "rope", "loss", "router"):
        assert seen[cls] == {table[cls]}, (cls, seen[cls], table[cls])
    # bf16 matmuls everywhere but the router's and its gradients' (fp32 by design)
    bf16 = [r for r in runs["none"]["records"] if r[0] == "matmul" and r[2] == "torch.bfloat16"]
    assert len(bf16) > 20 and all(set(r[1]) == {"torch.bfloat16"} for r in bf16)


def test_fp32_runs_everything_in_fp32(tmp_path):
    records = op_dtypes(tmp_path, "none", "fp32", 1)
    assert not records["fully_shard"]  # nothing to cast: the plain module
    assert {dtype for _, inputs, out in records["records"] for dtype in [*inputs, out]} == {"torch.float32"}


def test_ns_dtype_auto_follows_native_bf16(monkeypatch):
    """optim.muon.ns_dtype=auto: bf16 on GPUs and on CPUs with AVX512-BF16 / AMX / Arm BF16, fp32 elsewhere (an
    AVX2-only CPU emulates bf16 matmuls ~17x slower than fp32)."""
    from phiforge.train import precision

    avx2 = {"fpu", "sse2", "avx", "avx2", "fma"}
    monkeypatch.setattr(precision, "cpu_flags", lambda: avx2)
    assert precision.resolve_ns_dtype("auto", "cpu") == "fp32"
    assert precision.resolve_ns_dtype("auto", "cuda") == "bf16"
    assert precision.resolve_ns_dtype("bf16", "cpu") == "bf16"  # an explicit choice stands
    for native in ("avx512_bf16", "amx_bf16", "bf16"):
        monkeypatch.setattr(precision, "cpu_flags", lambda f=native: avx2 | {"avx512f", f})
        assert precision.resolve_ns_dtype("auto", "cpu") == "bf16", native
    monkeypatch.setattr(precision, "cpu_flags", lambda: avx2 | {"avx512f"})  # AVX-512 without its bf16 extension
    assert precision.resolve_ns_dtype("auto", "cpu") == "fp32"


def test_muon_groups_get_the_resolved_ns_dtype(monkeypatch):
    from phiforge.config import load_config
    from phiforge.model import Phi2
    from phiforge.train import precision
    from phiforge.train.config import TrainConfig
    from phiforge.train.optim import build_optimizer, muon_ns_dtype

    cfg = load_config(TrainConfig, None, ["model.preset=tiny", "model.n_layer=1", "optim.name=muon"])
    assert cfg.optim.muon.ns_dtype == "auto"
    model = Phi2(cfg.model_config())
    monkeypatch.setattr(precision, "cpu_flags", lambda: {"avx2"})
    assert muon_ns_dtype(build_optimizer(model, cfg.optim)) == "fp32"
    monkeypatch.setattr(precision, "cpu_flags", lambda: {"avx2", "amx_bf16"})
    assert muon_ns_dtype(build_optimizer(model, cfg.optim)) == "bf16"
    assert muon_ns_dtype(build_optimizer(model, load_config(TrainConfig, None, []).optim)) is None  # AdamW


def test_cpu_flags_and_model_are_read_from_proc_cpuinfo():
    from phiforge.train.precision import cpu_flags, cpu_model

    text = open("/proc/cpuinfo").read()
    assert ("avx2" in cpu_flags()) == (" avx2" in text)
    assert cpu_model() and cpu_model() in text


def test_cuda_defaults_tf32_and_expandable_segments(monkeypatch):
    """configure_cuda: TF32 for fp32 matmuls, through the API that keeps get_float32_matmul_precision() valid;
    the allocator gets expandable segments unless the user configured it."""
    from phiforge.train.distributed import cuda_allocator_defaults
    from phiforge.train.precision import configure_cuda

    before = torch.get_float32_matmul_precision()
    try:
        configure_cuda()
        assert torch.backends.cuda.matmul.fp32_precision == "tf32"
        assert torch.get_float32_matmul_precision() == "high"  # readable (inductor's autotuner reads it)
    finally:
        torch.set_float32_matmul_precision(before)
    for var in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF"):
        monkeypatch.delenv(var, raising=False)
    import os

    cuda_allocator_defaults()
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "max_split_size_mb:128")
    cuda_allocator_defaults()
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "max_split_size_mb:128"  # the user's stands
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF")
    monkeypatch.setenv("PYTORCH_ALLOC_CONF", "backend:cudaMallocAsync")
    cuda_allocator_defaults()
    assert "PYTORCH_CUDA_ALLOC_CONF" not in os.environ


def test_cuda_peak_memory_is_per_interval_with_reserved_beside_allocated(monkeypatch):
    from phiforge.train import metrics

    calls = []
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda d=None: 3 * 2**30)
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda d=None: 4 * 2**30)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda d=None: calls.append(d))
    dev = torch.device("cuda", 0)
    assert metrics.peak_memory(dev) == {"peak_mem_gib": 3.0, "peak_mem_kind": "cuda_max_allocated",
                                        "peak_mem_reserved_gib": 4.0}
    metrics.reset_peak_memory(dev)
    assert calls == [dev]
    metrics.reset_peak_memory(torch.device("cpu"))  # a CPU's peak RSS stays the process's
    assert calls == [dev] and metrics.peak_memory(torch.device("cpu"))["peak_mem_kind"] == "rss_peak"
