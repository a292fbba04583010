"""Start-up time of the CLI: `phiforge --help` against `python -c "import torch"`, side by side in one run.

    python bench/cli_startup.py [--rounds 7]    -> bench/results/cli-startup-cpu.json

The two commands alternate, so load on the machine falls on both alike; the medians are compared. Target
(issue 17, item 14): `phiforge --help` at most 0.3x the time of importing torch, because command modules import
torch and other heavy libraries only inside the functions that run a command.
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
COMMANDS = {
    "phiforge --help": [sys.executable, "-m", "phiforge", "--help"],
    "phiforge info --help": [sys.executable, "-m", "phiforge", "info", "--help"],
    "import torch": [sys.executable, "-c", "import torch"],
}


def timed(cmd: list[str]) -> float:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, cwd=ROOT, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--results", default=str(ROOT / "bench" / "results" / "cli-startup-cpu.json"))
    args = ap.parse_args()
    for cmd in COMMANDS.values():  # warm the file cache once
        timed(cmd)
    times: dict[str, list[float]] = {name: [] for name in COMMANDS}
    for _ in range(args.rounds):
        for name, cmd in COMMANDS.items():
            times[name].append(timed(cmd))
    median = {name: statistics.median(t) for name, t in times.items()}
    result = {"bench": "cli_startup", "command": " ".join(["python", "bench/cli_startup.py", *sys.argv[1:]]),
              "rounds": args.rounds, "machine": platform.machine(), "cpus": os.cpu_count(),
              "python": platform.python_version(), "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
              "seconds": times, "median_s": median,
              "help_vs_import_torch": median["phiforge --help"] / median["import torch"],
              "target": "help_vs_import_torch <= 0.3"}
    result["pass"] = result["help_vs_import_torch"] <= 0.3
    Path(args.results).parent.mkdir(parents=True, exist_ok=True)
    Path(args.results).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("median_s", "help_vs_import_torch", "pass")}, indent=2))


if __name__ == "__main__":
    main()
