"""Numerical checks of the accelerator paths that the CPU test suite cannot reach, against reference paths.

    python bench/gpu_parity.py            # on CUDA when there is one, else CPU (the same code, fp32 kernels)
    python bench/gpu_parity.py --dry-run  # CPU, fp32, small sizes: the setup path in seconds (bench/gpu_check.sh)

1. MoE: the grouped GEMM (torch._grouped_mm, bf16 on Hopper) and padded paths vs the reference loop in the same
   dtype, outputs and gradients, at d=512 with 8 experts, top-2.
2. Chunked linear + cross-entropy (model.loss_chunk_rows) vs the plain head, both under bf16 autocast.
3. Phi2 attention: the default SDPA kernel choice (flash/cuDNN/efficient in bf16 on GPUs) vs the math kernel.

Each check reports the largest error relative to the reference's scale and passes under its dtype's tolerance.
Writes bench/results/gpu-parity-<device>.json; the exit status is the number of failed checks.
"""

from __future__ import annotations

import json
import platform
import sys
import time
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from phiforge.model import MoE, MoEConfig, Phi2, Phi2Config  # noqa: E402
from phiforge.model.moe import IMPLS  # noqa: E402


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    a, ref = a.float(), ref.float()
    return ((a - ref).abs().max() / ref.abs().max().clamp_min(1e-12)).item()


def moe_case(impl: str, dtype: torch.dtype, device: str, x: torch.Tensor, seed: int = 0):
    torch.manual_seed(seed)
    layer = MoE(MoEConfig(num_experts=8, top_k=2, expert_hidden=256), 512)
    with torch.no_grad():  # non-zero output projections, so every parameter has a gradient to compare
        layer.w2.normal_(0, 0.02)
        layer.b2.normal_(0, 0.02)
    layer = layer.to(device=device, dtype=dtype)
    layer.impl = impl
    xi = x.to(dtype).clone().requires_grad_(True)
    y = layer(xi)
    (y.float() * torch.linspace(-1, 1, y.numel(), device=device).view_as(y)).sum().backward()
    return y.detach(), xi.grad, {n: p.grad for n, p in layer.named_parameters()}


def check_moe(device: str, dtype: torch.dtype, tokens: int = 4096) -> list[dict]:
    x = torch.randn(tokens, 512, generator=torch.Generator().manual_seed(1)).to(device)
    y_ref, gx_ref, g_ref = moe_case("loop", dtype, device, x)  # same dtype: only the kernels differ
    out = []
    for impl in [i for i in IMPLS if i not in ("auto", "loop")]:
        try:
            y, gx, g = moe_case(impl, dtype, device, x)
        except (RuntimeError, NotImplementedError) as e:  # e.g. no grouped GEMM kernel for this device/dtype
            out.append({"check": f"moe {impl} vs loop, {dtype}", "error": str(e).splitlines()[0], "pass": None})
            continue
        errs = {"out": rel_err(y, y_ref), "grad_x": rel_err(gx, gx_ref),
                **{f"grad_{n}": rel_err(g[n], g_ref[n]) for n in g_ref}}
        tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
        out.append({"check": f"moe {impl} vs loop, {dtype}", "max_rel_err": max(errs.values()), "errors": errs,
                    "tol": tol, "pass": max(errs.values()) < tol})
    return out


def check_fused_loss(device: str, dtype: torch.dtype, seq: int = 512) -> dict:
    torch.manual_seed(0)
    cfg = Phi2Config(vocab_size=51200, n_layer=2, n_embd=320, n_head=4, intermediate_size=1280, max_seq_len=seq)
    m = Phi2(cfg).to(device)
    x = torch.randint(0, 50257, (4, seq), device=device)
    y = torch.randint(0, 50257, (4, seq), device=device)
    autocast = lambda: torch.autocast(device_type=device, dtype=dtype, enabled=dtype != torch.float32)  # noqa: E731
    m.loss_chunk_rows = 0
    with autocast():  # the same trunk numerics for both: only the head and the loss differ
        ref = m(x, y).loss
    ref.backward()
    g_ref = m.lm_head.weight.grad.clone()
    m.zero_grad(set_to_none=True)
    m.loss_chunk_rows = seq
    with autocast():
        loss = m(x, y).loss
    loss.backward()
    errs = {"loss": rel_err(loss.detach(), ref.detach()), "grad_lm_head": rel_err(m.lm_head.weight.grad, g_ref)}
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
    return {"check": f"chunked linear+cross-entropy vs plain head, {dtype} autocast", "max_rel_err": max(errs.values()),
            "errors": errs, "tol": tol, "pass": max(errs.values()) < tol}


def check_attention(device: str, dtype: torch.dtype, seq: int = 2048) -> dict:
    torch.manual_seed(0)
    cfg = Phi2Config(vocab_size=51200, n_layer=2, n_embd=640, n_head=8, intermediate_size=2560, max_seq_len=seq)
    m = Phi2(cfg).to(device=device, dtype=dtype).eval()
    x = torch.randint(0, 50257, (2, seq), device=device)
    with torch.no_grad():
        fast = m(x)
        with sdpa_kernel(SDPBackend.MATH):
            ref = m(x)
    err = rel_err(fast, ref)
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
    return {"check": f"Phi2 logits, default SDPA kernel vs math, {dtype}", "max_rel_err": err, "tol": tol,
            "pass": err < tol}


def main() -> int:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dtype", choices=["bf16", "fp32"], default=None, help="default: bf16 on CUDA, fp32 on CPU")
    ap.add_argument("--dry-run", action="store_true", help="CPU, small sizes: the setup path, in seconds")
    ap.add_argument("--out", default=None, help="result JSON (default bench/results/gpu-parity-<device>.json)")
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() and not args.dry_run else "cpu"
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype or ("bf16" if device == "cuda" else "fp32")]
    name = torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu"
    t0 = time.perf_counter()
    tokens, seq = (256, 32) if args.dry_run else (4096, 512)
    checks = [*check_moe(device, dtype, tokens), check_fused_loss(device, dtype, seq),
              check_attention(device, dtype, 4 * seq)]
    for c in checks:
        verdict = {True: "PASS", False: "FAIL", None: "N/A "}[c["pass"]]
        print(f"{verdict} {c['check']}: " + (f"{c['max_rel_err']:.2e} (tol {c['tol']:.0e})" if "max_rel_err" in c
                                             else c.get("error", "")))
    slug = (("cuda-" + name.replace(" ", "_")) if device == "cuda" else "cpu") + ("-bf16" if dtype == torch.bfloat16 else "")
    slug += "-dry-run" if args.dry_run else ""
    out = Path(args.out or Path(__file__).parent / "results" / f"gpu-parity-{slug}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"device": name, "torch": torch.__version__, "command": " ".join(sys.argv),
                               "date": time.strftime("%Y-%m-%d"), "seconds": round(time.perf_counter() - t0, 1),
                               "checks": checks}, indent=2) + "\n")
    print(f"wrote {out}")
    failed = [c["check"] for c in checks if c["pass"] is False]
    worst = max(c["max_rel_err"] / c["tol"] for c in checks if "max_rel_err" in c)
    print(f"FAIL parity: {'; '.join(failed)}" if failed else
          f"PASS parity: {len(checks)} checks on {name}, {str(dtype).removeprefix('torch.')}; worst error "
          f"{worst:.2f} of its tolerance" + (f"; {sum(c['pass'] is None for c in checks)} N/A" if any(
              c["pass"] is None for c in checks) else ""))
    return len(failed)


if __name__ == "__main__":
    sys.exit(main())
