"""1-process numerics equal to FSDP2's (bench/gpu_check.sh): the same model, seed and batches in bf16-mixed trained
by one plain process (`parallel.strategy=none`) and by a torchrun launch of FSDP2 (`fsdp`, one rank; NCCL on a
GPU). Both must run every op class in the same dtype, op by op, as the precision table says
(train/precision.py OP_CLASSES: fp32 RoPE, loss and router, the rest in bf16), and give the same losses within
5e-4 relative (docs/training.md, "What was verified where": the bound the CPU parity tests use).

    python bench/gpu_numerics.py                 # on CUDA: phi-2's width, 2 layers (one MoE), T=512, 4 steps
    python bench/gpu_numerics.py --dry-run       # CPU, the tiny preset, 2 steps: the setup path only

Writes bench/results/gpu-numerics-<device>.json (--out to change); exit status 1 if a check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
TOL = 5e-4  # docs/training.md, "What was verified where"


def worker_config(strategy: str, dry_run: bool, device: str):
    from phiforge.config import load_config
    from phiforge.train.config import TrainConfig

    size = (["model.preset=tiny", "data.seq_len=16"] if dry_run else ["model.preset=phi-2", "data.seq_len=512"])
    return load_config(TrainConfig, None, [*size, "model.n_layer=2", "model.moe={num_experts: 4, top_k: 2, every: 2}",
                                           f"device={device}", "precision=bf16-mixed", f"parallel.strategy={strategy}",
                                           "seed=0", "optim.lr=1e-3", "optim.warmup_steps=1"])


def worker(strategy: str, out: str, dry_run: bool, steps: int) -> None:
    """One run: the first step's forward and backward under OpRecorder, then the rest; rank 0 writes JSON."""
    from phiforge.train.build import build_step, build_text_model
    from phiforge.train.checks import CountingTokens, OpRecorder
    from phiforge.train.distributed import init_distributed, shutdown
    from phiforge.train.parallelize import resolve_layout

    device = "cpu" if dry_run else "cuda"
    cfg = worker_config(strategy, dry_run, device)
    env = init_distributed(device)
    try:
        layout = resolve_layout(cfg, env)
        model, train_model = build_text_model(cfg, cfg.model_config(), env, layout)
        step = build_step(model, train_model, cfg, cfg.optim, env, layout)
        job = CountingTokens(model.cfg.vocab_size, 2, cfg.data.seq_len, steps, env.device)
        recorder = OpRecorder(model.cfg.rotary_dim, model.cfg.moe.num_experts, cfg.data.seq_len)
        with recorder:
            losses = [step(1, job, False).loss]
        losses += [step(s, job, False).loss for s in range(2, steps + 1)]
        if env.is_main:
            Path(out).write_text(json.dumps({
                "strategy": layout.strategy, "world_size": env.world_size, "fully_shard": layout.fully_sharded,
                "precision": layout.precision.name, "losses": losses, "records": recorder.records,
                "attention_ops": sorted(recorder.attention_ops)}))
    finally:
        shutdown(env)


def launch(strategy: str, out: Path, args, torchrun: bool, limit: float) -> dict:
    """A run of `strategy`: in this process, or under torchrun (a real launch: env:// rendezvous and the NCCL
    process group; gloo on CPU)."""
    if not torchrun:
        worker(strategy, str(out), args.dry_run, args.steps)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # the torchrun launch gets the whole card
        return json.loads(out.read_text())
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=1", __file__,
           "--worker", strategy, "--worker-out", str(out), "--steps", str(args.steps)] + ["--dry-run"] * args.dry_run
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=limit)
    if p.returncode:
        tail = (p.stderr or p.stdout).strip().splitlines()[-1:] or ["?"]
        raise RuntimeError(f"{strategy} run failed (exit {p.returncode}): {tail[0]}")
    return json.loads(out.read_text())


def compare(one: dict, fsdp: dict) -> list[str]:
    """What differs between the two runs, and from the precision table; [] when nothing does."""
    from phiforge.train.checks import dtypes_by_class
    from phiforge.train.precision import resolve_precision

    problems = []
    a, b = one["records"], fsdp["records"]
    if a != b:
        first = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        problems.append(f"op dtypes differ from op {first} on ({len(a)} ops in one process, {len(b)} under fsdp)")
    table = {k: str(v) for k, v in resolve_precision("bf16-mixed", "cuda").op_dtypes().items()}
    for cls, dtypes in dtypes_by_class(one["records"]).items():
        want = table[cls]
        if cls == "matmul":  # the router's gradient matmuls are fp32 by design; every other matmul bf16
            ok = want in dtypes
        else:
            ok = dtypes == [want]
        if not ok:
            problems.append(f"{cls} ran in {dtypes}, the table says {want}")
    worst = max(abs(a - b) / abs(b) for a, b in zip(one["losses"], fsdp["losses"]))
    if worst > TOL:
        problems.append(f"losses differ by {worst:.1e} relative (tolerance {TOL:.0e})")
    return problems


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="CPU, the tiny preset: the setup path, in seconds")
    ap.add_argument("--steps", type=int, default=None, help="training steps per run (default 4; dry run 2)")
    ap.add_argument("--timeout", type=float, default=240, help="seconds each of the two runs may take")
    ap.add_argument("--out", default=None, help="result JSON (default bench/results/gpu-numerics-<device>.json)")
    ap.add_argument("--worker", choices=["none", "fsdp"], help=argparse.SUPPRESS)
    ap.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.steps = args.steps or (2 if args.dry_run else 4)
    if args.steps < 1:
        ap.error(f"--steps must be at least 1, got {args.steps}")
    if args.worker:
        worker(args.worker, args.worker_out, args.dry_run, args.steps)
        return 0
    if not args.dry_run and not torch.cuda.is_available():
        print("FAIL numerics: no CUDA device (use --dry-run on a CPU)")
        return 1
    device = "cpu" if args.dry_run else torch.cuda.get_device_name()
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        try:
            one = launch("none", Path(tmp) / "none.json", args, False, args.timeout)
            fsdp = launch("fsdp", Path(tmp) / "fsdp.json", args, True, args.timeout)
        except (RuntimeError, subprocess.TimeoutExpired) as e:
            print(f"FAIL numerics: {e}")
            return 1
    problems = compare(one, fsdp)
    worst = max(abs(a - b) / abs(b) for a, b in zip(one["losses"], fsdp["losses"]))
    slug = "cpu-dry-run" if args.dry_run else "cuda-" + device.replace(" ", "_")
    out = Path(args.out or ROOT / "bench" / "results" / f"gpu-numerics-{slug}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"device": device, "torch": torch.__version__, "command": " ".join(sys.argv),
                               "date": time.strftime("%Y-%m-%d"), "seconds": round(time.perf_counter() - t0, 1),
                               "tolerance": TOL, "max_loss_rel_diff": worst, "problems": problems,
                               "none": {k: v for k, v in one.items() if k != "records"},
                               "fsdp": {k: v for k, v in fsdp.items() if k != "records"},
                               "ops_recorded": len(one["records"])}, indent=2) + "\n")
    print(f"wrote {out}")
    detail = (f"{len(one['records'])} ops in equal dtypes, losses within {worst:.1e} (tol {TOL:.0e}) over "
              f"{args.steps} steps; none vs fsdp (torchrun, {fsdp['world_size']} rank); SDPA {one['attention_ops'][0]}")
    print(("FAIL numerics: " + "; ".join(problems)) if problems else f"PASS numerics: {detail}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
