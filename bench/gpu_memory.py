"""Peak GPU memory of training against `phiforge plan`'s prediction for the same config (bench/gpu_check.sh).

The config (default configs/phi2-1xh100.yaml: phi-2, T=2048, micro-batch 4, bf16-mixed, op-level selective
checkpointing; here with grad_accum_steps=1 and compile off, so the run is short and eager, which is what the
planner counts) trains --steps steps through the trainers' build path and step on one GPU
(phiforge.train.plan.measure_peak_in_process: torch.cuda.max_memory_allocated), and the planner predicts the
peak (plan_memory, as `phiforge plan --gpus 1` prints it). PASS when the prediction is within --tolerance
(default 15%, the bound tests/test_engine_plan.py holds the planner to on CPU) of the measured peak.

    python bench/gpu_memory.py
    python bench/gpu_memory.py --set micro_batch_size=2 --set parallel.activation_checkpointing=full
    python bench/gpu_memory.py --dry-run      # CPU, the tiny preset: the profiler's live bytes vs the CPU plan

Writes bench/results/gpu-memory-<device>.json (--out to change); exit status 1 on FAIL.
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
GiB = 2**30


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default=str(ROOT / "configs" / "phi2-1xh100.yaml"))
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config overrides")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--tolerance", type=float, default=0.15, help="largest |predicted / measured - 1|")
    ap.add_argument("--dry-run", action="store_true", help="CPU, the tiny preset: the setup path, in seconds")
    ap.add_argument("--out", default=None, help="result JSON (default bench/results/gpu-memory-<device>.json)")
    args = ap.parse_args(argv)
    if args.steps < 1 or not 0 < args.tolerance < 1:
        ap.error(f"--steps must be at least 1 and --tolerance in (0, 1), got {args.steps} and {args.tolerance}")
    if not args.dry_run and not torch.cuda.is_available():
        print("FAIL memory: no CUDA device (use --dry-run on a CPU)")
        return 1
    from phiforge.config import load_config
    from phiforge.errors import PhiforgeError
    from phiforge.train.config import TrainConfig
    from phiforge.train.plan import cpu_plan, format_bytes, measure_peak_in_process, plan_memory

    dry = ["model.preset=tiny", "data.seq_len=64", "micro_batch_size=2", "device=cpu"] if args.dry_run else []
    try:
        cfg = load_config(TrainConfig, args.config, ["grad_accum_steps=1", "compile=false", *dry, *args.set])
    except PhiforgeError as e:
        print(f"FAIL memory: {e}")
        return 1
    plan = cpu_plan(cfg) if args.dry_run else plan_memory(cfg, 1, gpus_per_node=1, device_type="cuda")
    t0 = time.perf_counter()
    measured = measure_peak_in_process(cfg, args.steps)
    ratio = plan.peak_bytes / measured - 1
    name = "cpu" if args.dry_run else torch.cuda.get_device_name()
    slug = "cpu-dry-run" if args.dry_run else "cuda-" + name.replace(" ", "_")
    out = Path(args.out or ROOT / "bench" / "results" / f"gpu-memory-{slug}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"device": name, "torch": torch.__version__, "command": " ".join(sys.argv),
                               "date": time.strftime("%Y-%m-%d"), "seconds": round(time.perf_counter() - t0, 1),
                               "config": args.config, "overrides": ["grad_accum_steps=1", "compile=false", *dry,
                                                                    *args.set],
                               "predicted_gib": plan.peak_bytes / GiB, "predicted_phase": plan.peak_phase,
                               "components_gib": {k: v / GiB for k, v in plan.components.items()},
                               "measured_gib": measured / GiB, "predicted_vs_measured": ratio,
                               "tolerance": args.tolerance}, indent=2) + "\n")
    print(f"wrote {out}")
    ok = abs(ratio) <= args.tolerance
    print(f"{'PASS' if ok else 'FAIL'} memory: predicted {format_bytes(plan.peak_bytes).strip()}, measured "
          f"{format_bytes(measured).strip()} ({ratio:+.1%}, tolerance {args.tolerance:.0%}); {plan.strategy}, "
          f"{plan.precision}, micro-batch {plan.micro_batch_size} x {plan.seq_len}, AC {plan.activation_checkpointing}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
