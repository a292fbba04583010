"""Which SDPA kernel phiforge's attention actually runs for phi-2's shapes in bf16 (bench/gpu_check.sh).

One Phi-2 block (d=2560, 32 heads of 80, T=2048, micro-batch 2), bf16 weights, forward and backward under a dispatch
mode that records the aten SDPA op torch picked (phiforge.train.checks.OpRecorder): PASS when it is the flash
or the cuDNN kernel, FAIL when torch fell back to the memory-efficient or the math kernel. Each fast backend is
also forced (torch.nn.attention.sdpa_kernel) to show which of them run at these shapes at all.

    python bench/sdpa_kernel.py               # on CUDA
    python bench/sdpa_kernel.py --dry-run     # CPU, the tiny preset, fp32: the setup path (CPU's flash kernel)

Writes bench/results/sdpa-kernel-<device>.json (--out to change); exit status 1 on FAIL.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
from phiforge.model import Phi2, Phi2Config  # noqa: E402
from phiforge.train.checks import OpRecorder, sdpa_backend  # noqa: E402

FORCED = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}


def forward_backward(model: Phi2, x: torch.Tensor, rotary_dim: int, seq_len: int) -> list[str]:
    """The SDPA kernels one training forward and backward ran (forward first)."""
    recorder = OpRecorder(rotary_dim, -1, seq_len)
    with recorder:
        model(x[:, :-1], x[:, 1:]).loss.backward()
    model.zero_grad(set_to_none=True)
    return sorted(recorder.attention_ops, key=len)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="CPU, the tiny preset, fp32: the setup path, in seconds")
    ap.add_argument("--seq-len", type=int, default=None, help="default 2048 (dry run 32)")
    ap.add_argument("--micro-batch", type=int, default=2)
    ap.add_argument("--out", default=None, help="result JSON (default bench/results/sdpa-kernel-<device>.json)")
    args = ap.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        print("FAIL sdpa: no CUDA device (use --dry-run on a CPU)")
        return 1
    device, dtype = ("cpu", torch.float32) if args.dry_run else ("cuda", torch.bfloat16)
    T = args.seq_len or (32 if args.dry_run else 2048)
    cfg = Phi2Config.from_preset("tiny" if args.dry_run else "phi-2", n_layer=1, max_seq_len=T)
    torch.manual_seed(0)
    with torch.device(device):
        model = Phi2(cfg).to(dtype)
        model.reset_rope()  # fp32 tables, as parallelize() leaves them under bf16 weights
    x = torch.randint(0, cfg.vocab_size, (args.micro_batch, T + 1), device=device)
    chosen = forward_backward(model, x, cfg.rotary_dim, T)
    forced = {}
    for name, backend in FORCED.items():
        try:
            with sdpa_kernel(backend):
                forced[name] = forward_backward(model, x, cfg.rotary_dim, T)
        except RuntimeError as e:  # no kernel of this backend for these shapes, dtype or card
            forced[name] = "unavailable: " + str(e).strip().splitlines()[0][:200]
    backend = sdpa_backend(chosen[0]) if chosen else None
    wanted = ("cpu-flash",) if args.dry_run else ("flash", "cudnn")
    name = "cpu" if args.dry_run else torch.cuda.get_device_name()
    slug = "cpu-dry-run" if args.dry_run else "cuda-" + name.replace(" ", "_")
    out = Path(args.out or ROOT / "bench" / "results" / f"sdpa-kernel-{slug}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"device": name, "torch": torch.__version__, "command": " ".join(sys.argv),
                               "date": time.strftime("%Y-%m-%d"), "dtype": str(dtype), "seq_len": T,
                               "micro_batch": args.micro_batch, "head_dim": cfg.head_dim, "n_head": cfg.n_head,
                               "chosen_ops": chosen, "chosen_backend": backend, "forced": forced,
                               "pass": backend in wanted}, indent=2) + "\n")
    print(f"wrote {out}")
    runs = ", ".join(f"{k} {'runs' if isinstance(v, list) else 'unavailable'}" for k, v in forced.items())
    detail = f"{backend} ({chosen[0] if chosen else 'no SDPA op seen'}) at d={cfg.n_embd}, head_dim {cfg.head_dim}, " \
             f"T={T}, {str(dtype).removeprefix('torch.')}; forced: {runs}"
    print(f"{'PASS' if backend in wanted else 'FAIL'} sdpa: {detail}")
    return 0 if backend in wanted else 1


if __name__ == "__main__":
    sys.exit(main())
