"""Data pipeline throughput and memory: `phiforge prepare redpajama` vs the raw tokenizer, and peak RSS at 1 GB.

    python bench/data_throughput.py                       # 48 MB throughput comparison + 1 GB RSS run
    python bench/data_throughput.py --rss-gb 0            # throughput only
    python bench/data_throughput.py --throughput-mb 8 --rss-gb 0.05 --out /tmp/x.json   # a quick check

1. Throughput. A RedPajama-format corpus (book/ + github/ JSON lines) is generated from the bundled books and
   the standard-library sources, repeated with variations (tests/data_fixtures.py make_bench_corpus). On the
   same documents, in the same run, alternating, best of --rounds:
     raw       `tokenizers` encode_batch (and encode_batch_fast) of the documents, in batches of about 1 MB,
               with the library's own thread pool on all cores; the JSON is parsed beforehand (not timed)
     pipeline  `python -m phiforge prepare redpajama --input ... --workers N` as a subprocess, timed wall clock
               from start to exit: reading and parsing the JSON, tokenizing in N worker processes, packing into
               shards, documents.jsonl, checksums, index -- interpreter start-up included
   throughput = characters of document text / seconds. The target: pipeline >= 80% of raw encode_batch.
2. Memory. The same generator writes --rss-gb of input, and `prepare redpajama` runs over it as a subprocess
   while this script samples the resident memory of its whole process tree (main + workers, from /proc) every
   0.2 s; `getrusage(RUSAGE_CHILDREN).ru_maxrss` (the largest single process) is recorded too. Target: < 1.5 GB.

Writes JSON (machine, command, numbers) to bench/results/data-throughput.json (--out).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "tests"))  # the corpus generator lives with the test fixtures

from data_fixtures import make_bench_corpus  # noqa: E402
from phiforge.tokenizer import builtin_tokenizer  # noqa: E402


def machine() -> dict:
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = 0
    try:
        mem = int(Path("/proc/meminfo").read_text().split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    import numpy
    import tokenizers

    return {"platform": platform.platform(), "python": platform.python_version(), "cpu": cpu,
            "cores": os.cpu_count(), "memory_gb": round(mem / 2**30, 1), "tokenizers": tokenizers.__version__,
            "numpy": numpy.__version__, "loadavg_at_start": os.getloadavg()}


def load_texts(d: Path) -> list[str]:
    texts = []
    for p in sorted(d.rglob("*.jsonl")):
        with open(p, encoding="utf-8") as f:
            texts.extend(json.loads(line)["text"] for line in f)
    return texts


def raw_encode(texts: list[str], fast: bool) -> float:
    tok = builtin_tokenizer()
    fn = tok.encode_batch_fast if fast else tok.encode_batch
    fn(texts[:8], add_special_tokens=False)  # warm-up (thread pool)
    t0 = time.perf_counter()
    batch, chars, n_tokens = [], 0, 0
    for t in texts:
        batch.append(t)
        chars += len(t)
        if chars >= 1 << 20:
            n_tokens += sum(len(e.ids) for e in fn(batch, add_special_tokens=False))
            batch, chars = [], 0
    if batch:
        n_tokens += sum(len(e.ids) for e in fn(batch, add_special_tokens=False))
    return time.perf_counter() - t0, n_tokens


def tree_rss(pid: int) -> int:
    """Resident bytes of a process and all its descendants (Linux /proc)."""
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(d.name))
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        todo.extend(children.get(p, []))
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            pass
    return total


DRIVER = ("import argparse, sys; from phiforge.commands import prepare as p; ap = argparse.ArgumentParser(); "
          "p.register(ap.add_subparsers()); a = ap.parse_args(sys.argv[1:]); sys.exit(a.func(a))")


def run_prepare(inp: Path, out: Path, workers: int, sample: bool = False, full_cli: bool = False) -> dict:
    args = ["prepare", "redpajama", "--input", str(inp), "--out", str(out), "--val-fraction", "0.01", "--restart"] \
        + (["--workers", str(workers)] if workers is not None else [])
    # `phiforge prepare`'s own parser and code (phiforge.commands.prepare), without the CLI's other command groups,
    # one of which imports torch (~2-3 s of start-up that has nothing to do with data); full_cli=True runs the CLI
    cmd = [sys.executable, "-m", "phiforge"] + args if full_cli else [sys.executable, "-c", DRIVER] + args
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    peak = 0
    while proc.poll() is None:
        if sample:
            peak = max(peak, tree_rss(proc.pid))
        time.sleep(0.2)
    seconds = time.perf_counter() - t0
    output = proc.stdout.read().decode(errors="replace")
    if proc.returncode != 0:
        raise SystemExit(f"prepare failed ({proc.returncode}):\n{output[-3000:]}")
    report = json.loads((out / "prepare-report.json").read_text())
    return {"command": " ".join(cmd), "seconds": seconds, "peak_tree_rss_bytes": peak, "report": report,
            "output_tail": output[-600:]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--throughput-mb", type=float, default=48.0)
    ap.add_argument("--rss-gb", type=float, default=1.0)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--workers", type=int, default=None, help="prepare --workers (default: all cores)")
    ap.add_argument("--tmp", default=None, help="scratch directory (default: a temp dir, removed at the end)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "data-throughput.json"))
    args = ap.parse_args()
    tmp = Path(args.tmp) if args.tmp else Path(tempfile.mkdtemp(prefix="phiforge-bench-"))
    result = {"bench": "data_throughput", "command": " ".join([Path(sys.executable).name] + sys.argv),
              "machine": machine(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    try:
        if args.throughput_mb > 0:
            inp = tmp / "tp-input"
            shutil.rmtree(inp, ignore_errors=True)
            stats = make_bench_corpus(inp, int(args.throughput_mb * 2**20))
            texts = load_texts(inp)
            chars = sum(map(len, texts))
            rounds = []
            for r in range(args.rounds):
                raw_s, raw_tokens = raw_encode(texts, fast=False)
                fast_s, _ = raw_encode(texts, fast=True)
                pipe = run_prepare(inp, tmp / "tp-out", args.workers)
                tokens = pipe["report"]["kept"]["tokens"]
                rounds.append({"raw_encode_batch_s": raw_s, "raw_encode_batch_fast_s": fast_s,
                               "pipeline_wall_s": pipe["seconds"],
                               "pipeline_inside_prepare_s": pipe["report"]["timing"]["seconds"],
                               "raw_tokens": raw_tokens, "pipeline_tokens": tokens})
                print(f"round {r}: raw encode_batch {chars / raw_s / 1e6:.2f} MB/s, encode_batch_fast "
                      f"{chars / fast_s / 1e6:.2f} MB/s, prepare {chars / pipe['seconds'] / 1e6:.2f} MB/s "
                      f"(wall, incl. start-up)", flush=True)
            cli = run_prepare(inp, tmp / "tp-out", args.workers, full_cli=True)
            print(f"full CLI (python -m phiforge, with its torch import): {chars / cli['seconds'] / 1e6:.2f} MB/s",
                  flush=True)
            best_raw = min(x["raw_encode_batch_s"] for x in rounds)
            best_fast = min(x["raw_encode_batch_fast_s"] for x in rounds)
            best_pipe = min(x["pipeline_wall_s"] for x in rounds)
            ratio = best_raw / best_pipe
            result["throughput"] = {
                "input": stats, "text_chars": chars, "documents": len(texts), "command": pipe["command"],
                "rounds": rounds,
                "raw_encode_batch_chars_per_s": round(chars / best_raw),
                "raw_encode_batch_fast_chars_per_s": round(chars / best_fast),
                "pipeline_chars_per_s": round(chars / best_pipe),
                "pipeline_tokens_per_s": round(rounds[0]["pipeline_tokens"] / best_pipe),
                "full_cli_command": cli["command"], "full_cli_wall_s": round(cli["seconds"], 2),
                "full_cli_chars_per_s": round(chars / cli["seconds"]),
                "ratio_vs_encode_batch": round(ratio, 3),
                "ratio_vs_encode_batch_fast": round(best_fast / best_pipe, 3),
                "target": ">= 0.8 of raw encode_batch", "pass": ratio >= 0.8,
                "note": "the extra EOT per document makes pipeline_tokens = raw_tokens + documents",
            }
            print(f"throughput: prepare = {ratio:.0%} of raw encode_batch "
                  f"({best_fast / best_pipe:.0%} of encode_batch_fast)", flush=True)
            shutil.rmtree(inp, ignore_errors=True)
            shutil.rmtree(tmp / "tp-out", ignore_errors=True)
        if args.rss_gb > 0:
            inp = tmp / "rss-input"
            shutil.rmtree(inp, ignore_errors=True)
            t0 = time.perf_counter()
            stats = make_bench_corpus(inp, int(args.rss_gb * 2**30))
            gen_s = time.perf_counter() - t0
            pipe = run_prepare(inp, tmp / "rss-out", args.workers, sample=True)
            maxrss_children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
            rep = pipe["report"]
            out_bytes = sum(p.stat().st_size for p in (tmp / "rss-out").iterdir())
            result["memory"] = {
                "input": stats, "generate_seconds": round(gen_s, 1), "command": pipe["command"],
                "prepare_seconds": round(pipe["seconds"], 1), "tokens": rep["kept"]["tokens"],
                "documents": rep["kept"]["documents"], "output_bytes": out_bytes,
                "tokens_per_s": round(rep["kept"]["tokens"] / pipe["seconds"]),
                "input_bytes_per_s": round(stats["bytes"] / pipe["seconds"]),
                "peak_tree_rss_bytes": pipe["peak_tree_rss_bytes"],
                "peak_tree_rss_gb": round(pipe["peak_tree_rss_bytes"] / 2**30, 3),
                "max_single_process_rss_gb": round(maxrss_children / 2**30, 3),
                # the sampled tree can miss a short peak; ru_maxrss cannot (it also covers this script's earlier
                # children), so the target holds only if both are under it
                "target": "< 1.5 GB", "pass": max(pipe["peak_tree_rss_bytes"], maxrss_children) < 1.5 * 2**30,
            }
            print(f"memory: {stats['bytes'] / 2**30:.2f} GB input, prepare {pipe['seconds']:.0f} s, peak RSS of "
                  f"the process tree {pipe['peak_tree_rss_bytes'] / 2**30:.2f} GB, largest process "
                  f"{maxrss_children / 2**30:.2f} GB", flush=True)
    finally:
        if not args.tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    result["machine"]["loadavg_at_end"] = os.getloadavg()
    result["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
