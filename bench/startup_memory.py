"""Peak host memory per rank at training start-up: the whole fp32 model built on every rank (phiforge before
meta-device init) against the engine's meta-device build (each rank materialises only its FSDP shards).

    python bench/startup_memory.py [--preset base] [--nproc 2]    -> bench/results/startup-memory-cpu.json

Each variant runs as its own torchrun job (gloo, CPU, FSDP2 over --nproc ranks) so the peaks do not mix. A rank
reports its resident set size after the imports (the baseline: Python, torch, phiforge) and its peak RSS
(VmHWM) once the model is laid out and materialised; the model's share is the difference. Target (issue 14):
the meta build's per-rank peak at most 0.6x the full build's.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def worker(mode: str, preset: str, out: str) -> None:
    """One rank: build the model one way, report RSS before and the peak after."""
    import torch  # noqa: F401 (imported before the baseline is read, as is what FSDP2 imports: torch._dynamo)
    import torch._dynamo  # noqa: F401
    import torch.distributed.fsdp  # noqa: F401

    from phiforge.config import load_config
    from phiforge.model import Phi2
    from phiforge.train.build import build_text_model
    from phiforge.train.config import TrainConfig
    from phiforge.train.distributed import init_distributed, shutdown
    from phiforge.train.parallelize import parallelize, resolve_layout

    cfg = load_config(TrainConfig, None, [f"model.preset={preset}", "device=cpu", "parallel.strategy=fsdp"])
    env = init_distributed("cpu")
    base = _status_kib("VmRSS")
    layout = resolve_layout(cfg, env)
    if mode == "full":  # every rank builds and initialises the whole model, then FSDP shards it
        model = parallelize(Phi2(cfg.model_config()), cfg, layout)
    else:
        model, _ = build_text_model(cfg, cfg.model_config(), env, layout)
    peak = _status_kib("VmHWM")
    params = sum(p.numel() for p in model.parameters())
    with open(f"{out}.{env.rank}", "w") as f:
        json.dump({"baseline_rss_mib": base / 1024, "peak_rss_mib": peak / 1024,
                   "model_mib": (peak - base) / 1024, "params": params}, f)
    shutdown(env)


def run_variant(mode: str, preset: str, nproc: int) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "rank")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               __file__, "--worker", mode, "--preset", preset, "--out", out]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
        subprocess.run(cmd, check=True, env=env, cwd=ROOT, capture_output=True, text=True)
        return [json.loads(Path(f"{out}.{r}").read_text()) for r in range(nproc)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="base")
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--worker", choices=["full", "meta"], help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--results", default=str(ROOT / "bench" / "results" / "startup-memory-cpu.json"))
    args = ap.parse_args()
    if args.worker:
        worker(args.worker, args.preset, args.out)
        return
    runs = {mode: run_variant(mode, args.preset, args.nproc) for mode in ("full", "meta")}
    worst = {mode: max(r["peak_rss_mib"] for r in ranks) for mode, ranks in runs.items()}
    model = {mode: max(r["model_mib"] for r in ranks) for mode, ranks in runs.items()}
    result = {
        "bench": "startup_memory", "command": " ".join(["python", "bench/startup_memory.py", *sys.argv[1:]]),
        "preset": args.preset, "params": runs["meta"][0]["params"], "nproc": args.nproc, "strategy": "fsdp",
        "device": "cpu", "machine": platform.machine(), "cpus": os.cpu_count(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "per_rank": runs,
        "peak_rss_mib": worst, "model_rss_mib": model,
        "peak_rss_ratio_meta_vs_full": worst["meta"] / worst["full"],
        "model_rss_ratio_meta_vs_full": model["meta"] / model["full"],
        "target": "model_rss_ratio_meta_vs_full <= 0.6",
    }
    result["pass"] = result["model_rss_ratio_meta_vs_full"] <= 0.6
    Path(args.results).parent.mkdir(parents=True, exist_ok=True)
    Path(args.results).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("peak_rss_mib", "model_rss_mib", "peak_rss_ratio_meta_vs_full",
                                             "model_rss_ratio_meta_vs_full", "pass")}, indent=2))


if __name__ == "__main__":
    main()
