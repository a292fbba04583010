"""MoE layer vs dense MLP at equal active FLOPs, side by side in one run (MegaBlocks convention).

Dense: the Phi-2 MLP d -> ff -> d. MoE: E experts of width ff/top_k, top_k per token, so each token does the
same expert matmul FLOPs as in the dense MLP (the MoE adds the router, the permutation and the gating).
Cases: forward (no_grad) and forward+backward, with natural routing (the layer's own router, weights
N(0, 1/d) so logits have unit scale; imbalance reported) and balanced routing (round-robin, every expert
gets exactly k*N/E tokens).

    python bench/moe.py                        # CPU default: d=256, ff=1024, 4x1024 tokens, fp32 (< 1 min on 2 cores)
    python bench/moe.py --full                 # issue size: d=2560, ff=10240, 8x2048 tokens, bf16 (GPU)
    python bench/moe.py --impls padded,grouped,loop

Writes bench/results/moe-<device>.json with the device name, torch version and the exact command.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import statistics
import sys
import time
from pathlib import Path

import torch

from phiforge.model import MoE, MoEConfig, Phi2Config
from phiforge.model.phi2 import MLP


class BalancedMoE(MoE):
    """Round-robin routing: token t picks experts t, t+1, ..., t+k-1 (mod E) with equal gates."""

    def _route(self, x):
        logits, scores, _, _ = super()._route(x)
        N, E, k = x.size(0), self.cfg.num_experts, self.cfg.top_k
        idx = (torch.arange(N, device=x.device)[:, None] + torch.arange(k, device=x.device)) % E
        return logits, scores, idx, torch.full((N, k), 1.0 / k, device=x.device)


def device_name(dev: torch.device) -> str:
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({torch.get_num_threads()} threads)"
    except OSError:
        pass
    return f"{platform.processor() or 'cpu'} ({torch.get_num_threads()} threads)"


def timed(fns: list, dev, warmup: int, iters: int) -> list[float]:
    """Median seconds per call of each fn. Rounds interleave the fns, so load from other processes on a
    shared machine hits every case alike instead of whichever ran during it."""
    times = [[] for _ in fns]
    for r in range(warmup + iters):
        for fn, t in zip(fns, times):
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            t0 = time.perf_counter()
            fn()
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            if r >= warmup:
                t.append(time.perf_counter() - t0)
    return [statistics.median(t) for t in times]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--full", action="store_true", help="d=2560, ff=10240, 8x2048 tokens, bf16 (the issue's H100 size)")
    p.add_argument("--d", type=int, default=256)
    p.add_argument("--ff", type=int, default=None, help="dense MLP width (default 4d)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--dtype", choices=["fp32", "bf16"], default=None, help="default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--device", default="auto")
    p.add_argument("--impls", default="auto", help="comma list of MoE impls: auto, padded, grouped, loop")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--out", default=None, help="default: bench/results/moe-<device>.json")
    args = p.parse_args(argv)
    if args.full:
        args.d, args.ff, args.batch, args.seq, args.dtype = 2560, 10240, 8, 2048, args.dtype or "bf16"
    dev = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype or ("bf16" if dev.type == "cuda" else "fp32")]
    ff = args.ff or 4 * args.d
    N = args.batch * args.seq
    torch.manual_seed(0)

    mlp_cfg = Phi2Config(n_layer=1, n_embd=args.d, n_head=1, intermediate_size=ff, vocab_size=64)
    moe_cfg = MoEConfig(num_experts=args.experts, top_k=args.top_k, expert_hidden=ff // args.top_k)
    x = torch.randn(N, args.d, device=dev, dtype=dtype)
    g = torch.randn_like(x)

    def build(cls):
        torch.manual_seed(1)  # the same router for every impl
        layer = cls(moe_cfg, args.d)
        with torch.no_grad():  # non-zero weights everywhere (zero-init outputs would make backward trivially cheap)
            layer.w2.normal_(0, 0.02)
            layer.router.normal_(0, args.d ** -0.5)
        return layer.to(dev, dtype)

    cases = [("dense", "-", "-", MLP(mlp_cfg).to(dev, dtype))]
    for impl in args.impls.split(","):
        for routing, cls in (("natural", MoE), ("balanced", BalancedMoE)):
            layer = build(cls)
            layer.impl = impl
            cases.append(("moe", impl, routing, layer))

    def fwd(layer):
        with torch.no_grad():
            layer(x)

    def fwd_bwd(layer):
        layer(x.requires_grad_(True)).backward(g)
        x.grad = None
        layer.zero_grad(set_to_none=True)

    runs = [(case, mode, fn) for case in cases for mode, fn in (("fwd", fwd), ("fwd+bwd", fwd_bwd))]
    secs = timed([lambda fn=fn, layer=case[-1]: fn(layer) for case, _, fn in runs], dev, args.warmup, args.iters)
    dense_s = {mode: s for (case, mode, _), s in zip(runs, secs) if case[0] == "dense"}
    results = []
    for ((kind, impl, routing, layer), mode, _), s in zip(runs, secs):
        row = {"layer": kind, "impl": impl, "routing": routing, "mode": mode, "ms": round(s * 1e3, 3),
               "tokens_per_s": round(N / s), "throughput_vs_dense": round(dense_s[mode] / s, 3)}
        if kind == "moe":
            with torch.no_grad():
                layer(x)
            row["imbalance"] = round(float(layer.stats["imbalance"]), 3)
        results.append(row)
        print(f"{kind:5s} {impl:7s} {routing:8s} {mode:7s} {row['ms']:10.2f} ms  {row['tokens_per_s']:>10,} tok/s"
              f"  x{row['throughput_vs_dense']:.2f} of dense" + (f"  imbalance {row['imbalance']}" if kind == "moe" else ""),
              flush=True)

    name = device_name(dev)
    slug = "cpu" if dev.type == "cpu" else re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    out = Path(args.out) if args.out else Path(__file__).parent / "results" / f"moe-{slug}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "bench": "moe", "device": name, "torch": torch.__version__,
        "command": " ".join(["python", "bench/moe.py", *(sys.argv[1:] if argv is None else argv)]),
        "config": {"d": args.d, "ff": ff, "tokens": N, "batch": args.batch, "seq": args.seq, "experts": args.experts,
                   "top_k": args.top_k, "expert_hidden": ff // args.top_k, "dtype": str(dtype).removeprefix("torch."),
                   "warmup": args.warmup, "iters": args.iters, "timing": "median"},
        "results": results,
    }
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
