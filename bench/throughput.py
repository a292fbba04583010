"""Training throughput of phiforge, LitGPT and HF transformers on the same Phi-2-family config, in one run.

Implementations (--impls): phiforge, phiforge-float8 (the same model with its block linears converted to float8
training by parallelize(): the engine config's `float8` key, --float8 sets its scaling; needs torchao),
litgpt, hf.

Every implementation does the same work: random-init weights, AdamW (fused on GPU), micro-batch x seq_len of
random tokens, forward + backward + optimizer step; bf16 parameters on GPU, fp32 on CPU. Implementations
that are not installed are skipped and say so. Results go to bench/results/throughput-<device>.json. No data
path is timed: the batch is made on the device before timing, for every implementation (docs/performance.md,
"The data path").

MFU = tokens/s x (6 x N_matmul + 12 x L x d x T) / peak, N_matmul = parameters except the input embedding
(PaLM convention, as in ../shared/ANCHORS.md); peak = the card's dense bf16 figure. No MFU on CPU.

    python bench/throughput.py                              # CPU: `small` preset, T=128
    python bench/throughput.py --preset phi-2 --seq-len 2048 --micro-batch 4          # one H100
    python bench/throughput.py --preset phi-2 --seq-len 2048 --micro-batch 8 --ac full
    python bench/throughput.py --impls phiforge,phiforge-float8,litgpt --float8 tensorwise --compile --strict
    python bench/throughput.py --dry-run ...   # any of the above on CPU: the tiny preset, T=32, one step each

--strict: exit status 3 when an implementation asked for cannot run (not installed; for phiforge-float8, no
`float8` config key in this phiforge or no torchao), after measuring the others. Results are written after
every case, so a run stopped by a time limit keeps what it measured.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from phiforge.model import Phi2, Phi2Config  # noqa: E402
from phiforge.model.phi2 import Block  # noqa: E402

# Dense bf16 peak FLOP/s by device-name substring (vendor datasheets, without sparsity).
PEAKS = {"H200": 989.4e12, "H100 PCIe": 756.5e12, "H100": 989.4e12, "A100": 312e12, "L40S": 362.05e12,
         "L4": 121e12, "A10G": 70e12, "4090": 165.2e12}


def peak_flops(device_name: str) -> float | None:
    for key, value in PEAKS.items():
        if key in device_name:
            return value
    return None


def flops_per_token(cfg: Phi2Config, n_params: int, seq_len: int) -> float:
    n_matmul = n_params - cfg.vocab_size * cfg.n_embd
    return 6 * n_matmul + 12 * cfg.n_layer * cfg.n_embd * seq_len


class Missing(Exception):
    """An implementation that cannot run here, and why."""


def float8_missing() -> str | None:
    """Why phiforge-float8 cannot run here, or None when it can."""
    import dataclasses
    import importlib.util

    from phiforge.train.config import TrainConfig

    if "float8" not in {f.name for f in dataclasses.fields(TrainConfig)}:
        return "the installed phiforge has no `float8` config key (issue 23 item 4)"
    if importlib.util.find_spec("torchao") is None:
        return "torchao is not installed (carry its wheel in .whl/, see bench/gpu_check.sh)"
    return None


def build(impl: str, cfg: Phi2Config, device: str, float8: str = "tensorwise"):
    """Return (model, loss_fn(x, y), block class for activation checkpointing)."""
    if impl in ("phiforge", "phiforge-float8"):
        reason = float8_missing() if impl == "phiforge-float8" else None
        if reason:
            raise Missing(reason)
        with torch.device(device):
            m = Phi2(cfg)
        if impl == "phiforge-float8":
            from phiforge.config import load_config
            from phiforge.train.config import TrainConfig
            from phiforge.train.parallelize import parallelize

            # float8 needs bf16 around it (on CPU torchao emulates the float8 matmuls)
            parallelize(m, load_config(TrainConfig, None, [f"float8={float8}", "precision=bf16-true",
                                                            f"device={device}", "compile=false"]))
        return m, lambda x, y: m(x, y).loss, Block
    if impl == "hf":
        from transformers import PhiConfig, PhiForCausalLM

        hc = PhiConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.n_embd, intermediate_size=cfg.intermediate_size,
                       num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head,
                       partial_rotary_factor=cfg.rotary_pct, max_position_embeddings=cfg.max_seq_len)
        hc._attn_implementation = "sdpa"
        with torch.device(device):
            m = PhiForCausalLM(hc)

        def loss(x, y):
            logits = m(input_ids=x, use_cache=False).logits
            return F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.reshape(-1))

        return m, loss, type(m.model.layers[0])
    if impl == "litgpt":
        from litgpt import GPT, Config
        from litgpt.model import Block as LitBlock

        lc = Config.from_name("phi-2", n_layer=cfg.n_layer, n_embd=cfg.n_embd, n_head=cfg.n_head,
                              n_query_groups=cfg.n_kv_head, head_size=cfg.head_dim,
                              intermediate_size=cfg.intermediate_size, padded_vocab_size=cfg.vocab_size,
                              vocab_size=cfg.vocab_size, block_size=cfg.max_seq_len, rotary_percentage=cfg.rotary_pct)
        with torch.device(device):
            m = GPT(lc)
        m.max_seq_length = cfg.max_seq_len

        def loss(x, y):
            logits = m(x)
            return F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.reshape(-1))

        return m, loss, LitBlock
    raise ValueError(impl)


def run_case(impl, cfg, device, mb, T, steps, warmup, ac, compile_, float8="tensorwise", backend="inductor"):
    torch.manual_seed(0)
    m, loss_fn, block_cls = build(impl, cfg, device, float8)
    m = m.to(torch.bfloat16 if device == "cuda" else torch.float32).train()
    if isinstance(m, Phi2):
        m.reset_rope()  # fp32 RoPE tables, as the trainers keep them (train/precision.py)
    if ac == "full":
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing

        apply_activation_checkpointing(m, check_fn=lambda s: isinstance(s, block_cls))
    if compile_:
        loss_fn = torch.compile(loss_fn, backend=backend)
    n_params = sum(p.numel() for p in m.parameters())
    opt = torch.optim.AdamW(m.parameters(), lr=1e-4, fused=device == "cuda")
    x = torch.randint(0, min(cfg.vocab_size, 50257), (mb, T + 1), device=device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for i in range(warmup + steps):
        if i == warmup:
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
        loss = loss_fn(x[:, :-1], x[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    final_loss = loss.item()
    if device == "cuda":
        torch.cuda.synchronize()
    step_s = (time.perf_counter() - t0) / steps
    tok_s = mb * T / step_s
    name = torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu"
    peak = peak_flops(name) if device == "cuda" else None
    res = {"impl": impl, **({"float8": float8} if impl == "phiforge-float8" else {}), "micro_batch": mb,
           "seq_len": T, "ac": ac, "compile": compile_, "params": n_params,
           "step_s": round(step_s, 4), "tokens_per_s": round(tok_s, 1),
           "mfu": round(tok_s * flops_per_token(cfg, n_params, T) / peak, 4) if peak else None,
           "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if device == "cuda" else None,
           "final_loss": round(final_loss, 4)}
    del m, opt, x
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return res


IMPLS = ("phiforge", "phiforge-float8", "litgpt", "hf")


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default=None, help="default: small on CPU, phi-2 on GPU")
    ap.add_argument("--seq-len", type=int, default=None, help="default: 128 on CPU, 2048 on GPU")
    ap.add_argument("--micro-batch", type=int, default=None, help="default: 8 on CPU, 4 on GPU")
    ap.add_argument("--impls", default="phiforge,litgpt,hf", help=f"comma list of {', '.join(IMPLS)}")
    ap.add_argument("--float8", choices=["tensorwise", "rowwise"], default="tensorwise",
                    help="phiforge-float8's scaling (the engine config's float8 key)")
    ap.add_argument("--ac", choices=["none", "full"], default="none")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--rounds", type=int, default=2, help="interleaved repeats; the best round counts (noise)")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--strict", action="store_true", help="exit status 3 if an implementation asked for cannot run")
    ap.add_argument("--dry-run", action="store_true",
                    help="CPU, the tiny preset, T=32, micro-batch 2, one step, compile without a compiler backend")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    a.impls = [i.strip() for i in a.impls.split(",") if i.strip()]
    unknown = [i for i in a.impls if i not in IMPLS]
    if unknown or not a.impls:
        ap.error(f"--impls: unknown {unknown or 'empty list'}; choose from {', '.join(IMPLS)}")
    for flag in ("seq_len", "micro_batch", "steps", "rounds"):
        if getattr(a, flag) is not None and getattr(a, flag) < 1:
            ap.error(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(a, flag)}")
    if a.dry_run:
        a.preset, a.seq_len, a.micro_batch, a.steps, a.warmup, a.rounds = "tiny", 32, 2, 1, 0, 1
    return a


def write_results(out: Path, a, dev_name: str, preset: str, results: dict, skipped: dict) -> dict:
    ratios = {}
    for base in ("phiforge", "phiforge-float8"):
        for other in ("litgpt", "hf"):
            if base in results and other in results:
                ratios[f"{base}_vs_{other}"] = round(results[base]["tokens_per_s"] / results[other]["tokens_per_s"], 3)
    if "phiforge" in results and "phiforge-float8" in results:
        ratios["float8_vs_bf16"] = round(results["phiforge-float8"]["tokens_per_s"] /
                                         results["phiforge"]["tokens_per_s"], 3)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"device": dev_name, "torch": torch.__version__, "command": " ".join(sys.argv),
                               "date": time.strftime("%Y-%m-%d"), "preset": preset, "results": results,
                               "skipped": skipped, "ratios": ratios}, indent=2) + "\n")
    return ratios


def main(argv=None) -> int:
    a = parse_args(argv)
    gpu = torch.cuda.is_available() and not a.dry_run
    device = "cuda" if gpu else "cpu"
    if a.threads:
        torch.set_num_threads(a.threads)
    preset = a.preset or ("phi-2" if gpu else "small")
    cfg = Phi2Config.from_preset(preset)
    T = a.seq_len or (2048 if gpu else 128)
    mb = a.micro_batch or (4 if gpu else 8)
    steps = a.steps or (8 if gpu else 5)
    warmup = a.warmup if a.warmup is not None else (3 if gpu else 2)
    dev_name = torch.cuda.get_device_name() if gpu else f"cpu ({torch.get_num_threads()} threads)"
    print(f"torch {torch.__version__} on {dev_name}; preset {preset}; T={T} micro-batch={mb} ac={a.ac}", flush=True)
    tag = "cuda-" + dev_name.replace(" ", "_") if gpu else "cpu"
    name = f"throughput-{tag}-{a.ac}{'-compile' if a.compile else ''}.json"
    out = Path(a.out or Path(__file__).parent / "results" / name)
    results, skipped, ratios = {}, {}, {}
    for r in range(a.rounds):  # interleave implementations so machine noise hits all of them alike
        for impl in a.impls:
            if impl in skipped:
                continue
            try:
                res = run_case(impl, cfg, device, mb, T, steps, warmup, a.ac, a.compile, a.float8,
                               "eager" if a.dry_run else "inductor")
            except (ImportError, Missing) as e:
                skipped[impl] = f"not installed ({e.name})" if isinstance(e, ImportError) else str(e)
                print(f"skip {impl}: {skipped[impl]}", flush=True)
                continue
            print(f"round {r} {json.dumps(res)}", flush=True)
            if impl not in results or res["tokens_per_s"] > results[impl]["tokens_per_s"]:
                results[impl] = res
            ratios = write_results(out, a, dev_name, preset, results, skipped)
    ratios = write_results(out, a, dev_name, preset, results, skipped)
    print(f"\n{'impl':<16} {'tokens/s':>12} {'step s':>8} {'MFU':>7} {'peak GiB':>9}")
    for impl, r in results.items():
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] else "-"
        mem = f"{r['peak_mem_gib']:.1f}" if r["peak_mem_gib"] else "-"
        print(f"{impl:<16} {r['tokens_per_s']:>12,.0f} {r['step_s']:>8.3f} {mfu:>7} {mem:>9}")
    print(" ".join(f"{k}={v}x" for k, v in ratios.items()))
    print(f"wrote {out}")
    measured = ", ".join(f"{k} {r['tokens_per_s']:,.0f} tok/s" + (f" MFU {100 * r['mfu']:.1f}%" if r["mfu"] else "")
                         for k, r in results.items())
    ratio = "; " + ", ".join(f"{k} {v}x" for k, v in ratios.items()) if ratios else ""
    if skipped and a.strict:
        print(f"FAIL throughput: {'; '.join(f'{k}: {v}' for k, v in skipped.items())} (measured: {measured or 'none'})")
        return 3
    print(f"PASS throughput: {measured}{ratio}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
