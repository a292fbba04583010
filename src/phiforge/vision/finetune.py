"""Two-stage visual instruction fine-tuning (`phiforge vision finetune`) on the training engine's pieces.

stage1 trains the parts it lists (default: projector + cross-attention, the LM frozen), stage2 the parts it
lists (default: + the LM). Each stage has its own AdamW (phiforge.train.optim) over just its trainable
parameters and its own warmup + schedule. Metrics go to RUN/metrics.jsonl, the resolved config to
RUN/config.yaml.

From phiforge.train: the process group (one process, or N under torchrun, as DDP), activation checkpointing
and compile of the LM blocks, and the DCP Checkpointer. A checkpoint RUN/checkpoints/step-N is written every
save_interval steps and at the end of each stage; it is a training checkpoint (model, the stage's optimizer,
RNG, train_state.json with the stage, the step and the data position) and a vision checkpoint (config.json,
model + vision.safetensors) in one, so `--resume auto` and `vision generate --checkpoint RUN` both read it.
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import torch
import yaml
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from phiforge.checkpoint import load_checkpoint
from phiforge.config import to_dict
from phiforge.errors import CheckpointError, ConfigError
from phiforge.model import Phi2
from phiforge.model.xattn import XAttnConfig
from phiforge.tokenizer import load_tokenizer
from phiforge.train.config import model_config_from_spec
from phiforge.train.checkpointing import TRAIN_STATE, Checkpointer, find_resume, read_train_state
from phiforge.train.distributed import DistEnv, all_reduce_, barrier, broadcast_object, init_distributed, shutdown
from phiforge.train.faults import Faults
from phiforge.train.optim import build_optimizer, lr_at
from phiforge.train.parallelize import (apply_activation_checkpointing, apply_compile, clip_grad_norm_, grad_sync,
                                        resolve_strategy)
from phiforge.train.runtime import MetricsLog, autocast_context
from phiforge.vision.config import FinetuneConfig
from phiforge.vision.data import VisionDataset
from phiforge.vision.model import (VisionLM, add_cross_attention, is_vision_checkpoint, load_vision_checkpoint,
                                   write_vision_files)

STAGES = ("stage1", "stage2")


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


def _resume_point(cfg: FinetuneConfig, ckpt: Path, global_batch: int) -> dict:
    """train_state.json of a vision fine-tune checkpoint, checked against this run."""
    state = read_train_state(ckpt)
    if state.get("kind") != "vision-finetune":
        raise CheckpointError(f"{ckpt} is not a vision fine-tune checkpoint (resume text runs with phiforge train)")
    if state["global_batch"] != global_batch or state["seed"] != cfg.seed:
        raise CheckpointError(f"{ckpt} was saved with global micro-batch {state['global_batch']} and seed "
                              f"{state['seed']}; this run has {global_batch} and {cfg.seed}: the data position "
                              "would not carry over (keep micro_batch_size x ranks and seed)")
    if state["stage"] not in STAGES:
        raise CheckpointError(f"{ckpt}: unknown stage {state['stage']!r} in {TRAIN_STATE}")
    return state


def finetune(cfg: FinetuneConfig) -> dict:
    if cfg.stage1.steps == 0 and cfg.stage2.steps == 0:
        raise ConfigError("stage1.steps and stage2.steps are both 0: nothing to train")
    env = init_distributed(cfg.device)
    try:
        return _finetune(cfg, env)
    finally:
        shutdown(env)


def _finetune(cfg: FinetuneConfig, env: DistEnv) -> dict:
    run_dir = Path(cfg.out_dir)
    main, world, device = env.is_main, env.world_size, env.device
    # auto means fsdp for several ranks in the text engine; the vision model has no FSDP layout yet: DDP
    strategy = resolve_strategy(cfg, world)
    strategy = "ddp" if strategy == "fsdp" else strategy
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)  # the same on every rank: every rank builds the same initial weights
    autocast = autocast_context(device, cfg.precision)
    faults = Faults.from_env(env.rank)

    tok = load_tokenizer(cfg.init_from)
    model = build_vision_model(cfg)
    # written after building: the encoder fills in what it resolved (image size, mean/std, HF config)
    if main:
        (run_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(replace(cfg, vision=model.vcfg)),
                                                            sort_keys=False), encoding="utf-8")
    if tok.get_vocab_size() > model.lm.cfg.vocab_size:
        raise ConfigError(f"the tokenizer has {tok.get_vocab_size()} tokens but the model's vocabulary has "
                          f"{model.lm.cfg.vocab_size}; choose a larger preset or set model.vocab_size")
    max_len = min(cfg.data.max_len, model.lm.cfg.max_seq_len)
    enc = model.vcfg.encoder
    train_set = VisionDataset(cfg.data.train, tok, enc, max_len, cfg.data.image_dir)
    val_set = VisionDataset(cfg.data.val, tok, enc, max_len, cfg.data.image_dir) if cfg.data.val else None
    for name, ds in (("train", train_set), ("val", val_set)):
        skipped = {k: v for k, v in (ds.stats if ds else {}).items() if k not in ("records", "used") and v}
        if skipped and main:
            tqdm.write(f"{name} data: skipped {sum(skipped.values())} of {ds.stats['records']} records: {skipped}")
    val = None
    if val_set is not None:  # every rank evaluates the same batches
        it = val_set.shuffled_batches(cfg.micro_batch_size, seed=0)
        val = [next(it) for _ in range(min(cfg.eval_batches, max(1, len(val_set) // cfg.micro_batch_size)))]
    model.to(device)
    # AC and compile wrap the LM blocks in place; parameter names gain wrapper prefixes, state-dict keys do not
    if cfg.parallel.activation_checkpointing != "none":
        apply_activation_checkpointing(model.lm, cfg)
    if cfg.compile:
        apply_compile(model.lm, cfg)
    global_batch = cfg.micro_batch_size * world

    tokenizer_dir = Path(cfg.init_from) if cfg.init_from else None
    ckpt = Checkpointer(run_dir, env, cfg.keep_checkpoints, tokenizer_dir=tokenizer_dir, fault=faults)
    resume_from = broadcast_object(str(p) if (p := find_resume(run_dir, cfg.resume)) else None, env)
    resumed = _resume_point(cfg, Path(resume_from), global_batch) if resume_from else None
    step, consumed = (int(resumed["step"]), int(resumed["batches"])) if resumed else (0, 0)
    batches = train_set.shuffled_batches(cfg.micro_batch_size, seed=cfg.seed, start=consumed, rank=env.rank,
                                         world_size=world)

    metrics = MetricsLog(run_dir / "metrics.jsonl") if main else None
    write = metrics.write if main else (lambda **kw: None)
    log = tqdm.write if main else (lambda *a, **k: None)
    write(event="start", params=sum(p.numel() for p in model.parameters()), device=str(device), world_size=world,
          strategy=strategy, train_data=dict(train_set.stats), val_data=dict(val_set.stats) if val_set else None,
          samples_per_step=global_batch * cfg.grad_accum_steps, resumed_from=resume_from, start_step=step)
    t0 = time.perf_counter()
    val_loss = eval_loss(model, val, device, autocast) if val else None
    if val:
        write(event="eval", step=step, val_loss=val_loss, elapsed_s=0.0)
    last_ckpt = Path(resume_from) if resume_from else None
    for stage_name in STAGES:
        stage = getattr(cfg, stage_name)
        if stage.steps == 0 or (resumed and STAGES.index(stage_name) < STAGES.index(resumed["stage"])):
            continue
        n_train = model.set_trainable(stage.train)
        if n_train == 0:
            raise ConfigError(f"{stage_name}.train ({stage.train}) leaves nothing to train")
        trainable = [p for p in model.parameters() if p.requires_grad]
        optim_cfg = replace(cfg.optim, lr=stage.lr, warmup_steps=stage.warmup_steps)
        # the fused kernel also exists for CPU, where it is several times faster than the default
        optimizer = build_optimizer(model, optim_cfg, fused=device.type in ("cpu", "cuda"))
        # DDP registers the parameters that need gradients when it is built: one wrapper per stage
        train_model = model
        if strategy == "ddp":
            train_model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
        start = 0
        if resumed and stage_name == resumed["stage"]:
            ckpt.load(Path(resume_from), model, optimizer, model.lm.cfg)  # model, this stage's AdamW, RNG
            start = int(resumed["stage_step"])
            log(f"resumed from {resume_from} at step {step} ({stage_name} step {start})")
        if start >= stage.steps:
            continue  # resumed from this stage's last checkpoint
        write(event="stage", stage=stage_name, steps=stage.steps, train=stage.train, trainable_params=n_train)
        log(f"{stage_name}: training {', '.join(stage.train)} ({n_train:,} parameters) for {stage.steps} steps")

        def save(s: int) -> Path:
            state = {"kind": "vision-finetune", "step": step, "stage": stage_name, "stage_step": s,
                     "batches": consumed, "global_batch": global_batch, "seed": cfg.seed, "world_size": world,
                     "micro_batch_size": cfg.micro_batch_size, "grad_accum_steps": cfg.grad_accum_steps,
                     "model": model.lm.cfg.to_dict()}
            extra = {"train": {"step": step, "stage": stage_name}}
            return ckpt.save(step, model, optimizer, state,
                             export_model=lambda d: write_vision_files(model, d, tokenizer_dir, extra))

        loss_sum, t_log = torch.zeros((), device=device), time.perf_counter()
        bar = tqdm(range(start, stage.steps), initial=start, total=stage.steps, desc=stage_name, unit="step",
                   dynamic_ncols=True, disable=not main)
        for s in bar:
            lr = lr_at(s, stage.steps, optim_cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            for micro in range(cfg.grad_accum_steps):
                visual, idx, labels = (t.to(device, non_blocking=True) for t in next(batches))
                consumed += 1
                with grad_sync(train_model, strategy, micro == cfg.grad_accum_steps - 1):
                    with autocast():
                        loss = train_model(visual, idx, labels)
                    if world > 1:  # weight each rank's mean by its share of the global batch's supervised tokens
                        n = (labels != -100).sum().float()
                        loss = loss * (n * world / all_reduce_(n.clone(), env))
                    (loss / cfg.grad_accum_steps).backward()
                loss_sum += loss.detach() / cfg.grad_accum_steps
            if faults is not None:
                faults.during_step(step + 1, run_dir)
            grad_norm = clip_grad_norm_(trainable, cfg.optim.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            last = s == stage.steps - 1
            if (s + 1) % cfg.log_interval == 0 or last:
                now = time.perf_counter()
                n = cfg.log_interval if (s + 1) % cfg.log_interval == 0 else (s + 1) % cfg.log_interval
                loss_log = all_reduce_(loss_sum, env).item() / world / n
                write(event="train", stage=stage_name, step=step, loss=loss_log, lr=lr, grad_norm=float(grad_norm),
                      gates=[round(float(torch.tanh(g.detach())), 4) for g in model.gates()],
                      samples_per_s=n * global_batch * cfg.grad_accum_steps / (now - t_log), elapsed_s=now - t0)
                loss_sum.zero_()
                t_log = now
            if val and (step % cfg.eval_interval == 0 or last):
                val_loss = eval_loss(model, val, device, autocast)
                write(event="eval", stage=stage_name, step=step, val_loss=val_loss, elapsed_s=time.perf_counter() - t0)
                log(f"step {step}: val loss {val_loss:.4f}")
            if last or (cfg.save_interval and step % cfg.save_interval == 0):
                last_ckpt = save(s + 1)
            if faults is not None:
                faults.after_step(step, run_dir)
        bar.close()
    barrier(env)
    summary = {"event": "end", "steps": step, "val_loss_end": val_loss, "elapsed_s": time.perf_counter() - t0,
               "checkpoint": str(last_ckpt)}
    write(**summary)
    if metrics is not None:
        metrics.close()
    summary["rank"] = env.rank
    return summary
