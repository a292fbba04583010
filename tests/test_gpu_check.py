"""bench/gpu_check.sh, the one GPU check (issue 23 item 6), dry-run on CPU: every check parses its arguments and
runs its setup path on the tiny preset, prints one PASS/FAIL line, and a bad argument makes its check FAIL
without stopping the others."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from engine_helpers import ROOT

SCRIPT = ROOT / "bench" / "gpu_check.sh"
CHECKS = ["env", "parity", "sdpa", "numerics", "compile", "memory", "save-blocking", "throughput"]


def gpu_check(tmp_path, *args, timeout=1500) -> tuple[int, str]:
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable}
    p = subprocess.run(["bash", str(SCRIPT), *args], env=env, cwd=tmp_path, capture_output=True, text=True,
                       timeout=timeout)
    return p.returncode, p.stdout + p.stderr


def lines_by_check(out: str) -> dict[str, tuple[str, str]]:
    found = {}
    for status, name, detail in re.findall(r"^(PASS|FAIL|MISSING) ([\w-]+): (.*)$", out, re.M):
        assert name not in found, f"{name} reported twice:\n{out}"
        found[name] = (status, detail)
    return found


@pytest.mark.slow  # every check's process on a 2-core CPU: minutes under load
def test_dry_run_passes_every_check_and_writes_nothing_under_bench_results(tmp_path):
    before = sorted(p.name for p in (ROOT / "bench" / "results").iterdir())
    rc, out = gpu_check(tmp_path, "--dry-run")
    found = lines_by_check(out)
    assert list(found) == CHECKS, out  # each check once, in order
    for name, (status, detail) in found.items():
        assert status == "PASS", (name, status, detail)
    assert all(impl in found["throughput"][1] for impl in ("phiforge-float8", "litgpt")), found
    last = out.strip().splitlines()[-1]
    assert rc == 0 and last.startswith("gpu_check: PASS"), out
    summary = json.loads((tmp_path / "gpu-check-cpu-dry-run.json").read_text())
    assert [(s["name"], s["status"]) for s in summary["steps"]] == [(n, s) for n, (s, _) in found.items()]
    assert summary["dry_run"] and summary["failed"] == []
    for result in ("gpu-parity", "sdpa-kernel", "gpu-numerics", "gpu-compile", "gpu-memory", "throughput"):
        assert (tmp_path / f"{result}-cpu-dry-run.json").exists(), result
    assert sorted(p.name for p in (ROOT / "bench" / "results").iterdir()) == before


def test_a_check_with_a_bad_argument_fails_alone_and_fails_the_run(tmp_path):
    rc, out = gpu_check(tmp_path, "--dry-run", "--only", "sdpa,save-blocking", "--args", "sdpa=--no-such-flag",
                        timeout=300)
    found = lines_by_check(out)
    assert found["sdpa"][0] == "FAIL" and "--no-such-flag" in found["sdpa"][1], out
    assert found["save-blocking"][0] == "PASS", out  # it still ran after the failure
    assert set(found) == {"sdpa", "save-blocking"}
    assert out.strip().splitlines()[-1] == "gpu_check: FAIL (1 failed)" and rc == 1, out


@pytest.mark.parametrize("args, message", [
    (["--bogus"], "unknown option '--bogus'"),
    (["--only", "nope"], "no check 'nope'"),
    (["--args", "sdpa"], "--args takes name=ARGS"),
    (["--budget", "soon"], "--budget takes whole seconds"),
])
def test_bad_options_are_one_line_errors(tmp_path, args, message):
    rc, out = gpu_check(tmp_path, "--dry-run", *args, timeout=60)
    assert rc == 2 and out.startswith(f"gpu_check: {message}") and len(out.strip().splitlines()) == 1, out
