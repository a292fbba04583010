"""Built-in `phiforge eval` harness vs lm-evaluation-harness's `hf` model: same checkpoint, same task, one run.

The task: N multiple-choice questions made from the bundled held-out book (Persuasion): 3 sentences of context,
the true next sentence and 3 other sentences of the book as choices (HellaSwag's shape), as a local JSONL file
and a local lm-eval YAML (`dataset_path: json`). The model: the `small` preset (14M parameters, 50k vocabulary,
512 context) with seeded random weights, or --checkpoint. Both harnesses score the same requests in fp32 on the
CPU with --threads torch threads (default 2); rounds alternate between them so load from other processes hits
both alike, and the median is kept. lm-eval
is timed for each --lm-eval-batch-sizes value and the speedup is against its fastest; its model (HFLM) is built
before the clock starts, and so is ours; both times include building the task's requests from the file.

    python bench/eval.py                       # 100 questions, 3 rounds (a few minutes on 2 cores)

Writes bench/results/eval-cpu.json: both times, the batch sizes, both harnesses' acc / acc_norm (they must be
equal) and `speedup_vs_lm_eval` = fastest lm-eval time / built-in time.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from moe import device_name  # bench/moe.py: the CPU or GPU name with the thread count

ROOT = Path(__file__).resolve().parents[1]


def make_task(work: Path, n: int, seed: int) -> Path:
    """N next-sentence questions from the held-out book of the bundled Gutenberg dataset."""
    from phiforge.cli import main
    from phiforge.evaluation.cloze import document_texts, sentences
    from phiforge.evaluation.harness import mc_task_yaml

    data = work / "data"
    assert main(["prepare", "gutenberg", "--source", "bundled", "--out", str(data)]) == 0
    sents = [s for _, text in document_texts(data, "val") for s in sentences(text) if 5 <= len(s.split()) <= 30]
    rng = random.Random(seed)
    rows = []
    for start in rng.sample(range(len(sents) - 4), n):
        choices = [sents[start + 3], *rng.sample(sents, 3)]
        rng.shuffle(choices)
        rows.append({"context": " ".join(sents[start : start + 3]), "choices": choices,
                     "label": choices.index(sents[start + 3])})
    path = work / "bench_mc.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    (work / "tasks").mkdir()
    (work / "tasks" / "bench_mc.yaml").write_text(mc_task_yaml("bench_mc", path))
    return path


def checkpoint(work: Path, given: str | None) -> Path:
    from phiforge.model import Phi2, Phi2Config
    from phiforge.model_files import resolve_checkpoint, save_checkpoint

    if given:
        return resolve_checkpoint(Path(given))
    torch.manual_seed(0)
    return save_checkpoint(Phi2(Phi2Config.from_preset("small")), work / "ckpt")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--questions", type=int, default=100)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--lm-eval-batch-sizes", default="1,16", help="comma-separated; the speedup uses the fastest")
    p.add_argument("--checkpoint", default=None, help="default: the small preset, seeded random weights")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2,
                   help="torch threads for both harnesses (default 2; 1 gives steadier timings on a busy machine)")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "eval-cpu.json"))
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="phiforge-bench-eval-") as tmp:
        result = run(args, Path(tmp))
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(json.dumps({k: result[k] for k in ("builtin_s", "lm_eval_s", "speedup_vs_lm_eval")}))
    return 0


def run(args, work: Path) -> dict:
    from phiforge.evaluation import evaluate_task, load_for_eval, load_task
    from phiforge.evaluation.harness import import_lm_eval, task_manager
    from phiforge.hf import convert_to_hf

    lm_eval, _ = import_lm_eval()
    from lm_eval.models.huggingface import HFLM

    path, ckpt = make_task(work, args.questions, args.seed), checkpoint(work, args.checkpoint)
    convert_to_hf(ckpt, work / "hf", dtype="float32")
    model, tok = load_for_eval(ckpt, device="cpu", dtype=torch.float32)
    batch_sizes = [int(b) for b in args.lm_eval_batch_sizes.split(",")]
    lms = {b: HFLM(pretrained=str(work / "hf"), batch_size=b, device="cpu", dtype="float32") for b in batch_sizes}
    manager = task_manager(["bench_mc"], work / "tasks")  # indexing lm-eval's task folder: not timed
    ours_t, theirs_t, ours, theirs = [], {b: [] for b in batch_sizes}, None, {}
    for _ in range(args.rounds):
        t = time.perf_counter()
        ours = evaluate_task(model, tok, load_task("mc", path))
        ours_t.append(time.perf_counter() - t)
        for b, lm in lms.items():
            t = time.perf_counter()
            theirs[b] = lm_eval.simple_evaluate(model=lm, tasks=["bench_mc"], task_manager=manager, bootstrap_iters=0,
                                                log_samples=False)["results"]["bench_mc"]
            theirs_t[b].append(time.perf_counter() - t)
    builtin_s = statistics.median(ours_t)
    lm_eval_s = {str(b): statistics.median(ts) for b, ts in theirs_t.items()}
    return {"bench": "eval", "device": device_name(torch.device("cpu")), "torch": torch.__version__,
            "lm_eval": lm_eval.__version__,
            "command": " ".join(["python bench/eval.py", *args.argv]),
            "git": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                  text=True).stdout.strip(),
            "model": f"{args.checkpoint or 'small preset, seeded random weights'} ({model.num_params():,} params, "
                     f"context {model.cfg.max_seq_len})",
            "task": f"{args.questions} next-sentence questions from Persuasion, 4 choices, 0-shot",
            "settings": {"builtin": "one question per step: context once, all choices in one batched forward",
                         "lm_eval_batch_sizes": batch_sizes, "dtype": "float32", "rounds": args.rounds,
                         "threads": torch.get_num_threads(),
                         "timing": "median of rounds, interleaved; models built before timing"},
            "builtin_s": builtin_s, "lm_eval_s": lm_eval_s,
            "speedup_vs_lm_eval": min(lm_eval_s.values()) / builtin_s,
            "builtin": {k: ours[k] for k in ("acc", "acc_norm", "n")},
            "lm_eval_metrics": {b: {"acc": r["acc,none"], "acc_norm": r["acc_norm,none"]} for b, r in theirs.items()}}


if __name__ == "__main__":
    sys.exit(main())
