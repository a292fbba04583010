"""How fast every rank ends when one rank fails, and what rank 0's console says (docs/training.md, "When a rank
fails"): 2 gloo ranks of configs/cpu-fsdp-test.yaml (FSDP2), a fault on rank 1 alone in step 3.

    python bench/fail_together.py        -> bench/results/fail-together-cpu.json

Scenarios: an exception (raise@3) and the CPU allocator failing (cpu_oom@3) with the ranks started directly
from the environment variables, as `srun` starts them; a torch.OutOfMemoryError (oom@3) under torchrun; a hang
(hang@3) with parallel.collective_timeout_s=15. Times are seconds from rank 0's last metrics write before the
fault (the hang: from the moment rank 1 hangs) to each process's end, as tests/engine_helpers.wait_all sees it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from engine_helpers import make_synthetic, run_train, start_direct, wait_all  # noqa: E402

SETS = ("max_steps=6", "eval_interval=100", "save_interval=0", "log_interval=1", "tensorboard=false")
SCENARIOS = [  # (name, launcher, PHIFORGE_FAULT, extra --set)
    ("exception", "direct", "raise@3,rank=1", ()),
    ("cpu out of memory", "direct", "cpu_oom@3,rank=1", ()),
    ("out of memory", "torchrun", "oom@3,rank=1", ()),
    ("hang, collective_timeout_s=15", "direct", "hang@3,rank=1", ("parallel.collective_timeout_s=15",)),
]


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def errors(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("phiforge: error:")]


def direct(data: Path, work: Path, fault: str, sets) -> dict:
    run = work / "run"
    procs = start_direct(2, data, run, work / "logs", *SETS, *sets, fault=fault)
    ends = wait_all(procs)
    hang = run / "fault-hang"
    since = hang.stat().st_mtime if hang.exists() else (run / "metrics.jsonl").stat().st_mtime
    err = [(work / "logs" / f"rank-{r}.err").read_text() for r in range(2)]
    return {"exit_codes": [p.returncode for p in procs], "rank0_gone_s": ends[0] - since,
            "rank1_gone_s": ends[1] - since, "since": "the hang" if hang.exists() else "the last metrics write",
            "rank0_errors": errors(err[0]), "rank1_stderr_lines": len(err[1].splitlines())}


def torchrun(data: Path, work: Path, fault: str, sets) -> dict:
    p = run_train(2, data, work / "run", *SETS, *sets, fault=fault, check=False)
    ended = time.time()
    since = (work / "run" / "metrics.jsonl").stat().st_mtime
    return {"exit_codes": [p.returncode], "torchrun_gone_s": ended - since, "since": "the last metrics write",
            "errors": errors(p.stderr), "connection_closed_shown": "Connection closed" in p.stderr}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", default=str(ROOT / "bench" / "results" / "fail-together-cpu.json"))
    args = ap.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data = make_synthetic(Path(tmp) / "data")
        for i, (name, launcher, fault, sets) in enumerate(SCENARIOS):
            work = Path(tmp) / f"s{i}"
            row = (direct if launcher == "direct" else torchrun)(data, work, fault, sets)
            rows.append({"scenario": name, "launcher": launcher, "fault": fault, "sets": list(sets), **row})
            print(json.dumps(rows[-1]))
    out = {"cpu": cpu_model(), "cpus": os.cpu_count(), "load_average": os.getloadavg(),
           "torch": __import__("torch").__version__, "config": "configs/cpu-fsdp-test.yaml", "sets": list(SETS),
           "results": rows}
    Path(args.results).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
