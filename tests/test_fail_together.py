"""Failing together (issue 23, item 1): a fault on one rank ends every rank within seconds, and rank 0's console
shows the failing rank's own message once, with ranks started directly from the environment variables (as
`srun` starts them) and through torchrun; parallel.collective_timeout_s ends a run whose rank hangs.

The end-to-end tests run 2 gloo ranks of configs/cpu-fsdp-test.yaml (FSDP2) with a fault on rank 1 alone
(PHIFORGE_FAULT=...,rank=1). The moment of the fault is bounded below by the last write to metrics.jsonl
(rank 0 logs every step, and the fault is in the next step)."""

from __future__ import annotations

import json
import os
import time

import pytest
import torch

from engine_helpers import CONFIG, make_synthetic, run_train, start_direct, wait_all

from conftest import run_cli

from phiforge.config import from_dict
from phiforge.errors import ConfigError, OutOfMemory
from phiforge.faults import Faults
from phiforge.tracebacks import set_error_dir
from phiforge.train.config import TrainConfig
from phiforge.train.distributed import DistEnv
from phiforge.train.fail_together import FailTogether, RankFailed

SETS = ("max_steps=6", "eval_interval=100", "save_interval=0", "log_interval=1", "tensorboard=false")
WITHIN_S = 30  # every rank gone this long after the fault, at most


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_synthetic(tmp_path_factory.mktemp("fail") / "synthetic")


def _direct(data, tmp_path, fault: str, *sets: str) -> tuple[list[int], list[str], list[float], float]:
    """Two ranks started directly: (exit codes, stderr texts, end times, the last metrics write)."""
    run = tmp_path / "run"
    procs = start_direct(2, data, run, tmp_path / "logs", *SETS, *sets, fault=fault)
    ends = wait_all(procs, timeout=240)
    errs = [(tmp_path / "logs" / f"rank-{r}.err").read_text() for r in range(2)]
    return [p.returncode for p in procs], errs, ends, (run / "metrics.jsonl").stat().st_mtime


def _errors(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("phiforge: error:")]


def _quiet(text: str) -> bool:
    """No message, no traceback, no C++ warning from a rank that only stopped because another failed."""
    return not _errors(text) and "Traceback" not in text and "Connection closed" not in text and "[W" not in text


@pytest.mark.slow
def test_direct_launch_exception_on_rank_1_ends_both_with_its_message(data, tmp_path):
    codes, errs, ends, fault_after = _direct(data, tmp_path, "raise@3,rank=1")
    assert codes[0] != 0 and codes[1] != 0
    assert max(ends) - fault_after < WITHIN_S, (ends, fault_after)
    report = tmp_path / "run" / "errors" / "rank-1.txt"
    assert _errors(errs[0]) == [
        "phiforge: error: rank 1: RuntimeError: injected failure at step 3 (PHIFORGE_FAULT=raise@3) "
        f"(traceback in {report}; --debug prints it)"], errs[0][-3000:]
    assert _quiet(errs[1]), errs[1][-3000:]
    assert "Traceback (most recent call last)" in report.read_text() and "faults.py" in report.read_text()
    assert not (tmp_path / "run" / "errors" / "rank-0.txt").exists()  # rank 0 did not fail: it was stopped


@pytest.mark.slow
def test_direct_launch_out_of_memory_on_rank_1_ends_both_with_its_advice(data, tmp_path):
    codes, errs, ends, fault_after = _direct(data, tmp_path, "cpu_oom@3,rank=1")
    assert codes[0] != 0 and codes[1] != 0
    assert max(ends) - fault_after < WITHIN_S, (ends, fault_after)
    lines = _errors(errs[0])
    assert len(lines) == 1 and lines[0].startswith("phiforge: error: rank 1: CPU out of memory at step 3 ("), lines
    assert "lower micro_batch_size" in lines[0] and "Connection closed" not in errs[0]
    assert _quiet(errs[1]), errs[1][-3000:]


@pytest.mark.slow
def test_direct_launch_hung_rank_is_ended_after_collective_timeout(data, tmp_path):
    """Rank 1 hangs inside step 3: rank 0 gives up after parallel.collective_timeout_s, says so, and rank 1's
    watchdog ends the hung process."""
    codes, errs, ends, _ = _direct(data, tmp_path, "hang@3,rank=1", "parallel.collective_timeout_s=15")
    hung_at = (tmp_path / "run" / "fault-hang").stat().st_mtime
    assert codes[0] != 0 and codes[1] != 0
    assert ends[0] - hung_at >= 15  # the timeout was the one configured: not earlier
    assert max(ends) - hung_at < 15 + WITHIN_S, (ends, hung_at)
    lines = _errors(errs[0])
    assert len(lines) == 1 and lines[0].startswith(
        "phiforge: error: rank 0: no answer from the other ranks within parallel.collective_timeout_s=15 s"), lines
    assert "Timed out" in lines[0] and "traceback in" in lines[0]
    assert _quiet(errs[1]), errs[1][-3000:]


@pytest.mark.slow
def test_torchrun_out_of_memory_on_rank_1_is_shown_once(data, tmp_path):
    p = run_train(2, data, tmp_path / "run", *SETS, fault="oom@3,rank=1", check=False)
    fault_after = os.path.getmtime(tmp_path / "run" / "metrics.jsonl")
    assert p.returncode != 0
    assert time.time() - fault_after < WITHIN_S
    lines = _errors(p.stderr)
    assert len(lines) == 1 and lines[0].startswith("phiforge: error: rank 1: CUDA out of memory at step 3 ("), \
        p.stderr[-4000:]
    assert "Connection closed" not in p.stderr
    root = p.stderr[p.stderr.index("Root Cause"):]
    assert "CUDA out of memory at step 3" in root  # torchrun's summary names it too


# ------------------------------------------------------------------------------------ in-process, no ranks


def _together(rank: int, tmp_path) -> FailTogether:
    """A FailTogether of `rank` in a world of 2 whose store is an in-process HashStore (no watchdog started)."""
    env = DistEnv(rank, 2, rank, 2, torch.device("cpu"), launched=True, owns_group=False,
                  store=torch.distributed.HashStore())
    set_error_dir(tmp_path / "errors")
    return FailTogether(env, 600)


def _record(t: FailTogether) -> dict:
    return json.loads(t.env.store.get(t.key))


def test_first_failure_is_published_and_a_bug_becomes_one_line(tmp_path):
    t = _together(1, tmp_path)
    try:
        instead = t.failed(RuntimeError("boom"))
    finally:
        set_error_dir(None)
    report = tmp_path / "errors" / "rank-1.txt"
    assert isinstance(instead, RankFailed)
    assert str(instead) == f"rank 1: RuntimeError: boom (traceback in {report}; --debug prints it)"
    assert _record(t) == {"rank": 1, "message": str(instead)}
    assert "RuntimeError: boom" in report.read_text()


def test_user_error_is_published_and_kept(tmp_path):
    t = _together(1, tmp_path)
    err = OutOfMemory("CUDA out of memory at step 3 (micro_batch_size=8): lower micro_batch_size")
    try:
        assert t.failed(err) is None  # raised as it is: the CLI prints it (on rank 0 only)
    finally:
        set_error_dir(None)
    assert _record(t)["message"] == "rank 1: CUDA out of memory at step 3 (micro_batch_size=8): lower micro_batch_size"


def test_consequence_of_a_peer_failure_reports_the_peer(tmp_path):
    t = _together(0, tmp_path)
    first = {"rank": 1, "message": "rank 1: CPU out of memory at step 3 (...)"}
    t.env.store.set(t.key, json.dumps(first))
    try:
        instead = t.failed(RuntimeError("[pair.cc:561] Connection closed by peer"))
        own = t.failed(ConfigError("data directory not found: x"))  # the same bad input on every rank
    finally:
        set_error_dir(None)
    assert isinstance(instead, RankFailed) and str(instead) == first["message"]
    assert own is None  # its own message, not the peer's
    assert _record(t) == first  # the first failure stays on record
    assert not (tmp_path / "errors" / "rank-0.txt").exists()


def test_collective_timeout_is_named(tmp_path):
    t = _together(1, tmp_path)
    t.timeout_s = 15.0
    try:
        instead = t.failed(RuntimeError("[unbound_buffer.cc:78] Timed out waiting 15000ms for recv operation"))
    finally:
        set_error_dir(None)
    assert str(instead).startswith("rank 1: no answer from the other ranks within "
                                   "parallel.collective_timeout_s=15 s (one is hung")


def test_world_of_one_changes_nothing(tmp_path):
    env = DistEnv(0, 1, 0, 1, torch.device("cpu"), launched=False, owns_group=True)
    assert FailTogether(env, 600).start().failed(RuntimeError("boom")) is None


def test_faults_on_one_rank_only():
    assert Faults("raise@3,cpu_oom@4,rank=1", rank=0).raise_ == set()
    assert Faults("raise@3,cpu_oom@4,rank=1", rank=0).cpu_oom == set()
    assert Faults("raise@3,cpu_oom@4,rank=1", rank=1).raise_ == {3}
    assert Faults("raise@3", rank=5).raise_ == {3}  # no rank=: every rank
    with pytest.raises(ConfigError, match="cannot parse 'rank=one'"):
        Faults("raise@3,rank=one")


def test_collective_timeout_key(capsys):
    assert TrainConfig().parallel.collective_timeout_s == 600
    code, out, _ = run_cli(capsys, "train", "--config", CONFIG, "--set", "parallel.collective_timeout_s=90",
                           "--print-config")
    assert code == 0 and "\n  collective_timeout_s: 90.0\n" in out
    assert from_dict(TrainConfig, {"parallel": {"collective_timeout_s": 30}}).parallel.collective_timeout_s == 30
    with pytest.raises(ConfigError, match=r"'parallel.collective_timeout_s' must be in \[1, 604800\] seconds, got 0"):
        from_dict(TrainConfig, {"parallel": {"collective_timeout_s": 0}})
