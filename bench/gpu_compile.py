"""Zero recompiles and graph breaks with inductor over validation, training, validation, training
(bench/gpu_check.sh): the trainers' build path (meta -> parallelize(): per-block compile with fullgraph=True ->
materialise -> build_step) in bf16-mixed, then phiforge.train.checks.val_train_schedule, the schedule
tests/test_compile.py runs on CPU. After the warm-up (the first validation and step) nothing may compile again:
torch._dynamo's counters show no new frame, graph or graph break, and error_on_recompile turns a recompile into
an error.

    python bench/gpu_compile.py                           # CUDA: phi-2's width, 2 layers, T=512
    python bench/gpu_compile.py --variants dense          # one variant
    python bench/gpu_compile.py --dry-run                 # CPU, the tiny preset, dynamo only: the setup path

Variants: dense (no AC), moe-padded (dropless MoE with bias balancing after the MLP, full AC: the host-read
expert count as an unbacked size), moe-grouped (the grouped GEMM MoE replacing the MLP, selective AC).
Writes bench/results/gpu-compile-<device>.json (--out to change); exit status 1 if anything compiled again.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

MOE = "model.moe={{num_experts: 4, top_k: 2, position: {position}{extra}}}"
VARIANTS = {  # name: (MoE impl or None, --set overrides)
    "dense": (None, []),
    "moe-padded": ("padded", [MOE.format(position="after_mlp", extra=", bias_balancing: true"),
                              "parallel.activation_checkpointing=full"]),
    "moe-grouped": ("grouped", [MOE.format(position="replace_mlp", extra=""),
                                "parallel.activation_checkpointing=selective", "parallel.ac_policy=op"]),
}


def run_variant(name: str, dry_run: bool, steps: int) -> dict:
    from phiforge.config import load_config
    from phiforge.train.checks import compiled_again, val_train_schedule
    from phiforge.train.config import TrainConfig
    from phiforge.train.distributed import init_distributed, shutdown

    impl, sets = VARIANTS[name]
    size = ["model.preset=tiny", "data.seq_len=32"] if dry_run else ["model.preset=phi-2", "data.seq_len=512"]
    backend = "eager" if dry_run else "inductor"  # inductor's C++ build on a CPU takes minutes
    cfg = load_config(TrainConfig, None, [*size, "model.n_layer=2", f"device={'cpu' if dry_run else 'cuda'}",
                                          "precision=bf16-mixed", "compile=true", f"parallel.compile_backend={backend}",
                                          "optim.warmup_steps=1", "optim.lr=1e-3", *sets])
    torch._dynamo.reset()
    env = init_distributed(cfg.device)
    t0 = time.perf_counter()
    try:
        losses, vals, counts = val_train_schedule(cfg, env, impl, steps=steps, batch=2)
    except Exception as e:  # error_on_recompile's RecompileError, or a graph break under fullgraph=True
        return {"variant": name, "backend": backend, "error": f"{type(e).__name__}: {str(e).splitlines()[0]}"}
    finally:
        shutdown(env)
    return {"variant": name, "backend": backend, "seconds": round(time.perf_counter() - t0, 1), "losses": losses,
            "val_losses": vals, "counters": counts, "compiled_again": compiled_again(counts)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dry-run", action="store_true",
                    help="CPU, the tiny preset, dynamo without a compiler backend: the setup path")
    ap.add_argument("--variants", default="dense,moe-padded", help=f"comma list of {', '.join(VARIANTS)}")
    ap.add_argument("--steps", type=int, default=None, help="training steps, each after a validation (default 3; "
                    "dry run 2)")
    ap.add_argument("--out", default=None, help="result JSON (default bench/results/gpu-compile-<device>.json)")
    args = ap.parse_args(argv)
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown or not names:
        ap.error(f"--variants: unknown {unknown or 'empty list'}; choose from {', '.join(VARIANTS)}")
    args.steps = args.steps or (2 if args.dry_run else 3)
    if args.steps < 2:
        ap.error(f"--steps must be at least 2 (one warm-up step, then the checked ones), got {args.steps}")
    if not args.dry_run and not torch.cuda.is_available():
        print("FAIL compile: no CUDA device (use --dry-run on a CPU)")
        return 1
    results = [run_variant(n, args.dry_run, args.steps) for n in names]
    for r in results:
        print(json.dumps(r), flush=True)
    name = "cpu" if args.dry_run else torch.cuda.get_device_name()
    slug = "cpu-dry-run" if args.dry_run else "cuda-" + name.replace(" ", "_")
    out = Path(args.out or ROOT / "bench" / "results" / f"gpu-compile-{slug}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"device": name, "torch": torch.__version__, "command": " ".join(sys.argv),
                               "date": time.strftime("%Y-%m-%d"), "results": results}, indent=2) + "\n")
    print(f"wrote {out}")
    bad = [f"{r['variant']}: {r.get('error') or r['compiled_again']}" for r in results
           if "error" in r or r["compiled_again"]]
    backend = results[0]["backend"]
    if bad:
        print(f"FAIL compile: {'; '.join(bad)}")
        return 1
    print(f"PASS compile: 0 recompiles, 0 graph breaks after warm-up over val/train x {args.steps} ({backend}; "
          f"{', '.join(names)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
