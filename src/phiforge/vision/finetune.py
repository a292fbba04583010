"""Two-stage visual instruction fine-tuning (`phiforge vision finetune`), single process on CPU or one GPU.

stage1 trains the parts it lists (default: projector + cross-attention, the LM frozen), stage2 the parts it
lists (default: + the LM). Each stage has its own AdamW (phiforge.train.optim) over just its trainable
parameters and its own warmup + schedule. Metrics go to RUN/metrics.jsonl, the resolved config to
RUN/config.yaml, and a vision checkpoint to RUN/checkpoints/step-N after each stage (RUN/latest names the
last one, so `--checkpoint RUN` works).
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import torch
import yaml
from tqdm import tqdm

from phiforge.checkpoint import load_checkpoint
from phiforge.config import to_dict
from phiforge.errors import ConfigError
from phiforge.model import Phi2
from phiforge.model.xattn import XAttnConfig
from phiforge.tokenizer import load_tokenizer
from phiforge.train.config import model_config_from_spec
from phiforge.train.optim import build_optimizer, lr_at
from phiforge.train.runtime import MetricsLog, autocast_context, resolve_device
from phiforge.vision.config import FinetuneConfig
from phiforge.vision.data import VisionDataset
from phiforge.vision.model import (VisionLM, add_cross_attention, is_vision_checkpoint, load_vision_checkpoint,
                                   save_vision_checkpoint)


def build_vision_model(cfg: FinetuneConfig) -> VisionLM:
    """From a vision checkpoint (continue), a text checkpoint (+ new closed xattn layers from model.xattn; other
    model keys are ignored) or random init of `model` (xattn defaults to XAttnConfig() when not given)."""
    if cfg.init_from and is_vision_checkpoint(cfg.init_from):
        return load_vision_checkpoint(cfg.init_from).train()
    spec = {**cfg.model, "xattn": cfg.model.get("xattn") or {}}  # a vision model always has xattn layers
    if cfg.init_from:
        lm = add_cross_attention(load_checkpoint(cfg.init_from), XAttnConfig.from_dict(spec["xattn"]))
    else:
        lm = Phi2(model_config_from_spec(spec))
    return VisionLM(lm, cfg.vision).train()


@torch.no_grad()
def eval_loss(model: VisionLM, batches, device, autocast) -> float:
    model.eval()
    total = 0.0
    for visual, idx, labels in batches:
        with autocast():
            total += model(visual.to(device), idx.to(device), labels.to(device)).item()
    model.train()
    return total / len(batches)


def finetune(cfg: FinetuneConfig) -> dict:
    if cfg.stage1.steps == 0 and cfg.stage2.steps == 0:
        raise ConfigError("stage1.steps and stage2.steps are both 0: nothing to train")
    run_dir = Path(cfg.out_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    device = resolve_device(cfg.device)
    autocast = autocast_context(device, cfg.precision)

    tok = load_tokenizer(cfg.init_from)
    model = build_vision_model(cfg)
    # written after building: the encoder fills in what it resolved (image size, mean/std, HF config)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(replace(cfg, vision=model.vcfg)), sort_keys=False),
                                         encoding="utf-8")
    if tok.get_vocab_size() > model.lm.cfg.vocab_size:
        raise ConfigError(f"the tokenizer has {tok.get_vocab_size()} tokens but the model's vocabulary has "
                          f"{model.lm.cfg.vocab_size}; choose a larger preset or set model.vocab_size")
    max_len = min(cfg.data.max_len, model.lm.cfg.max_seq_len)
    enc = model.vcfg.encoder
    train_set = VisionDataset(cfg.data.train, tok, enc, max_len, cfg.data.image_dir)
    val_set = VisionDataset(cfg.data.val, tok, enc, max_len, cfg.data.image_dir) if cfg.data.val else None
    for name, ds in (("train", train_set), ("val", val_set)):
        skipped = {k: v for k, v in (ds.stats if ds else {}).items() if k not in ("records", "used") and v}
        if skipped:
            tqdm.write(f"{name} data: skipped {sum(skipped.values())} of {ds.stats['records']} records: {skipped}")
    val = None
    if val_set is not None:
        it = val_set.shuffled_batches(cfg.micro_batch_size, seed=0)
        val = [next(it) for _ in range(min(cfg.eval_batches, max(1, len(val_set) // cfg.micro_batch_size)))]
    model.to(device)
    batches = train_set.shuffled_batches(cfg.micro_batch_size, seed=cfg.seed)

    metrics = MetricsLog(run_dir / "metrics.jsonl")
    metrics.write(event="start", params=sum(p.numel() for p in model.parameters()), device=str(device),
                  train_data=dict(train_set.stats), val_data=dict(val_set.stats) if val_set else None,
                  samples_per_step=cfg.micro_batch_size * cfg.grad_accum_steps)
    ckpt_root = run_dir / "checkpoints"
    t0 = time.perf_counter()
    step = 0  # global optimizer steps over both stages
    val_loss = eval_loss(model, val, device, autocast) if val else None
    if val:
        metrics.write(event="eval", step=0, val_loss=val_loss, elapsed_s=0.0)
    last_ckpt = None
    for stage_name in ("stage1", "stage2"):
        stage = getattr(cfg, stage_name)
        if stage.steps == 0:
            continue
        n_train = model.set_trainable(stage.train)
        if n_train == 0:
            raise ConfigError(f"{stage_name}.train ({stage.train}) leaves nothing to train")
        trainable = [p for p in model.parameters() if p.requires_grad]
        optim_cfg = replace(cfg.optim, lr=stage.lr, warmup_steps=stage.warmup_steps)
        # the fused kernel also exists for CPU, where it is several times faster than the default
        optimizer = build_optimizer(model, optim_cfg, fused=device.type in ("cpu", "cuda"))
        metrics.write(event="stage", stage=stage_name, steps=stage.steps, train=stage.train, trainable_params=n_train)
        tqdm.write(f"{stage_name}: training {', '.join(stage.train)} ({n_train:,} parameters) for {stage.steps} steps")
        loss_sum, t_log = torch.zeros((), device=device), time.perf_counter()
        for s in tqdm(range(stage.steps), desc=stage_name, unit="step", dynamic_ncols=True):
            lr = lr_at(s, stage.steps, optim_cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            for _ in range(cfg.grad_accum_steps):
                visual, idx, labels = (t.to(device, non_blocking=True) for t in next(batches))
                with autocast():
                    loss = model(visual, idx, labels) / cfg.grad_accum_steps
                loss.backward()
                loss_sum += loss.detach()
            grad_norm = torch.nn.utils.clip_grad_norm_(trainable, cfg.optim.grad_clip or float("inf"))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            last = s == stage.steps - 1
            if (s + 1) % cfg.log_interval == 0 or last:
                now = time.perf_counter()
                n = cfg.log_interval if (s + 1) % cfg.log_interval == 0 else (s + 1) % cfg.log_interval
                metrics.write(event="train", stage=stage_name, step=step, loss=loss_sum.item() / n, lr=lr,
                              grad_norm=float(grad_norm), gates=[round(float(torch.tanh(g.detach())), 4) for g in model.gates()],
                              samples_per_s=n * cfg.micro_batch_size * cfg.grad_accum_steps / (now - t_log),
                              elapsed_s=now - t0)
                loss_sum.zero_()
                t_log = now
            if val and (step % cfg.eval_interval == 0 or last):
                val_loss = eval_loss(model, val, device, autocast)
                metrics.write(event="eval", stage=stage_name, step=step, val_loss=val_loss,
                              elapsed_s=time.perf_counter() - t0)
                tqdm.write(f"step {step}: val loss {val_loss:.4f}")
        last_ckpt = save_vision_checkpoint(model, ckpt_root / f"step-{step:08d}", tokenizer_dir=cfg.init_from,
                                           extra={"train": {"step": step, "stage": stage_name}})
        (run_dir / "latest").write_text(last_ckpt.name + "\n", encoding="utf-8")
    summary = {"event": "end", "steps": step, "val_loss_end": val_loss, "elapsed_s": time.perf_counter() - t0,
               "checkpoint": str(last_ckpt)}
    metrics.write(**summary)
    metrics.close()
    return summary
