"""`make demo`'s recipe, checked as the demo runs it: wall time on an idle 2-core machine, torch's default threads,
and bits per byte of the held-out book by `phiforge eval` (issue 13, item 3).

bench/demo_sweep.py chose the tokenizer, shape, batch and schedule on a shared machine (one thread, CPU time).
This runs the finalists the way `make demo` does, one after another on the same machine: the demo before this
work (GPT-2's 51,200-token BPE, AdamW; configs/demo-cpu-gpt2.yaml) as the baseline, then each candidate (a
4,096-token BPE trained on the bundled books; AdamW or Muon) as overrides of configs/demo-cpu.yaml, and scores
each final checkpoint with

    phiforge eval --checkpoint RUN --data DATA --split val     (Persuasion, every token once, sliding windows)

Training time is the run's `end` event `elapsed_s` (the training loop with its validations and saves, as the
demo configures them; start-up and the tokenizer/data preparation are not in it and are reported apart).

    python bench/demo_final.py [--only NAME,...]      -> bench/results/demo-final.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "demo-final.json"
PROPOSED = ROOT / "configs" / "demo-cpu.yaml"

# name -> (tokenizer vocabulary or None for GPT-2's, config, --set overrides)
# configs/demo-cpu.yaml before Muon was chosen (batch 8, 1,900 steps, checkpoints every 500): stated here so each
# run means the same thing now that the config holds the chosen recipe
B8 = ["micro_batch_size=8", "max_steps=1900", "optim.warmup_steps=190", "save_interval=500"]
B16 = ["micro_batch_size=16", "max_steps=900", "optim.warmup_steps=90", "save_interval=0"]

# name -> (tokenizer vocabulary or None for GPT-2's, config, --set overrides)
RUNS = {
    "baseline": (None, ROOT / "configs" / "demo-cpu-gpt2.yaml", []),
    # the lr bracket on this model (1,900 steps; save_interval=0: checkpoints only at the end, which changes no
    # number but the time)
    "v4k-adamw": (4096, PROPOSED, [*B8, "optim.name=adamw", "optim.lr=3e-3", "save_interval=0"]),
    "v4k-adamw-lr1.5e-3": (4096, PROPOSED, [*B8, "optim.name=adamw", "optim.lr=1.5e-3", "save_interval=0"]),
    "v4k-adamw-lr6e-3": (4096, PROPOSED, [*B8, "optim.name=adamw", "optim.lr=6e-3", "save_interval=0"]),
    "v4k-muon-lr1.5e-3": (4096, PROPOSED, [*B8, "optim.name=muon", "optim.lr=1.5e-3", "save_interval=0"]),
    "v4k-muon-lr3e-3": (4096, PROPOSED, [*B8, "optim.name=muon", "optim.lr=3e-3", "optim.muon.lr=3e-3"]),
    "v4k-muon-lr1e-2": (4096, PROPOSED, [*B8, "optim.name=muon", "optim.lr=3e-3", "optim.muon.lr=1e-2"]),
    "v4k-muon-lr2e-2": (4096, PROPOSED, [*B8, "optim.name=muon", "optim.lr=3e-3", "optim.muon.lr=2e-2"]),
    # Muon at its best lr in the steps that fit the baseline's training time (a Muon step costs ~1.3 AdamW steps;
    # with mid-run checkpoints, which slow every later CPU step by ~30% (docs/performance.md), 1,300 steps)
    "v4k-muon-1200": (4096, PROPOSED, [*B8, "optim.name=muon", "optim.lr=3e-3", "max_steps=1200",
                                       "optim.warmup_steps=120"]),
    "v4k-muon-1300": (4096, PROPOSED, [*B8, "optim.name=muon", "optim.lr=3e-3", "max_steps=1300",
                                       "optim.warmup_steps=130"]),
    "v4k-muon-1600": (4096, PROPOSED, [*B8, "optim.name=muon", "optim.lr=3e-3", "max_steps=1600",
                                       "optim.warmup_steps=160", "save_interval=0"]),
    # batch 16: half the steps for the same tokens, so half of Muon's per-step Newton-Schulz cost
    "v4k-muon-b16-900": (4096, PROPOSED, [*B16, "optim.name=muon", "optim.lr=3e-3"]),
    "v4k-muon-b16-900-lr4.5e-3": (4096, PROPOSED, [*B16, "optim.name=muon", "optim.lr=4.5e-3"]),
    "v4k-muon-b16-900-lr6e-3": (4096, PROPOSED, [*B16, "optim.name=muon", "optim.lr=6e-3"]),  # = configs/demo-cpu.yaml
}


def run(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def phiforge(*args) -> list[str]:
    return [sys.executable, "-m", "phiforge", *map(str, args)]


def dataset(work: Path, vocab: int | None) -> tuple[Path, float]:
    """The bundled books prepared with GPT-2's tokenizer or a trained one; (dir, seconds it took)."""
    data = work / f"data-{vocab or 'gpt2'}"
    if (data / "index.json").exists():
        return data, 0.0
    seconds, extra = 0.0, []
    if vocab:
        tok = work / f"tokenizer-{vocab}"
        seconds += run(phiforge("tokenizer", "train", "--source", "bundled", "--vocab-size", vocab, "--out", tok))
        extra = ["--tokenizer-dir", tok]
    seconds += run(phiforge("prepare", "gutenberg", "--source", "bundled", *extra, "--out", data))
    return data, seconds


def one(name: str, work: Path) -> dict:
    vocab, config, sets = RUNS[name]
    data, prep_s = dataset(work, vocab)
    out = work / "runs" / name
    sets = [f"data.dir={data}", f"out_dir={out}", "progress_bar=false", *sets]
    args = ["train", "--config", config, "--overwrite", *[a for s in sets for a in ("--set", s)]]
    load = os.getloadavg()[0]
    wall = run(phiforge(*args))
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    end = next(e for e in reversed(events) if e["event"] == "end")
    score = work / f"{name}-eval.json"
    eval_s = run(phiforge("eval", "--checkpoint", out, "--data", data, "--split", "val", "--out", score,
                          "--overwrite"))
    bpb = json.loads(score.read_text())
    return {"command": " ".join(["phiforge", *map(str, args)]), "steps": end["steps"], "tokens": end["tokens"],
            "train_s": round(end["elapsed_s"], 1), "process_s": round(wall, 1), "prepare_s": round(prep_s, 1),
            "eval_s": round(eval_s, 1), "val_bpb": bpb["bpb"], "val_tokens": bpb["tokens"], "val_bytes": bpb["bytes"],
            "val_loss_end": end["val_loss_end"], "load_avg_1min": [round(load, 2), round(os.getloadavg()[0], 2)]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default=",".join(RUNS), help=f"comma-separated, of {', '.join(RUNS)}")
    p.add_argument("--work", default=str(ROOT / "runs" / "demo-final"))
    args = p.parse_args()
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {"runs": {}}
    for name in args.only.split(","):
        results["runs"][name] = one(name, Path(args.work))
        print(name, json.dumps(results["runs"][name]), flush=True)
        base = results["runs"].get("baseline")
        results.update(machine=platform.processor() or platform.machine(), cpus=os.cpu_count(),
                       torch_threads=__import__("torch").get_num_threads(),
                       command="python bench/demo_final.py " + " ".join(sys.argv[1:]))
        if base:
            for rec in results["runs"].values():
                rec["bpb_vs_baseline"] = rec["val_bpb"] / base["val_bpb"] - 1
                rec["train_time_vs_baseline"] = rec["train_s"] / base["train_s"]
        RESULTS.write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
