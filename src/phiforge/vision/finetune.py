"""Two-stage visual instruction fine-tuning (`phiforge vision finetune`) on the training engine's pieces.

stage1 trains the parts it lists (default: projector + cross-attention, the LM frozen), stage2 the parts it
lists (default: + the LM). Each stage has its own optimizer (phiforge.train.optim: AdamW, or Muon + AdamW with
optim.name=muon) over just its trainable parameters and its own warmup + schedule. Metrics go to
RUN/metrics.jsonl, the resolved config to RUN/config.yaml.

Each stage is a Job of the training engine (phiforge.train.engine): the same step (non-finite steps skipped,
MoE balancing hook), the same cadence (logging to metrics.jsonl + TensorBoard / W&B, validation, checkpoints,
SIGTERM saves, the OOM message, faults) as `phiforge train`; the run directory is claimed the same way
(--resume auto or --overwrite for a directory that holds a run). The model is built as `phiforge train` builds
its own (phiforge.train.build): on the meta device, laid out by parallelize() (activation checkpointing and
compile of the LM blocks, FSDP2 or DDP over the ranks; auto means ddp here), then filled from the model built on
the host (init_from and the encoder's weights). A stage changes which parameters train: FSDP2 reads
requires_grad at every gather, DDP registers them when built, so ddp gets a new wrapper per stage. The one
validation loop of phiforge.train.validation gives val_loss per supervised token over all ranks' batches.
A checkpoint RUN/checkpoints/step-N is written every
save_interval steps and at the end of each stage; it is a training checkpoint (model, the stage's optimizer,
RNG, train_state.json with the stage, the step and the data position) and a vision checkpoint (config.json,
model + vision.safetensors) in one, so `--resume auto` and `vision generate --checkpoint RUN` both read it.
"""

from __future__ import annotations

from dataclasses import replace
from functools import partial
from pathlib import Path

import torch
from tqdm import tqdm

from phiforge.model_files import load_checkpoint
from phiforge.config import to_dict
from phiforge.data.prefetch import Prefetcher
from phiforge.errors import CheckpointError, ConfigError
from phiforge.faults import run_hooks
from phiforge.model import Phi2
from phiforge.model.phi2 import LossOutput
from phiforge.model.xattn import XAttnConfig
from phiforge.tokenizer import check_vocab_fits, load_tokenizer
from phiforge.train.build import build_model, build_step, copy_from
from phiforge.train.checkpointing import TRAIN_STATE, Checkpointer, read_train_state
from phiforge.train.config import model_config_from_spec
from phiforge.train.distributed import DistEnv, all_reduce_
from phiforge.train.engine import Cadence, Job, Loop, MoEBalancing, StopRequest, TrainStep, run_distributed
from phiforge.train.metrics import Sinks
from phiforge.train.optim import describe_split, lr_at
from phiforge.train.parallelize import apply_ddp, resolve_layout
from phiforge.train.rundir import RunDir
from phiforge.train.validation import validate
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


def supervised_nats(model: VisionLM, batch) -> torch.Tensor:
    """score() for validate(): [nats, supervised tokens] of one batch."""
    device = next(model.parameters()).device
    visual, idx, labels = (t.to(device) for t in batch)
    n = (labels != -100).sum()
    return torch.stack([model(visual, idx, labels).lm_loss.double() * n, n.double()])


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


def finetune(cfg: FinetuneConfig, overwrite: bool = False) -> dict:
    """Run both stages; returns the summary. overwrite: start over in a run directory that holds a run."""
    if cfg.stage1.steps == 0 and cfg.stage2.steps == 0:
        raise ConfigError("stage1.steps and stage2.steps are both 0: nothing to train")
    return run_distributed(_finetune, cfg, overwrite)


class VisionStage(Job):
    """One stage of the fine-tune: its trainable parts, its own optimizer and lr schedule."""

    units = "samples"

    def __init__(self, name: str, run: "VisionRun"):
        self.name, self.run, self.tags = name, run, {"stage": name}
        self.stage = getattr(run.cfg, name)
        self.optim_cfg = replace(run.cfg.optim, lr=self.stage.lr, warmup_steps=self.stage.warmup_steps)
        self.units_per_step = run.global_batch * run.cfg.grad_accum_steps
        self.optimizer = None

    def next_batch(self):
        self.run.consumed += 1  # counted here, on the training thread: the batches consumed, not those built ahead
        return self.run.batches.next()

    def loss(self, model, batch) -> LossOutput:
        out = model(*batch)
        env = self.run.env
        if env.world_size == 1:
            return out
        # weight each rank's mean by its share of the global batch's supervised tokens
        n = (batch[2] != -100).sum().float()
        share = n * env.world_size / all_reduce_(n.clone(), env)
        return LossOutput(out.lm_loss * share, None if out.aux_loss is None else out.aux_loss * share)

    def lr(self, step: int) -> float:
        return lr_at(step, self.stage.steps, self.optim_cfg)

    def evaluate(self) -> dict:
        r = self.run
        if not r.val:
            return {}
        nats, tokens = validate(r.train_model, r.val, supervised_nats, r.env)
        return {"val_loss": nats / max(tokens, 1)}

    def save(self, step: int, final: bool) -> Path:
        r = self.run
        state = {"kind": "vision-finetune", "step": r.loop.step, "stage": self.name, "stage_step": step,
                 "batches": r.consumed, "global_batch": r.global_batch, "seed": r.cfg.seed,
                 "world_size": r.env.world_size, "micro_batch_size": r.cfg.micro_batch_size,
                 "grad_accum_steps": r.cfg.grad_accum_steps, "samples": r.loop.units_done,
                 "bad_steps": r.loop.bad_total, "model": r.model.lm.cfg.to_dict()}
        extra = {"train": {"step": r.loop.step, "stage": self.name}}
        weights = full_state_dict(r.model)  # every rank takes part (FSDP gathers); rank 0 writes
        return r.ckpt.save(r.loop.step, r.model, self.optimizer, state, export_model=lambda d: write_vision_files(
            weights, r.model.lm.cfg, r.model.vcfg, d, r.tokenizer_dir, extra))

    def log_fields(self) -> dict:
        return {"gates": [round(v, 4) for v in self.run.model.gate_values()]}

    def oom_settings(self) -> dict:
        c = self.run.cfg
        return {"micro_batch_size": c.micro_batch_size, "data.max_len": c.data.max_len,
                "parallel.activation_checkpointing": c.parallel.activation_checkpointing,
                "precision": c.precision, "stage": self.name}


def full_state_dict(model: torch.nn.Module) -> dict:
    """The model's whole state dict on the host, on rank 0 (gathered from every rank's shards under FSDP)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


class VisionRun:
    """Everything the stages share: the model, data, checkpointer and the loop."""

    def __init__(self, cfg: FinetuneConfig, env: DistEnv, source: VisionLM, tok, run: RunDir):
        self.cfg, self.env, self.run_dir = cfg, env, run
        self.layout = resolve_layout(cfg, env, auto_many="ddp")
        self.hooks = run_hooks(env.rank, run.path)
        max_len = min(cfg.data.max_len, source.lm.cfg.max_seq_len)
        enc = source.vcfg.encoder
        self.train_set = VisionDataset(cfg.data.train, tok, enc, max_len, cfg.data.image_dir)
        self.val_set = VisionDataset(cfg.data.val, tok, enc, max_len, cfg.data.image_dir) if cfg.data.val else None
        self.val = None
        if self.val_set is not None:  # the same batches at every validation, split across the ranks
            it = self.val_set.shuffled_batches(cfg.micro_batch_size, seed=0)
            n = min(cfg.eval_batches, max(1, len(self.val_set) // cfg.micro_batch_size))
            self.val = [next(it) for _ in range(n)]
        self.global_batch = cfg.micro_batch_size * env.world_size
        self.tokenizer_dir = Path(cfg.init_from) if cfg.init_from else None
        self.ckpt = Checkpointer(run.path, env, cfg.keep_checkpoints, tokenizer_dir=self.tokenizer_dir,
                                 run_hooks=self.hooks)
        self.resumed = _resume_point(cfg, Path(run.checkpoint), self.global_batch) if run.checkpoint else None
        self.consumed = int(self.resumed["batches"]) if self.resumed else 0
        self.loop: Loop | None = None
        self.ddp_parts = getattr(cfg, self.resumed["stage"] if self.resumed else STAGES[0]).train
        make = partial(_skeleton, source, self.ddp_parts)
        self.model, self.train_model = build_model(make, cfg, self.layout, partial(copy_from, source, device=env.device),
                                                   body=lambda m: m.lm)
        shuffled = self.train_set.shuffled_batches(cfg.micro_batch_size, seed=cfg.seed, start=self.consumed,
                                                   rank=env.rank, world_size=env.world_size)
        # last, so nothing can fail with the thread running before _start's `finally` closes it
        self.batches = Prefetcher(partial(next, shuffled), env.device)  # built (and pinned, on CUDA) ahead

    def step_fn(self, stage: VisionStage) -> TrainStep:
        """The stage's optimizer and train step over the parameters it trains (set_trainable first)."""
        if self.layout.wraps_ddp and stage.stage.train != self.ddp_parts:
            self.train_model, self.ddp_parts = apply_ddp(self.model), stage.stage.train
        step = build_step(self.model, self.train_model, self.cfg, stage.optim_cfg, self.env, self.layout,
                          hooks=[MoEBalancing(self.model.lm, self.env)], run_hooks=self.hooks)
        stage.optimizer = step.optimizer
        return step


def _skeleton(source: VisionLM, parts: list[str]) -> VisionLM:
    """`source`'s architecture (built on the meta device by build_model), training `parts`."""
    model = VisionLM(Phi2(source.lm.cfg), source.vcfg, load_encoder_weights=False)
    model.set_trainable(parts)
    return model


def _finetune(cfg: FinetuneConfig, env: DistEnv, stop: StopRequest, overwrite: bool) -> dict:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)  # the same on every rank: every rank builds the same initial weights
    tok = load_tokenizer(cfg.init_from)
    source = build_vision_model(cfg)  # on the host; the model that trains is laid out and filled from it
    check_vocab_fits(tok.get_vocab_size(), source.lm.cfg.vocab_size,
                     f"the tokenizer of {cfg.init_from}" if cfg.init_from else "the built-in GPT-2 tokenizer")
    inputs = [cfg.data.train, cfg.data.val, cfg.data.image_dir, cfg.init_from]
    with RunDir(cfg.out_dir, env, "vision finetune", cfg.resume, overwrite, inputs=inputs) as run:  # rank 0 locks it
        return _start(cfg, env, stop, source, tok, run)


def _start(cfg: FinetuneConfig, env: DistEnv, stop: StopRequest, source: VisionLM, tok, run: RunDir) -> dict:
    vr = VisionRun(cfg, env, source, tok, run)
    del source
    with vr.batches:  # the prefetch thread stops however the run ends
        for name in ("train", "val"):
            ds = getattr(vr, f"{name}_set")
            skipped = {k: v for k, v in (ds.stats if ds else {}).items() if k not in ("records", "used") and v}
            if skipped and env.is_main:
                tqdm.write(f"{name} data: skipped {sum(skipped.values())} of {ds.stats['records']} records: {skipped}")
        # written when training starts: the encoder fills in what it resolved (image size, mean/std, HF config)
        run.start(to_dict(replace(cfg, vision=vr.model.vcfg)))
        try:
            return _run_stages(cfg, env, stop, vr)
        except BaseException:
            if vr.loop is None or vr.loop.step == 0:
                run.discard_if_new()  # a new run that failed before its first step leaves no directory behind
            raise


def _run_stages(cfg: FinetuneConfig, env: DistEnv, stop: StopRequest, vr: VisionRun) -> dict:
    model, resumed = vr.model, vr.resumed
    sinks = Sinks(vr.run_dir.path, env.is_main, tensorboard=cfg.tensorboard, wandb_project=cfg.wandb_project,
                  config=to_dict(cfg))
    cadence = Cadence(cfg.log_interval, cfg.eval_interval, cfg.save_interval, cfg.max_bad_steps, cfg.progress_bar)
    vr.loop = loop = Loop(env, cadence, sinks, stop, vr.ckpt, vr.hooks,
                          units_done=int(resumed.get("samples", 0)) if resumed else 0,
                          bad_total=int(resumed.get("bad_steps", 0)) if resumed else 0)
    loop.step = int(resumed["step"]) if resumed else 0
    sinks.write(event="start", params=sum(p.numel() for p in model.parameters()), device=str(env.device),
                world_size=env.world_size, strategy=vr.layout.strategy, precision=vr.layout.precision.name,
                fully_shard=vr.layout.fully_sharded, train_data=dict(vr.train_set.stats),
                val_data=dict(vr.val_set.stats) if vr.val_set else None,
                samples_per_step=vr.global_batch * cfg.grad_accum_steps, resumed_from=vr.run_dir.checkpoint,
                start_step=loop.step)
    first = VisionStage(STAGES[0], vr)
    loop.evaluate(first, loop.step)
    offset = 0
    for name in STAGES:
        stage = VisionStage(name, vr)
        steps = stage.stage.steps
        done_before = resumed and STAGES.index(name) < STAGES.index(resumed["stage"])
        if steps == 0 or done_before:
            offset += steps
            continue
        n_train = model.set_trainable(stage.stage.train)
        if n_train == 0:
            raise ConfigError(f"{name}.train ({stage.stage.train}) leaves nothing to train")
        step_fn = vr.step_fn(stage)
        start = 0
        if resumed and name == resumed["stage"]:
            vr.ckpt.load(Path(vr.run_dir.checkpoint), model, stage.optimizer, model.lm.cfg)  # model, optimizer, RNG
            start = int(resumed["stage_step"])
            loop.log(f"resumed from {vr.run_dir.checkpoint} at step {loop.step} ({name} step {start})")
        if start < steps:
            split = describe_split(model, stage.optim_cfg)
            sinks.write(event="stage", stage=name, steps=steps, train=stage.stage.train, trainable_params=n_train,
                        optimizer_groups=split)
            loop.log(f"{name}: training {', '.join(stage.stage.train)} ({n_train:,} parameters) for {steps} steps")
            for line in split:
                loop.log(f"{name} optimizer {line}")
            if loop.run(stage, step_fn, start, steps, offset=offset, desc=name):
                break  # stopped by a signal: saved, resume continues here
        offset += steps
    return loop.finish(samples=loop.units_done, val_loss_end=loop.val.get("val_loss"),
                       checkpoint=str(vr.ckpt.last_complete))
