"""The training loop: one process on CPU or one GPU.

Steps: build model and data -> evaluate at step 0 -> (micro-batches x grad_accum, clip, AdamW step) x max_steps,
with validation every eval_interval, checkpoints every save_interval and at the end, metrics to
RUN/metrics.jsonl and a progress bar. The resolved config is written to RUN/config.yaml first.
"""

from __future__ import annotations

import math
import shutil
import time
from pathlib import Path

import torch
import yaml
from tqdm import tqdm

from phiforge.checkpoint import load_checkpoint, save_checkpoint
from phiforge.config import to_dict
from phiforge.data.loader import PackedLoader, eval_batches
from phiforge.data.shards import open_token_dataset
from phiforge.errors import ConfigError
from phiforge.model import Phi2
from phiforge.model.moe import moe_metrics
from phiforge.train.config import TrainConfig
from phiforge.train.optim import build_optimizer, lr_at
from phiforge.train.runtime import MetricsLog, autocast_context, resolve_device  # noqa: F401 (re-exported)


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches, device: torch.device, autocast) -> float:
    model.eval()
    total = 0.0
    for x, y in batches:
        with autocast():
            total += model(x.to(device), y.to(device)).item()
    model.train()
    return total / max(1, len(batches))


def build_model(cfg: TrainConfig) -> Phi2:
    if cfg.init_from:
        return load_checkpoint(cfg.init_from).train()
    return Phi2(cfg.model_config())


def prune_checkpoints(ckpt_root: Path, keep: int) -> None:
    steps = sorted(p for p in ckpt_root.glob("step-*") if p.is_dir() and not p.name.endswith((".tmp", ".old")))
    for old in steps[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)


def train(cfg: TrainConfig) -> dict:
    """Run training; returns a summary dict (also the last line of metrics.jsonl)."""
    run_dir = Path(cfg.out_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False), encoding="utf-8")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    device = resolve_device(cfg.device)
    autocast = autocast_context(device, cfg.precision)

    model = build_model(cfg)  # first, so a bad preset or model key is reported before any data problem
    dataset = open_token_dataset(cfg.data.dir)
    mcfg = model.cfg
    if dataset.vocab_size > mcfg.vocab_size:
        raise ConfigError(f"data in {cfg.data.dir} uses a tokenizer of {dataset.vocab_size} tokens but the model's "
                          f"vocabulary has {mcfg.vocab_size}; choose a larger preset or set model.vocab_size")
    if cfg.data.seq_len > mcfg.max_seq_len:
        raise ConfigError(f"data.seq_len {cfg.data.seq_len} exceeds the model's max_seq_len {mcfg.max_seq_len}")
    model.to(device).train()
    step_model = torch.compile(model) if cfg.compile else model
    optimizer = build_optimizer(model, cfg.optim, fused=device.type == "cuda")
    loader = PackedLoader(cfg.data.dir, "train", cfg.data.seq_len, cfg.micro_batch_size, seed=cfg.data.seed)
    val = eval_batches(cfg.data.dir, "val", cfg.data.seq_len, cfg.micro_batch_size, cfg.eval_batches)
    tokens_per_step = cfg.micro_batch_size * cfg.data.seq_len * cfg.grad_accum_steps

    metrics = MetricsLog(run_dir / "metrics.jsonl")
    n_params = model.num_params()
    metrics.write(event="start", params=n_params, device=str(device), tokens_per_step=tokens_per_step,
                  train_tokens=dataset.split_tokens("train"), val_tokens=dataset.split_tokens("val"))
    ckpt_root = run_dir / "checkpoints"
    tokenizer_dir = Path(cfg.init_from) if cfg.init_from else Path(cfg.data.dir)

    def save(step: int) -> Path:
        path = save_checkpoint(model, ckpt_root / f"step-{step:08d}", tokenizer_dir=tokenizer_dir,
                               extra={"train": {"step": step, "tokens": step * tokens_per_step}})
        prune_checkpoints(ckpt_root, cfg.keep_checkpoints)
        (run_dir / "latest").write_text(path.name + "\n", encoding="utf-8")
        return path

    val_loss = evaluate(step_model, val, device, autocast)
    first_val = val_loss
    metrics.write(event="eval", step=0, tokens=0, val_loss=val_loss, val_ppl=math.exp(min(val_loss, 50)))
    tqdm.write(f"step 0: val loss {val_loss:.4f}")

    bar = tqdm(total=cfg.max_steps, desc="train", unit="step", dynamic_ncols=True)
    t0 = time.perf_counter()
    t_log, tokens_at_log = t0, 0
    loss_sum = torch.zeros((), device=device)
    moe_layers = list(model.moe_layers().values())
    step = 0
    for step in range(1, cfg.max_steps + 1):
        lr = lr_at(step - 1, cfg.max_steps, cfg.optim)
        for group in optimizer.param_groups:
            group["lr"] = lr
        for _ in range(cfg.grad_accum_steps):
            x, y = loader.next_batch()
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with autocast():
                loss = step_model(x, y) / cfg.grad_accum_steps
            loss.backward()
            loss_sum += model.lm_loss / cfg.grad_accum_steps  # the LM loss, without MoE balancing losses
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip or float("inf"))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        for moe in moe_layers:
            moe.update_bias()  # aux-loss-free balancing (no-op unless moe.bias_balancing)
        bar.update(1)

        if step % cfg.log_interval == 0 or step == cfg.max_steps:
            now = time.perf_counter()
            n_steps = cfg.log_interval if step % cfg.log_interval == 0 else step % cfg.log_interval
            train_loss = loss_sum.item() / n_steps  # the only host sync: once per log interval
            loss_sum.zero_()
            tokens = step * tokens_per_step
            tok_s = (tokens - tokens_at_log) / (now - t_log)
            t_log, tokens_at_log = now, tokens
            metrics.write(event="train", step=step, tokens=tokens, loss=train_loss, lr=lr,
                          grad_norm=float(grad_norm), tokens_per_s=tok_s, elapsed_s=now - t0)
            if moe_layers:  # routing stats of the last micro-batch, per MoE layer
                metrics.write(event="moe", step=step, tokens=tokens, layers=moe_metrics(model))
            bar.set_postfix(loss=f"{train_loss:.3f}", tok_s=f"{tok_s:,.0f}")
        if step % cfg.eval_interval == 0 or step == cfg.max_steps:
            val_loss = evaluate(step_model, val, device, autocast)
            metrics.write(event="eval", step=step, tokens=step * tokens_per_step, val_loss=val_loss,
                          val_ppl=math.exp(min(val_loss, 50)), elapsed_s=time.perf_counter() - t0)
            tqdm.write(f"step {step}: val loss {val_loss:.4f}")
        if cfg.save_interval and step % cfg.save_interval == 0 and step != cfg.max_steps:
            save(step)
    bar.close()
    final = save(step)
    summary = {"event": "end", "steps": step, "tokens": step * tokens_per_step, "params": n_params,
               "val_loss_start": first_val, "val_loss_end": val_loss, "elapsed_s": time.perf_counter() - t0,
               "checkpoint": str(final)}
    metrics.write(**summary)
    metrics.close()
    return summary
