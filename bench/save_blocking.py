"""Seconds each rank's training thread is blocked per checkpoint save: synchronous DCP saves against the engine's
async saves (async_checkpoint), on the `base` preset (124M parameters, fp32, AdamW state: ~1.5 GB per save).

    python bench/save_blocking.py [--preset base] [--nprocs 2] [--saves 3] [--interval 20]
        -> bench/results/save-blocking-cpu.json

Each world size in --nprocs runs as one torchrun job (gloo, CPU; 1 rank: the plain model, 2 ranks: FSDP2). Each
rank holds two of phiforge's own Checkpointers, one sync and one async, and runs `--saves` rounds; a round is
one save of each mode (the order alternating from round to round, so a change in the shared machine's load
falls on both), each followed by real training steps (random tokens, AdamW) until `--interval` seconds from
its start, as a run with a save interval does.

A rank's blocked time per save is the time its training thread spends in Checkpointer calls for that save:
`save()`, the per-step `poll()`, and, when an async save's background write outlasts the interval, the wait
for it before the next save. Sync: DCP writes on the training thread, and rank 0 completes the save while the
others wait at a barrier. Async: the state is staged into CPU memory, then DCP's write and the completion
(fsync, rename, `latest`) run in background threads. The steps beside each mode's saves are timed too, so the
cost of the background work to training shows. Ranks use cores/nproc threads each, so training uses every core
and the background write competes with it. Target (issue 23): async blocking at most 0.25x the sync blocking.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODES = ("sync", "async")


def cpu_info() -> dict:
    import torch

    from phiforge.train.precision import cpu_model, native_bf16

    return {"cpu_model": cpu_model(), "cores": os.cpu_count(), "native_bf16": native_bf16("cpu"),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "torch": torch.__version__}


def _local_bytes(tensors) -> int:
    """Bytes this rank holds of `tensors` (its shards of DTensors)."""
    local = [t.to_local() if hasattr(t, "to_local") else t for t in tensors]
    return sum(t.numel() * t.element_size() for t in local)


def _train_step(train_model, optimizer, vocab: int, seq: int) -> None:
    import torch

    x = torch.randint(0, vocab, (1, seq + 1))
    train_model(x[:, :-1], x[:, 1:]).loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _more_steps(started: float, interval: float, env) -> bool:
    """Whether to take another training step before the next save: until `interval` seconds have passed since
    the save began, agreed by all ranks (every rank must take the same steps, as in the engine)."""
    import torch

    from phiforge.train.distributed import all_reduce_

    flag = torch.tensor([float(time.perf_counter() - started < interval)])
    return all_reduce_(flag, env, op=torch.distributed.ReduceOp.MAX).item() > 0


def _one_save(ckpt, step: int, train_model, optimizer, args, vocab: int, train_state: dict, env) -> dict:
    """One save, then training steps (at least one) until `args.interval` seconds from its start: the seconds the
    training thread was blocked in Checkpointer calls for it, the wait for an async write that outlasted the
    interval (part of the blocked time), the step times."""
    started = time.perf_counter()
    ckpt.save(step, train_model, optimizer, {**train_state, "step": step})
    blocked, steps = time.perf_counter() - started, []
    pending = ckpt.pending
    while not steps or _more_steps(started, args.interval, env):
        t = time.perf_counter()
        _train_step(train_model, optimizer, vocab, args.seq)
        steps.append(time.perf_counter() - t)
        t = time.perf_counter()
        ckpt.poll()
        blocked += time.perf_counter() - t
    t = time.perf_counter()
    ckpt.wait()  # the next save would wait for this one: blocked time when the write outlasted the interval
    residual = time.perf_counter() - t if pending is not None else 0.0
    return {"blocked_s": blocked + residual, "residual_wait_s": residual, "step_s": steps}


def worker(args) -> None:
    import torch

    from phiforge.config import load_config
    from phiforge.train.build import build_text_model
    from phiforge.train.checkpointing import Checkpointer
    from phiforge.train.config import TrainConfig
    from phiforge.train.distributed import barrier, init_distributed, shutdown
    from phiforge.train.optim import build_optimizer
    from phiforge.train.parallelize import reshard, resolve_layout

    env = init_distributed(args.device)
    torch.set_num_threads(args.threads or max(1, (os.cpu_count() or 1) // env.world_size))
    cfg = load_config(TrainConfig, None, [f"model.preset={args.preset}", f"device={args.device}", "precision=fp32",
                                          f"data.seq_len={args.seq}"])  # parallel.strategy auto: fsdp on 2+ ranks
    mcfg = cfg.model_config()
    layout = resolve_layout(cfg, env)
    model, train_model = build_text_model(cfg, mcfg, env, layout)
    if layout.fully_sharded:
        reshard(model)  # as build_step: the optimizer holds the sharded parameters
    optimizer = build_optimizer(model, cfg.optim)
    _train_step(train_model, optimizer, mcfg.vocab_size, args.seq)  # AdamW state exists from here on
    state_bytes = _local_bytes([*model.parameters(), *(v for s in optimizer.state.values() for v in s.values()
                                                       if torch.is_tensor(v) and v.dim() > 0)])
    train_state = {"tokens": 0, "seed": cfg.seed, "world_size": env.world_size, "model": mcfg.to_dict()}
    ckpts = {}
    for mode in MODES:
        barrier(env)
        ckpts[mode] = Checkpointer(Path(args.dir) / mode, env, keep=1, async_save=mode == "async")
    saves = {mode: [] for mode in MODES}
    for i in range(args.saves):  # interleaved rounds, the order alternating: load drift hits both modes alike
        for mode in MODES if i % 2 == 0 else MODES[::-1]:
            barrier(env)
            saves[mode].append(_one_save(ckpts[mode], 100 + i, train_model, optimizer, args, mcfg.vocab_size,
                                         train_state, env))
    for ckpt in ckpts.values():
        ckpt.close()
    with open(f"{args.out}.{env.rank}", "w") as f:
        json.dump({"rank": env.rank, "strategy": layout.strategy,
                   "params": model.num_params(), "state_bytes_this_rank": state_bytes,
                   "threads": torch.get_num_threads(), "saves": saves}, f)
    shutdown(env)


def run_world(nproc: int, args) -> list[dict]:
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        out = os.path.join(tmp, "rank")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", __file__,
               "--worker", "--preset", args.preset, "--saves", str(args.saves), "--interval",
               str(args.interval), "--seq", str(args.seq), "--threads", str(args.threads), "--device", args.device,
               "--dir", tmp, "--out", out]
        env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": str(max(1, os.cpu_count() // nproc))}
        p = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
        if p.returncode != 0:
            log = Path(args.results).with_suffix(f".{nproc}-ranks.log")
            log.write_text(p.stdout + p.stderr)
            sys.exit(f"the {nproc}-rank run failed (exit {p.returncode}); its output: {log}")
        return [json.loads(Path(f"{out}.{r}").read_text()) for r in range(nproc)]


def summarize(ranks: list[dict]) -> dict:
    """Per mode: each save's blocked seconds on the slowest rank (every rank waits for it at the next collective),
    their mean, and the median training step beside that mode's saves."""
    out = {}
    for mode in MODES:
        per_save = [max(r["saves"][mode][k]["blocked_s"] for r in ranks) for k in range(len(ranks[0]["saves"][mode]))]
        out[mode] = {"blocked_s_per_save": per_save, "blocked_s_mean": statistics.mean(per_save),
                     "step_s_median": statistics.median(t for r in ranks for save in r["saves"][mode]
                                                        for t in save["step_s"])}
    out["async_over_sync"] = out["async"]["blocked_s_mean"] / out["sync"]["blocked_s_mean"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="base")
    ap.add_argument("--nprocs", default="2", help="comma list of world sizes, each one torchrun job")
    ap.add_argument("--saves", type=int, default=3, help="saves per mode")
    ap.add_argument("--interval", type=float, default=20.0,
                    help="seconds from one save to the next, filled with training steps (at least one)")
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--threads", type=int, default=0, help="torch threads per rank (default: cores / ranks)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="cuda: one GPU per rank (nccl)")
    ap.add_argument("--tmp", default=None, help="where the checkpoints are written (default: the system temp dir)")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--dir", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--results", default=str(ROOT / "bench" / "results" / "save-blocking-cpu.json"))
    ap.add_argument("--dry-run", action="store_true",
                    help="check the arguments and the whole path in seconds: the tiny preset, 1 rank, one save per "
                         "mode; the result goes to a temporary file and is not judged")
    args = ap.parse_args()
    if args.saves < 1 or args.interval < 0 or args.seq < 8:
        ap.error("--saves must be at least 1, --interval at least 0 and --seq at least 8")
    if args.dry_run:
        args.preset, args.nprocs, args.saves, args.interval, args.seq = "tiny", "1", 1, 0.5, 32
        args.results = os.path.join(tempfile.mkdtemp(), "save-blocking-dry-run.json")
    if args.worker:
        worker(args)
        return
    rec = {"bench": "save_blocking", "command": "python " + " ".join(["bench/save_blocking.py", *sys.argv[1:]]),
           **cpu_info(), "device": args.device, "preset": args.preset, "saves_per_mode": args.saves,
           "interval_s": args.interval,
           "seq_len": args.seq, "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
           "loadavg_at_start": os.getloadavg(), "worlds": {}}
    for n in (int(x) for x in args.nprocs.split(",")):
        ranks = run_world(n, args)
        rec["worlds"][str(n)] = {"world_size": n, "strategy": ranks[0]["strategy"], "params": ranks[0]["params"],
                                 "state_gb_per_rank": ranks[0]["state_bytes_this_rank"] / 1e9,
                                 "threads_per_rank": ranks[0]["threads"], **summarize(ranks), "per_rank": ranks}
        w = rec["worlds"][str(n)]
        print(f"{n} rank(s), {w['strategy']}: blocked per save {w['sync']['blocked_s_mean']:.2f} s sync, "
              f"{w['async']['blocked_s_mean']:.2f} s async ({w['async_over_sync']:.3f}x); median step "
              f"{w['sync']['step_s_median']:.2f} s beside sync saves, {w['async']['step_s_median']:.2f} s beside "
              f"async saves")
    rec["loadavg_at_end"] = os.getloadavg()
    rec["pass"] = args.dry_run or all(w["async_over_sync"] <= 0.25 for w in rec["worlds"].values())
    Path(args.results).parent.mkdir(parents=True, exist_ok=True)
    Path(args.results).write_text(json.dumps(rec, indent=2) + "\n")
    verdict = ("dry run, not judged" if args.dry_run
               else f"{'PASS' if rec['pass'] else 'FAIL'}: async blocking at most 0.25x sync")
    print(f"{verdict}; wrote {args.results}")


if __name__ == "__main__":
    main()
