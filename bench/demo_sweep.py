"""Which recipe learns fastest in `make demo`'s training time on 2 CPU cores (issue 13, item 3).

Every run is its own `phiforge train` process on the bundled books (Persuasion held out), AdamW, and is scored
by bits per byte over the whole held-out book (every full window of the run's seq_len, document separators
left out, as `phiforge eval` does), from the final checkpoint. Tokenizers are compared by bits per byte only.

Time is CPU time. The machine is shared with other jobs (load average 5-8 on 2 cores during this sweep), so
wall time measures the load more than the recipe: a 2-thread run of a small model waits at every op for its
descheduled second thread (20x slower than on an idle machine, against 4x for the baseline's large matmuls).
So every run uses one torch thread, and its clock (`time.perf_counter`, which the engine's `elapsed_s` reads) is
the process's CPU time: a run's training seconds are the CPU seconds from the end of the step-0 validation to
the last step (validations and checkpoint saves inside the run are switched off for every run, the baseline
included). The baseline is the demo of the time, now configs/demo-cpu-gpt2.yaml (300 steps), in the same sweep.
A candidate gets the steps that cost `fraction` x the baseline's CPU seconds, from a 30-step probe of each (CPU seconds per step
after the first logged step). On an idle 2-core machine both use 2 threads; `--check NAME` measures that wall
time ratio with alternating 2-thread probes, in whatever load there is.

    python bench/demo_sweep.py                          # every run not yet in the results
    python bench/demo_sweep.py --scale 0.25             # screen at a quarter of the budget (NAME@0.25)
    python bench/demo_sweep.py --only baseline,v8k-d192-l6 --redo
    python bench/demo_sweep.py --check v8k-d128-l4      # 2-thread wall time per step vs the baseline's

Results: bench/results/demo-sweep.json (runs keyed by name; a re-run replaces its record; several invocations
may run at once).
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
sys.path.insert(0, str(ROOT / "src"))
RESULTS = ROOT / "bench" / "results" / "demo-sweep.json"
DEMO = ROOT / "configs" / "demo-cpu-gpt2.yaml"  # the demo before issue 13: the baseline
QUIET = ["eval_batches=1", "save_interval=0", "progress_bar=false", "tensorboard=false", "log_interval=10"]
THREADS = ["threads=1"]  # --threads: every run of a sweep uses the same (see the docstring)
CPU_CLOCK = ("import sys, time; time.perf_counter = time.process_time; from phiforge.cli import main; "
             "sys.exit(main(sys.argv[1:]))")
TOKENIZERS = {"gpt2": None, "v8k": 8192, "v4k": 4096, "v16k": 16384}


def shape(d: int, layers: int, heads: int | None = None) -> list[str]:
    return [f"model.n_embd={d}", f"model.n_layer={layers}", f"model.n_head={heads or max(1, d // 32)}",
            f"model.intermediate_size={4 * d}"]


# name -> (tokenizer, fraction of the baseline's seconds or a fixed step count, --set overrides over DEMO)
RUNS: dict[str, tuple[str, float | int, list[str]]] = {
    "baseline": ("gpt2", 300, []),
    # the tokenizer alone: the same model and steps (bits per byte, not loss per token, compares them)
    "v8k-same-steps": ("v8k", 300, []),
    # the demo's body (4 layers, d=128) for the baseline's time: tokenizer size
    "v8k-d128-l4": ("v8k", 1.0, []),
    "v4k-d128-l4": ("v4k", 1.0, []),
    "v16k-d128-l4": ("v16k", 1.0, []),
    # width / depth
    "v8k-d128-l8": ("v8k", 1.0, shape(128, 8)),
    "v8k-d192-l4": ("v8k", 1.0, shape(192, 4)),
    "v8k-d192-l6": ("v8k", 1.0, shape(192, 6)),
    "v8k-d256-l6": ("v8k", 1.0, shape(256, 6)),
    # lr, batch / seq_len, schedule
    "v8k-d128-l4-lr6e-3": ("v8k", 1.0, ["optim.lr=6e-3"]),
    "v8k-d128-l4-lr1e-2": ("v8k", 1.0, ["optim.lr=1e-2"]),
    "v8k-d128-l4-b16": ("v8k", 1.0, ["micro_batch_size=16"]),
    "v8k-d128-l4-s256": ("v8k", 1.0, ["data.seq_len=256"]),
    "v8k-d128-l4-wsd": ("v8k", 1.0, ["optim.schedule=wsd"]),
    # steps from the CPU seconds per step of the full runs above (their 30-step probes were up to 30% off)
    "v4k-d128-l4-2040": ("v4k", 2040, []),
    "v4k-d128-l4-b16-1020": ("v4k", 1020, ["micro_batch_size=16"]),
    "v4k-d128-l4-1900": ("v4k", 1900, []),
    "v4k-d128-l4-wsd-1900": ("v4k", 1900, ["optim.schedule=wsd"]),
}


def sh(cmd: list[str]) -> None:
    subprocess.run(cmd, check=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
                   stdout=subprocess.DEVNULL)


def phiforge(*args) -> list[str]:
    return [sys.executable, "-m", "phiforge", *map(str, args)]


def dataset(work: Path, tok: str) -> Path:
    """The bundled books prepared with tokenizer `tok` (trained first when it is not GPT-2's); made once."""
    data = work / f"data-{tok}"
    if (data / "index.json").exists():
        return data
    extra = []
    if TOKENIZERS[tok]:
        tdir = work / f"tokenizer-{tok}"
        sh(phiforge("tokenizer", "train", "--source", "bundled", "--vocab-size", TOKENIZERS[tok], "--out", tdir))
        extra = ["--tokenizer-dir", tdir]
    sh(phiforge("prepare", "gutenberg", "--source", "bundled", *extra, "--out", data))
    return data


def train(run: Path, data: Path, vocab: int | None, sets: list[str], cpu_clock: bool = True) -> tuple[dict, str]:
    """One `phiforge train` process; (its timing and final state, the command)."""
    sets = [f"data.dir={data}", f"out_dir={run}", *QUIET, *([f"model.vocab_size={vocab}"] if vocab else []), *sets]
    args = ["train", "--config", str(DEMO), "--overwrite", *[a for s in sets for a in ("--set", s)]]
    cmd = [sys.executable, "-c", CPU_CLOCK, *args] if cpu_clock else phiforge(*args)
    load = os.getloadavg()[0]
    proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
    events = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    start = next(e for e in events if e["event"] == "eval")
    trains = [e for e in events if e["event"] == "train"]
    seconds = trains[-1]["elapsed_s"] - start["elapsed_s"]
    # steady cost: from the first logged step on (the first steps warm up allocators and caches)
    steady = (trains[-1]["elapsed_s"] - trains[0]["elapsed_s"]) / (trains[-1]["step"] - trains[0]["step"])
    shown = " ".join(["phiforge", *args]) + ("  (clock: CPU time, see bench/demo_sweep.py)" if cpu_clock else "")
    return {"steps": trains[-1]["step"], "tokens": trains[-1]["tokens"], "train_s": round(seconds, 2),
            "tokens_per_s": round(trains[-1]["tokens"] / seconds, 1), "s_per_step": round(steady, 5),
            "params": next(e for e in events if e["event"] == "start")["params"],
            "load_avg_1min": [round(load, 2), round(os.getloadavg()[0], 2)]}, shown


def full_book_bpb(run: Path, data: Path, seq_len: int) -> dict:
    """Bits per byte (and nats per token) of the final checkpoint over every full window of the val split."""
    import torch

    from phiforge.model_files import load_checkpoint, resolve_checkpoint
    from phiforge.data.loader import eval_batches
    from phiforge.tokenizer import eot_id, load_tokenizer, token_byte_lengths
    from phiforge.train.validation import evaluate

    threads = int(THREADS[0].split("=")[1])
    if threads:
        torch.set_num_threads(threads)
    model = load_checkpoint(resolve_checkpoint(run))
    batches = eval_batches(data, "val", seq_len, 8, 10**6)
    tok = load_tokenizer(data)
    token_bytes = torch.tensor(token_byte_lengths(tok), dtype=torch.float64)
    val = evaluate(model, batches, None, token_bytes, eot_id(tok))
    tokens = sum(int(y.numel()) for _, y in batches)
    return {"val_bpb": round(val["val_bpb"], 4), "val_loss_per_token": round(val["val_loss"], 4),
            "val_tokens": tokens}


def probe(work: Path, name: str, steps: int = 30, cpu_clock: bool = True) -> dict:
    """`steps` steps of run `name`: one thread on the CPU clock, else torch's default threads on the wall clock."""
    tok, _, sets = RUNS[name]
    extra = (THREADS if cpu_clock else ["threads=0"]) + [f"max_steps={steps}", "optim.warmup_steps=2",
                                                         f"log_interval={steps // 6}"]
    out = work / "probes" / f"{name}-{os.getpid()}"
    return train(out, dataset(work, tok), TOKENIZERS[tok], sets + extra, cpu_clock)[0]


def fit_steps(work: Path, name: str, fraction: float) -> tuple[int, dict]:
    """Steps whose CPU seconds are `fraction` of the baseline's 300 steps, from probes of both."""
    base = probe(work, "baseline")
    mine = probe(work, name)
    budget = fraction * RUNS["baseline"][1] * base["s_per_step"]
    return max(20, int(budget / mine["s_per_step"])), {
        "probe_s_per_step": mine["s_per_step"], "probe_baseline_s_per_step": base["s_per_step"],
        "budget_fraction": fraction, "planned_train_s": round(budget, 1)}


def run_one(name: str, work: Path, scale: float = 1.0) -> dict:
    """Run `name` (a fitted one at `scale` x its budget fraction: key name@scale) and record it."""
    tok, amount, sets = RUNS[name]
    key = name if scale == 1 or isinstance(amount, int) else f"{name}@{scale:g}"
    data, vocab = dataset(work, tok), TOKENIZERS[tok]
    steps, fit = (amount, {}) if isinstance(amount, int) else fit_steps(work, name, amount * scale)
    warmup = 30 if steps == 300 else max(5, steps // 10)  # the demo's 10 %
    sets = sets + THREADS + [f"max_steps={steps}", f"eval_interval={steps}", f"optim.warmup_steps={warmup}"]
    timing, cmd = train(work / "runs" / key, data, vocab, sets)
    seq_len = next((int(s.split("=")[1]) for s in sets if s.startswith("data.seq_len=")), 128)
    rec = {"name": key, "tokenizer": tok, "vocab": vocab or 51200, "sets": sets, **timing, **fit,
           **full_book_bpb(work / "runs" / key, data, seq_len), "command": cmd,
           "when": time.strftime("%Y-%m-%d %H:%M:%S")}
    results = save(key, rec)
    base = results["runs"].get("baseline")
    if base is not None:
        rec["time_ratio_to_baseline"] = round(rec["train_s"] / base["train_s"], 3)
        rec["bpb_change_vs_baseline"] = round(rec["val_bpb"] / base["val_bpb"] - 1, 4)
        save(key, rec)
    print(f"{key:<26} steps {rec['steps']:>5} tokens {rec['tokens']:>9,} train {rec['train_s']:>6.1f} CPU-s "
          f"(x{rec.get('time_ratio_to_baseline', float('nan')):.2f}) {rec['tokens_per_s']:>8,.0f} tok/CPU-s  "
          f"val bpb {rec['val_bpb']:.4f} ({100 * rec.get('bpb_change_vs_baseline', float('nan')):+.1f}%)",
          flush=True)
    return rec


def save(key: str | None = None, rec: dict | None = None, **top) -> dict:
    """Merge one record (and top-level fields) into the results file under a lock; return the results."""
    import fcntl

    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    with open(Path(tempfile.gettempdir()) / "phiforge-demo-sweep.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {"runs": {}}
        results.update(top)
        if key is not None:
            results["runs"][key] = rec
        tmp = RESULTS.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(results, indent=1) + "\n")
        tmp.replace(RESULTS)
    return results


def check(work: Path, name: str, rounds: int = 3) -> dict:
    """2-thread wall seconds per step of `name` and of the baseline, probes alternating (B A B A ...)."""
    pairs = []
    for _ in range(rounds):
        b = probe(work, "baseline", 16, cpu_clock=False)["s_per_step"]
        a = probe(work, name, 30, cpu_clock=False)["s_per_step"]
        pairs.append({"baseline_s_per_step": b, "s_per_step": a, "ratio": round(a / b, 4)})
    ratios = sorted(p["ratio"] for p in pairs)
    return {"threads": "torch default (2)", "clock": "wall", "pairs": pairs, "median_ratio": ratios[len(ratios) // 2],
            "load_avg_1min": round(os.getloadavg()[0], 2), "when": time.strftime("%Y-%m-%d %H:%M:%S")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "demo-sweep", help="datasets and runs")
    ap.add_argument("--only", help="comma-separated run names (default: all)")
    ap.add_argument("--redo", action="store_true", help="run again runs already in the results")
    ap.add_argument("--scale", type=float, default=1.0,
                    help="scale every fitted budget, e.g. 0.25 to screen (recorded as NAME@0.25)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of every run (0: torch's default)")
    ap.add_argument("--check", metavar="NAMES", help="only measure these runs' 2-thread wall time per step against "
                    "the baseline's (alternating probes)")
    ap.add_argument("--list", action="store_true")
    args = ap.parse_args()
    THREADS[:] = [f"threads={args.threads}"]
    if args.list:
        print("\n".join(f"{k}: {v}" for k, v in RUNS.items()))
        return
    save(machine=f"{platform.machine()}, {os.cpu_count()} cores (shared)", demo_config=DEMO.name,
         threads=args.threads, clock="CPU time of the run's process (see the docstring)")
    if args.check:
        for name in args.check.split(","):
            rec = {"check": check(args.work, name)}
            save(f"check:{name}", rec)
            print(f"check:{name}", json.dumps(rec["check"]), flush=True)
        return
    names = args.only.split(",") if args.only else list(RUNS)
    for name in names:
        if name not in RUNS:
            raise SystemExit(f"unknown run {name!r} (see --list)")
        key = name if args.scale == 1 or isinstance(RUNS[name][1], int) else f"{name}@{args.scale:g}"
        if args.redo or key not in save()["runs"]:
            run_one(name, args.work, args.scale)


if __name__ == "__main__":
    main()
