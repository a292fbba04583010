"""Shared helpers for tests/test_engine*.py: a synthetic token dataset and subprocess runs of the engine
(`python -m phiforge train`, or torchrun for several ranks) on configs/cpu-fsdp-test.yaml."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "cpu-fsdp-test.yaml"
TIMEOUT = 240


def synthetic_tokenizer(vocab: int = 512, prefix: str = "t"):
    """A word-level tokenizer of `vocab` tokens: PREFIX0 ... and <|endoftext|> last (another prefix: another
    tokenizer of the same size)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    from phiforge.tokenizer import EOT

    tok = Tokenizer(models.WordLevel({**{f"{prefix}{i}": i for i in range(vocab - 1)}, EOT: vocab - 1}, unk_token=EOT))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece()
    tok.add_special_tokens([EOT])
    return tok


def make_synthetic(out: Path, vocab: int = 512, train_docs: int = 40, val_docs: int = 4, doc_len: int = 500) -> Path:
    """A learnable token stream: a random sparse Markov chain (each token has 4 possible successors), with its
    tokenizer.json (synthetic_tokenizer) recorded in the index as `prepare` records one."""
    from phiforge.data.shards import DatasetWriter
    from phiforge.tokenizer import tokenizer_sha256

    rng = np.random.default_rng(0)
    nxt = rng.integers(0, vocab - 1, size=(vocab, 4))
    tok = synthetic_tokenizer(vocab)
    w = DatasetWriter(out, {"name": "synthetic", "vocab_size": vocab, "eot_id": vocab - 1,
                            "sha256": tokenizer_sha256(tok), "file": "tokenizer.json"})
    (Path(out) / "tokenizer.json").write_text(tok.to_str(), encoding="utf-8")
    for split, n in (("train", train_docs), ("val", val_docs)):
        for d in range(n):
            t = [int(rng.integers(0, vocab - 1))]
            for _ in range(doc_len - 1):
                t.append(int(nxt[t[-1], rng.integers(0, 4)]))
            t.append(vocab - 1)
            w.add(split, np.array(t), id=f"{split}{d}")
    w.finish()
    return out


def child_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                        "PHIFORGE_FAULT")}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **extra)
    return env


def train_cmd(nproc: int, data: Path, out: Path, *sets: str, resume: str | None = None) -> list[str]:
    if nproc == 1:
        cmd = [sys.executable, "-m", "phiforge", "train"]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "-m", "phiforge", "train"]
    cmd += ["--config", str(CONFIG), "--set", f"data.dir={data}", "--set", f"out_dir={out}"]
    for s in sets:
        cmd += ["--set", s]
    if resume is not None:
        cmd += ["--resume", resume]
    return cmd


def run_train(nproc: int, data: Path, out: Path, *sets: str, resume: str | None = None, fault: str | None = None,
              check: bool = True) -> subprocess.CompletedProcess:
    env = child_env(**({"PHIFORGE_FAULT": fault} if fault else {}))
    p = subprocess.run(train_cmd(nproc, data, out, *sets, resume=resume), env=env, cwd=ROOT, capture_output=True,
                       text=True, timeout=TIMEOUT)
    if check:
        assert p.returncode == 0, f"exit {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}"
    return p


def start_train(nproc: int, data: Path, out: Path, *sets: str, fault: str | None = None,
                resume: str | None = None) -> subprocess.Popen:
    env = child_env(**({"PHIFORGE_FAULT": fault} if fault else {}))
    return subprocess.Popen(train_cmd(nproc, data, out, *sets, resume=resume), env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def start_direct(nproc: int, data: Path, out: Path, logs: Path, *sets: str,
                 fault: str | None = None) -> list[subprocess.Popen]:
    """`nproc` ranks of `phiforge train` started directly from RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and
    MASTER_PORT, as `srun` starts them (no torchrun: rank 0 hosts the store); rank N's stdout and stderr go to
    LOGS/rank-N.out and .err."""
    with socket.socket() as s:  # a free port for rank 0's store
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    logs.mkdir(parents=True, exist_ok=True)
    procs = []
    for rank in range(nproc):
        env = child_env(RANK=str(rank), WORLD_SIZE=str(nproc), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(nproc),
                        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), **({"PHIFORGE_FAULT": fault} if fault else {}))
        with open(logs / f"rank-{rank}.out", "w") as o, open(logs / f"rank-{rank}.err", "w") as e:
            procs.append(subprocess.Popen(train_cmd(1, data, out, *sets), env=env, cwd=ROOT, stdout=o, stderr=e))
    return procs


def wait_all(procs: list[subprocess.Popen], timeout: float = TIMEOUT) -> list[float]:
    """The wall-clock time (time.time()) at which each process was seen to end; kills them all past `timeout`."""
    ends: list[float | None] = [None] * len(procs)
    t0 = time.monotonic()
    while None in ends:
        for i, p in enumerate(procs):
            if ends[i] is None and p.poll() is not None:
                ends[i] = time.time()
        if time.monotonic() - t0 > timeout:
            for p in procs:
                p.kill()
            left = [i for i, e in enumerate(ends) if e is None]
            raise AssertionError(f"still running after {timeout} s: ranks {left}")
        time.sleep(0.05)
    return ends


def wait_for(path_or_fn, proc: subprocess.Popen, timeout: float = TIMEOUT) -> None:
    check = path_or_fn if callable(path_or_fn) else Path(path_or_fn).exists
    t0 = time.monotonic()
    while not check():
        if proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"process exited ({proc.returncode}) before the expected moment\n{out[-2000:]}\n"
                                 f"{err[-4000:]}")
        if time.monotonic() - t0 > timeout:
            proc.kill()
            raise AssertionError("timed out waiting")
        time.sleep(0.05)


def kill9(proc: subprocess.Popen) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=60)


def kill9_inside(step: int, data: Path, run: Path, *sets: str) -> None:
    """Start a 1-process run that hangs inside `step` (after its backward pass), wait for the hang, kill -9 it."""
    proc = start_train(1, data, run, *sets, fault=f"hang@{step}")
    wait_for(run / "fault-hang", proc)
    kill9(proc)


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(run) / "metrics.jsonl").read_text().splitlines()]


def losses(run: Path) -> dict[int, float]:
    """step -> train loss (log_interval 1); a resumed run's later record of a step wins."""
    return {e["step"]: e["loss"] for e in metrics(run) if e["event"] == "train"}


def max_rel_diff(a: dict[int, float], b: dict[int, float], steps) -> float:
    return max(abs(a[s] - b[s]) / abs(a[s]) for s in steps)


# `--set` overrides for each activation-checkpointing mode, and compile on top (the tests compare each with "none")
AC_VARIANTS = {
    "none": [],
    "full": ["parallel.activation_checkpointing=full"],
    "every2": ["parallel.activation_checkpointing=selective", "parallel.ac_every=2"],
    "op": ["parallel.activation_checkpointing=selective", "parallel.ac_policy=op"],
    "full+compile": ["parallel.activation_checkpointing=full", "compile=true", "parallel.compile_backend=aot_eager"],
}
