"""Muon vs AdamW on the bundled Gutenberg books: how many tokens Muon needs to reach AdamW's final validation loss.

Same model, data, batch, schedule and token budget for both; each optimizer at its best learning rate from a
sweep (seed 0, factor-2 grid, widened while the best value sits at an edge), then seeds 1..N at that lr
(model init and data order both change with the seed). Muon runs use one lr for both of its groups (the
matrices, and AdamW's embeddings/head/biases/norms): with adjust_lr_fn=match_rms_adamw that is the Moonshot
recipe, so each optimizer has exactly one tuned knob.

    python bench/muon_vs_adamw.py                      # the recorded run (about an hour on 2 shared CPU cores)
    python bench/muon_vs_adamw.py --steps 30 --seeds 1 --out /tmp/smoke.json   # a smoke run

muon_tokens_ratio: per seed, the tokens at which Muon's validation curve (linear between evaluations) first
reaches that seed's final AdamW validation loss, divided by AdamW's tokens; averaged over the seeds.
Writes the JSON (every run's curve, the sweep table, per-seed numbers, mean and sd, the command) and a PNG of
the curves beside it. Tokens, not seconds, are compared, so load from other processes does not bias it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
# 8 blocks of d=192 (3.5M matrix parameters: what Muon updates) beside an embedding and head over the books'
# 21,656 token ids (vocab 21,696: 8.3M parameters, AdamW in both runs); seq 128, 2,048 tokens per step.
MODEL = {"preset": "small", "n_layer": 8, "n_embd": 192, "n_head": 6, "intermediate_size": 768,
         "max_seq_len": 256}


def base_config(args, data: Path) -> dict:
    from phiforge.data.shards import open_token_dataset

    vocab = -(-open_token_dataset(data).vocab_size // 64) * 64
    return {"model": {**MODEL, "vocab_size": vocab}, "data": {"dir": str(data), "seq_len": 128},
            "optim": {"warmup_steps": max(1, args.steps // 10), "min_lr_ratio": 0.1, "weight_decay": 0.1,
                      "schedule": "cosine"},
            "micro_batch_size": 16, "max_steps": args.steps, "eval_interval": args.eval_interval,
            "eval_batches": args.eval_batches, "save_interval": 0, "keep_checkpoints": 1, "log_interval": 10,
            "device": "cpu", "precision": "fp32", "threads": 1, "progress_bar": False, "tensorboard": False}


def run_config(base: dict, optimizer: str, lr: float, seed: int) -> dict:
    cfg = json.loads(json.dumps(base))
    cfg["optim"]["lr"] = lr
    if optimizer == "muon":  # one lr for the matrices and for the AdamW group
        cfg["optim"].update(name="muon", muon={"lr": lr})
    cfg["seed"] = seed
    cfg["data"]["seed"] = seed
    return cfg


def train(work: Path, name: str, cfg: dict, reuse: bool) -> dict:
    """One `phiforge train` in its own process; its validation curve. With reuse, a finished run of the same
    config is read back instead of run again."""
    run, request = work / "runs" / name, work / "configs" / f"{name}.yaml"
    cfg = {**cfg, "out_dir": str(run)}
    done = run / "metrics.jsonl"
    if not (reuse and request.is_file() and yaml.safe_load(request.read_text()) == cfg and _finished(done)):
        request.parent.mkdir(parents=True, exist_ok=True)
        request.write_text(yaml.safe_dump(cfg), encoding="utf-8")
        t0 = time.time()
        p = subprocess.run([sys.executable, "-m", "phiforge", "train", "--config", str(request), "--overwrite"],
                           cwd=ROOT, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        if p.returncode:
            raise RuntimeError(f"{name} failed:\n{p.stderr[-3000:]}")
        print(f"  {name}: {time.time() - t0:.0f} s", flush=True)
    events = [json.loads(line) for line in done.read_text().splitlines()]
    curve = [[e["tokens"], e["val_loss"]] for e in events if e["event"] == "eval"]
    end = [e for e in events if e["event"] == "end"][-1]
    return {"name": name, "curve": curve, "final_val_loss": curve[-1][1], "tokens": end["tokens"],
            "elapsed_s": end["elapsed_s"]}


def _finished(metrics: Path) -> bool:
    return metrics.is_file() and any(json.loads(line)["event"] == "end" for line in metrics.read_text().splitlines())


def run_many(work: Path, jobs: list[tuple[str, dict]], workers: int, reuse: bool) -> dict[str, dict]:
    with ThreadPoolExecutor(workers) as pool:
        return dict(zip([name for name, _ in jobs], pool.map(lambda job: train(work, *job, reuse), jobs)))


def sweep(work: Path, base: dict, grids: dict[str, list[float]], args) -> dict[str, list[dict]]:
    """Seed-0 runs of each optimizer over its lr grid, all in one pool; while an optimizer's best lr is the
    smallest or largest it tried, it tries the next factor of 2 (up to max_widen more rounds)."""
    runs: dict[str, dict[float, dict]] = {opt: {} for opt in grids}
    todo = {opt: sorted(lrs) for opt, lrs in grids.items()}
    for _ in range(args.max_widen + 1):
        jobs = {f"{opt}-lr{lr:g}-seed0": (opt, lr) for opt, lrs in todo.items() for lr in lrs}
        done = run_many(work, [(n, run_config(base, opt, lr, 0)) for n, (opt, lr) in jobs.items()], args.workers,
                        args.reuse)
        for name, (opt, lr) in jobs.items():
            runs[opt][lr] = done[name]
        todo = {opt: _widen(runs[opt]) for opt in grids}
        if not any(todo.values()):
            break
    return {opt: [{"lr": lr, **r[lr]} for lr in sorted(r)] for opt, r in runs.items()}


def _widen(runs: dict[float, dict]) -> list[float]:
    tried = sorted(runs)
    best = min(tried, key=lambda lr: runs[lr]["final_val_loss"])
    return [best / 2] if best == tried[0] else [best * 2] if best == tried[-1] else []


def compact_vocab(src: Path, out: Path) -> int:
    """`src` (GPT-2 ids) rewritten with ids 0..n-1 for the n token ids the books use; returns n. The 51,200-row
    embedding and head would otherwise be most of the model and of its compute, and Muon touches neither."""
    import numpy as np

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    from phiforge.data.shards import DatasetWriter, open_token_dataset
    from phiforge.tokenizer import EOT, load_tokenizer, tokenizer_sha256

    ds = open_token_dataset(src)
    docs = {split: [tokens for _, tokens in ds.iter_document_tokens(split)] for split in ("train", "val")}
    used = np.unique(np.concatenate([d for split in docs.values() for d in split]))
    new_id = np.zeros(ds.vocab_size, dtype=np.int64)
    new_id[used] = np.arange(len(used))
    # its own tokenizer.json (training refuses a dataset without one): GPT-2's pieces under the new ids, so
    # decoding and bits per byte stay right
    gpt2 = load_tokenizer(src)
    tok = Tokenizer(models.WordLevel({gpt2.id_to_token(int(i)): n for n, i in enumerate(used)}, unk_token=EOT))
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    tok.add_special_tokens([EOT])
    w = DatasetWriter(out, {"name": f"gpt2-bpe restricted to the {len(used)} ids of the bundled books",
                            "vocab_size": len(used), "eot_id": int(new_id[ds.eot_id]),
                            "sha256": tokenizer_sha256(tok), "file": "tokenizer.json"})
    (out / "tokenizer.json").write_text(tok.to_str(), encoding="utf-8")
    for split, split_docs in docs.items():
        for i, tokens in enumerate(split_docs):
            w.add(split, new_id[tokens], id=f"{split}{i}")
    w.finish()
    return len(used)


def tokens_to_reach(curve: list, target: float) -> float | None:
    """First token count at which the curve (linear between evaluations) is at or below target."""
    for (t0, l0), (t1, l1) in zip(curve, curve[1:]):
        if l1 <= target:
            return t0 + (t1 - t0) * (l0 - target) / (l0 - l1) if l0 > target else t0
    return None


def summarize(sweeps: dict, seeds: dict) -> dict:
    per_seed = []
    for a, m in zip(seeds["adamw"], seeds["muon"]):
        target = a["final_val_loss"]
        reach = tokens_to_reach(m["curve"], target)
        per_seed.append({"seed": a["seed"], "adamw_final_val_loss": target, "muon_final_val_loss": m["final_val_loss"],
                         "muon_tokens_to_adamw_final": reach, "adamw_tokens": a["tokens"],
                         "ratio": reach / a["tokens"] if reach is not None else None})
    ratios = [s["ratio"] for s in per_seed]
    stats = {opt: _mean_sd([r["final_val_loss"] for r in runs]) for opt, runs in seeds.items()}
    return {"muon_tokens_ratio": statistics.mean(ratios) if None not in ratios else None,
            "muon_tokens_ratio_sd": statistics.stdev(ratios) if None not in ratios and len(ratios) > 1 else None,
            "per_seed": per_seed, "final_val_loss": stats,
            "best_lr": {opt: min(rows, key=lambda r: r["final_val_loss"])["lr"] for opt, rows in sweeps.items()}}


def _mean_sd(xs: list[float]) -> dict:
    return {"mean": statistics.mean(xs), "sd": statistics.stdev(xs) if len(xs) > 1 else 0.0, "values": xs}


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"adamw": "tab:blue", "muon": "tab:orange"}
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4.5))
    for opt, runs in result["seeds"].items():
        for i, r in enumerate(runs):
            t, l = zip(*r["curve"][1:])
            ax.plot([x / 1e3 for x in t], l, color=colors[opt], alpha=0.8,
                    label=f"{opt} lr {r['lr']:g}" if i == 0 else None)
    ax.axhline(result["summary"]["final_val_loss"]["adamw"]["mean"], color="gray", ls=":", lw=1,
               label="AdamW final (mean)")
    ratio = result["summary"]["muon_tokens_ratio"]
    ax.set(xlabel="tokens (thousands)", ylabel="validation loss",
           title=f"seeds at the best lr; muon_tokens_ratio = {ratio:.2f}" if ratio else "seeds at the best lr")
    ax.legend()
    for opt, rows in result["sweeps"].items():
        bx.plot([r["lr"] for r in rows], [r["final_val_loss"] for r in rows], "o-", color=colors[opt], label=opt)
    bx.set(xscale="log", xlabel="learning rate", ylabel="final validation loss (seed 0)", title="lr sweep")
    bx.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "muon-vs-adamw.json")
    p.add_argument("--work", type=Path, default=ROOT / "runs" / "muon-vs-adamw", help="runs and prepared data")
    p.add_argument("--steps", type=int, default=100, help="optimizer steps per run (2,048 tokens each)")
    p.add_argument("--eval-interval", type=int, default=10)
    p.add_argument("--eval-batches", type=int, default=6)
    p.add_argument("--adamw-lrs", default="1.5e-3,3e-3,6e-3")
    p.add_argument("--muon-lrs", default="3e-3,6e-3,1.2e-2")
    p.add_argument("--max-widen", type=int, default=2, help="extra sweep rounds while the best lr is at an edge")
    p.add_argument("--seeds", type=int, default=3, help="seeds 1..N at each optimizer's best lr")
    p.add_argument("--workers", type=int, default=2, help="runs at once (one thread each)")
    p.add_argument("--reuse", action="store_true", help="keep finished runs of the same config (resume the bench)")
    args = p.parse_args(argv)
    t0 = time.time()
    books, data = args.work / "gutenberg", args.work / "gutenberg-compact"
    if not (books / "index.json").exists():
        subprocess.run([sys.executable, "-m", "phiforge", "prepare", "gutenberg", "--source", "bundled", "--out",
                        str(books)], cwd=ROOT, check=True)
    if not (data / "tokenizer.json").exists():
        compact_vocab(books, data)
    base = base_config(args, data)
    print("lr sweep", flush=True)
    sweeps = sweep(args.work, base, {"adamw": [float(x) for x in args.adamw_lrs.split(",")],
                                     "muon": [float(x) for x in args.muon_lrs.split(",")]}, args)
    best = {opt: min(rows, key=lambda r: r["final_val_loss"])["lr"] for opt, rows in sweeps.items()}
    print(f"seeds 1..{args.seeds} at {best}", flush=True)
    names = {(opt, s): f"{opt}-lr{best[opt]:g}-seed{s}" for s in range(1, args.seeds + 1) for opt in best}
    done = run_many(args.work, [(name, run_config(base, opt, best[opt], s)) for (opt, s), name in names.items()],
                    args.workers, args.reuse)
    seeds = {opt: [{"seed": s, "lr": best[opt], **done[name]} for (o, s), name in names.items() if o == opt]
             for opt in best}
    summary = summarize(sweeps, seeds)
    result = {"muon_tokens_ratio": summary["muon_tokens_ratio"],  # the headline, also in summary
              "command": " ".join(["python", "bench/muon_vs_adamw.py", *map(shlex.quote, sys.argv[1:])]),
              "torch": __import__("torch").__version__, "machine": platform.processor() or platform.machine(),
              "cpus": os.cpu_count(), "wall_s": time.time() - t0, "base_config": base,
              "sweeps": sweeps, "seeds": seeds, "summary": summary}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    plot(result, args.out.with_suffix(".png"))
    s = result["summary"]
    print(json.dumps({k: s[k] for k in ("muon_tokens_ratio", "muon_tokens_ratio_sd", "best_lr", "final_val_loss")},
                     indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
