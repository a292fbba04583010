"""What a Muon step costs in `make demo` against the same config with AdamW, side by side (issue 22, item 5).

configs/demo-cpu.yaml trains with Muon. Its Newton-Schulz iteration runs in optim.muon.ns_dtype, `auto` by
default: bf16 where the CPU computes bf16 natively (AMX, AVX512-BF16), fp32 elsewhere, since on an AVX2-only CPU a
bf16 matmul is emulated and about 17x slower than fp32. Each arm is `phiforge train` on the demo's data and
config for STEPS steps (as `make demo` runs it: its own process, torch's default threads), one arm after the
other in rounds, so load from other processes hits every arm alike:

    adamw       the demo config with optim.name=adamw (its lr and schedule)
    muon        the demo config as shipped (ns_dtype auto)
    muon-bf16   the demo config with optim.muon.ns_dtype=bf16 (what every CPU ran before `auto`)

Two times per arm and round: the process's wall time (start-up, validation at step 0 and at the end, and the
final checkpoint included) and the steady-state seconds per step (train events after the first
log_interval, which holds the first step's warm-up). The result is the median over rounds; muon_vs_adamw is the
ratio of the medians, which the demo needs at most 1.2. The record names the CPU model and its bf16 support.

    python bench/demo_optimizer_cost.py [--steps 30] [--rounds 3] [--threads N]   -> bench/results/demo-optimizer-cost.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "demo-optimizer-cost.json"
CONFIG = ROOT / "configs" / "demo-cpu.yaml"
ARMS = {"adamw": ["optim.name=adamw"], "muon": [], "muon-bf16": ["optim.muon.ns_dtype=bf16"]}
LOG_EVERY = 5


def phiforge(*args) -> list[str]:
    return [sys.executable, "-m", "phiforge", *map(str, args)]


def demo_data(work: Path) -> Path:
    """The demo's data (`make demo`'s first two commands), made once in `work`."""
    data, tok = work / "gutenberg-4k", work / "tokenizer-4k"
    if not (data / "index.json").exists():
        for cmd in (phiforge("tokenizer", "train", "--source", "bundled", "--vocab-size", 4096, "--out", tok),
                    phiforge("prepare", "gutenberg", "--source", "bundled", "--tokenizer-dir", tok, "--out", data)):
            subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    return data


def one(arm: str, data: Path, out: Path, steps: int, threads: int) -> dict:
    sets = [f"data.dir={data}", f"out_dir={out}", f"max_steps={steps}", f"log_interval={LOG_EVERY}",
            f"threads={threads}", "progress_bar=false", "tensorboard=false", *ARMS[arm]]
    args = ["train", "--config", CONFIG, "--overwrite", *[a for s in sets for a in ("--set", s)]]
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    subprocess.run(phiforge(*args), check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    start = next(e for e in events if e["event"] == "start")
    trains = [e for e in events if e["event"] == "train"]
    steady = (trains[-1]["elapsed_s"] - trains[0]["elapsed_s"]) / (trains[-1]["step"] - trains[0]["step"])
    return {"wall_s": round(wall, 2), "steady_s_per_step": round(steady, 4), "muon_ns_dtype": start["muon_ns_dtype"],
            "command": " ".join(["phiforge", *map(str, args)]),
            "load_avg_1min": [round(load, 2), round(os.getloadavg()[0], 2)]}


def machine() -> dict:
    from phiforge.train.precision import NATIVE_BF16_FLAGS, cpu_flags, cpu_model, native_bf16

    import torch

    flags = cpu_flags()
    return {"cpu_model": cpu_model(), "native_bf16": native_bf16("cpu"),
            "bf16_flags": sorted(f for f in NATIVE_BF16_FLAGS if f in flags),
            "vector_isa": torch.backends.cpu.get_cpu_capability(), "cpus": os.cpu_count(),
            "torch": torch.__version__, "torch_default_threads": torch.get_num_threads(), "platform": platform.platform()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads per run; 0: torch's default, as `make demo` (on a machine other jobs load, 1 "
                        "keeps a run from waiting at every op for its descheduled second thread)")
    p.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated, of {', '.join(ARMS)}")
    p.add_argument("--work", default=str(ROOT / "runs" / "demo-optimizer-cost"))
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args()
    work, arms = Path(args.work), args.arms.split(",")
    data = demo_data(work)
    runs = {arm: [] for arm in arms}
    for r in range(args.rounds):
        for arm in arms:
            runs[arm].append(one(arm, data, work / "runs" / arm, args.steps, args.threads))
            print(f"round {r + 1} {arm}: {json.dumps(runs[arm][-1])}", flush=True)
    med = {arm: {k: statistics.median(x[k] for x in rs) for k in ("wall_s", "steady_s_per_step")}
           for arm, rs in runs.items()}
    result = {"steps": args.steps, "rounds": args.rounds, "threads": args.threads, "median": med, "runs": runs,
              **machine(),
              "command": "python bench/demo_optimizer_cost.py " + " ".join(sys.argv[1:])}
    if "adamw" in med:
        for arm in (a for a in arms if a != "adamw"):
            result[f"{arm.replace('-', '_')}_vs_adamw"] = {k: med[arm][k] / med["adamw"][k] for k in med[arm]}
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    print(json.dumps({k: v for k, v in result.items() if k.endswith("_vs_adamw") or k == "median"}, indent=1))


if __name__ == "__main__":
    main()
