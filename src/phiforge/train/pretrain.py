"""`phiforge train`: one code path for 1 process on a CPU and N processes on GPUs (torchrun).

    phiforge train --config F [--set k=v ...] [--resume auto | --overwrite]                  # one process
    torchrun --nproc-per-node 8 -m phiforge train --config configs/phi2-8xh100.yaml          # eight

Start-up checks everything before writing anything: the model config, the data and its tokenizer (the same
tokenizer as init_from's and as the checkpoint's to resume from, by identity), the run directory (locked by
rank 0 for the whole run; a run that holds checkpoints needs --resume auto or --overwrite), the checkpoint to
resume from. Then: the model is built on the meta device, laid out by parallelize() (AC, compile, FSDP2/DDP)
and materialised shard by shard (build.py), the optimizer (AdamW, or Muon + AdamW: optim.py), the resume load
(DCP, checkpointing.py), and the shared step and cadence of engine.py run the steps. The resolved config is
written to RUN/config.yaml when training starts; metrics go to RUN/metrics.jsonl (+ TensorBoard / W&B) on
rank 0.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import torch

from phiforge.model_files import resolve_checkpoint
from phiforge.config import to_dict
from phiforge.data.loader import PackedLoader, eval_batches
from phiforge.data.prefetch import Prefetcher
from phiforge.data.shards import open_token_dataset
from phiforge.errors import ConfigError
from phiforge.evaluation.suite import EvalSuite
from phiforge.faults import run_hooks
from phiforge.model.moe import moe_metrics
from phiforge.tokenizer import (check_same_tokenizer, check_vocab_fits, eot_id, load_tokenizer, token_byte_lengths,
                                tokenizer_identity, tokenizer_sha256)
from phiforge.train.build import build_step, build_text_model, train_model_config
from phiforge.train.checkpointing import Checkpointer
from phiforge.train.config import TrainConfig
from phiforge.train.distributed import DistEnv
from phiforge.train.engine import Cadence, Job, Loop, MoEBalancing, StopRequest, TrainStep, run_distributed
from phiforge.train.metrics import Sinks, flops_per_token, matmul_params, peak_flops
from phiforge.train.optim import describe_split, lr_at, muon_ns_dtype
from phiforge.train.parallelize import Layout, resolve_layout
from phiforge.train.rundir import RunDir
from phiforge.train.validation import evaluate


class TextJob(Job):
    """Language-model training on a prepared token dataset."""

    units = "tokens"

    def __init__(self, cfg: TrainConfig, env: DistEnv, layout: Layout, model, train_model, optimizer,
                 batches: Prefetcher, val, ckpt, tokenizer_dir: Path, suite: EvalSuite | None = None):
        self.cfg, self.env, self.model, self.train_model, self.optimizer = cfg, env, model, train_model, optimizer
        self.layout, self.batches, self.val, self.ckpt = layout, batches, val, ckpt
        self.tokenizer_dir, self.suite = tokenizer_dir, suite
        tok = load_tokenizer(tokenizer_dir)
        self.token_bytes, self.eot = torch.tensor(token_byte_lengths(tok), dtype=torch.float64), eot_id(tok)
        self.units_per_step = cfg.micro_batch_size * cfg.data.seq_len * cfg.grad_accum_steps * env.world_size
        self.loop: Loop | None = None  # set by train(): the state it counts goes into every checkpoint

    def next_batch(self):
        return self.batches.next()

    def loss(self, model, batch):
        return model(*batch)

    def lr(self, step: int) -> float:
        return lr_at(step, self.cfg.max_steps, self.cfg.optim)

    def evaluate(self) -> dict:
        out = evaluate(self.train_model, self.val, self.env, self.token_bytes, self.eot)
        if self._tasks_due():  # eval_tasks: the same forwards on every rank (the plain model, or the FSDP root)
            out.update(self.suite(self.model))
        return out

    def _tasks_due(self) -> bool:
        every, step = self.cfg.eval_tasks_interval, self.loop.step if self.loop is not None else 0
        return self.suite is not None and (not every or step % every == 0 or step == self.cfg.max_steps)

    def train_state(self, step: int) -> dict:
        cfg, world = self.cfg, self.env.world_size
        return {"step": step, "tokens": self.loop.units_done, "seed": cfg.seed, "world_size": world,
                "strategy": self.layout.strategy, "precision": self.layout.precision.name,
                "micro_batch_size": cfg.micro_batch_size, "grad_accum_steps": cfg.grad_accum_steps,
                "seq_len": cfg.data.seq_len, "global_batch": cfg.micro_batch_size * cfg.grad_accum_steps * world,
                "loader": self.batches.state_dict(), "bad_steps": self.loop.bad_total, "max_steps": cfg.max_steps,
                "schedule": asdict(cfg.optim), "model": self.model.cfg.to_dict(),
                "tokenizer_dir": str(self.tokenizer_dir)}

    def save(self, step: int, final: bool) -> Path:
        return self.ckpt.save(step, self.train_model, self.optimizer, self.train_state(step), export_model=final)

    def extra_events(self, step: int) -> list[dict]:
        if not self.model.moe_layers():
            return []
        return [{"event": "moe", "step": step, "tokens": self.loop.units_done, "layers": moe_metrics(self.model)}]

    def oom_settings(self) -> dict:
        p = self.cfg.parallel
        return {"micro_batch_size": self.cfg.micro_batch_size, "data.seq_len": self.cfg.data.seq_len,
                "parallel.activation_checkpointing": p.activation_checkpointing,
                "parallel.strategy": f"{self.layout.strategy} on {self.env.world_size} device(s)",
                "precision": self.cfg.precision, "loss_chunk_rows": self.cfg.loss_chunk_rows}


def check_data(cfg: TrainConfig, mcfg):
    """The dataset, checked against the model before anything is built."""
    dataset = open_token_dataset(cfg.data.dir)
    check_vocab_fits(dataset.vocab_size, mcfg.vocab_size, f"the tokenizer of the data in {cfg.data.dir}")
    if cfg.data.seq_len > mcfg.max_seq_len:
        raise ConfigError(f"data.seq_len {cfg.data.seq_len} exceeds the model's max_seq_len {mcfg.max_seq_len}")
    return dataset


def run_tokenizer(cfg: TrainConfig, dataset) -> Path:
    """The directory whose tokenizer the run trains with and saves in its checkpoints: the `init_from`
    checkpoint's (resolved as `generate --checkpoint` resolves one: a run directory means its latest
    checkpoint), else the dataset's. The tokenizer that made the data must be that tokenizer (compared by
    identity, phiforge.tokenizer.tokenizer_identity, not only by vocabulary size) unless
    allow_tokenizer_mismatch."""
    data_sha = dataset.tokenizer_sha256(cfg.allow_tokenizer_mismatch)
    if not cfg.init_from:
        return Path(cfg.data.dir)
    ckpt = resolve_checkpoint(Path(cfg.init_from))
    check_same_tokenizer(tokenizer_identity(ckpt), f"the init_from checkpoint {ckpt}", data_sha,
                         f"dataset {cfg.data.dir}", cfg.allow_tokenizer_mismatch)
    return ckpt


def train(cfg: TrainConfig, overwrite: bool = False) -> dict:
    """Run training; returns a summary dict (on rank 0 also the last line of metrics.jsonl).
    overwrite: start over in a run directory that holds an earlier run (its checkpoints and metrics go)."""
    return run_distributed(_train, cfg, overwrite)


def _train(cfg: TrainConfig, env: DistEnv, stop: StopRequest, overwrite: bool) -> dict:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    layout = resolve_layout(cfg, env)
    mcfg = train_model_config(cfg)  # first, so a bad preset or model key is reported before any data problem
    dataset = check_data(cfg, mcfg)
    tokenizer_dir = run_tokenizer(cfg, dataset)
    # eval_tasks in the context the run trains with (the positions beyond it are not learnt)
    suite = EvalSuite.load(cfg.eval_tasks, load_tokenizer(tokenizer_dir), cfg.data.seq_len, mcfg.vocab_size) \
        if cfg.eval_tasks else None
    # refuses a run dir it must not touch; rank 0 holds its lock until the run ends
    with RunDir(cfg.out_dir, env, "train", cfg.resume, overwrite, inputs=[cfg.data.dir, cfg.init_from]) as run:
        if run.checkpoint:
            check_same_tokenizer(tokenizer_identity(run.checkpoint), f"checkpoint {run.checkpoint}",
                                 tokenizer_sha256(load_tokenizer(tokenizer_dir)), f"dataset {cfg.data.dir}",
                                 cfg.allow_tokenizer_mismatch)
        return _start(cfg, env, stop, run, layout, mcfg, dataset, tokenizer_dir, suite)


def _start(cfg: TrainConfig, env: DistEnv, stop: StopRequest, run: RunDir, layout: Layout, mcfg, dataset,
           tokenizer_dir: Path, suite: EvalSuite | None) -> dict:
    """Build the model, optimizer, data and checkpointer, load the checkpoint to resume from, train."""
    hooks = run_hooks(env.rank, run.path)
    model, train_model = build_text_model(cfg, mcfg, env, layout)
    # optim.name=muon: Muon for the weight matrices, AdamW for the rest (train/optim.py)
    step_fn = build_step(model, train_model, cfg, cfg.optim, env, layout, hooks=[MoEBalancing(model, env)],
                         run_hooks=hooks)
    # every batch's token ids are checked against the vocabulary (a cheap max; a bad shard is named)
    loader = PackedLoader(cfg.data.dir, "train", cfg.data.seq_len, cfg.micro_batch_size, seed=cfg.data.seed,
                          rank=env.rank, world_size=env.world_size, mixture=cfg.data.mixture,
                          vocab_size=mcfg.vocab_size)
    val = eval_batches(cfg.data.dir, "val", cfg.data.seq_len, cfg.micro_batch_size, cfg.eval_batches,
                       mixture=cfg.data.mixture, vocab_size=mcfg.vocab_size)
    ckpt = Checkpointer(run.path, env, cfg.keep_checkpoints, async_save=cfg.async_checkpoint,
                        tokenizer_dir=tokenizer_dir, run_hooks=hooks,
                        collective_timeout_s=cfg.parallel.collective_timeout_s)
    state = ckpt.load(Path(run.checkpoint), train_model, step_fn.optimizer, mcfg) if run.checkpoint else None
    if state:
        loader.load_state_dict(state["loader"])
    # the next batches are built (and pinned, on CUDA) while a step runs; checkpoints hold the consumed ones' state
    with Prefetcher(loader.next_batch, env.device, state=loader.state_dict) as batches:
        job = TextJob(cfg, env, layout, model, train_model, step_fn.optimizer, batches, val, ckpt, tokenizer_dir,
                      suite)
        run.start(to_dict(cfg))  # everything is checked: from here on the run directory is written
        try:
            return _run(cfg, env, stop, run, job, step_fn, dataset, state)
        except BaseException:
            if job.loop is None or job.loop.step == 0:
                run.discard_if_new()  # a new run that failed before its first step leaves no directory behind
            raise


def _run(cfg: TrainConfig, env: DistEnv, stop: StopRequest, run: RunDir, job: TextJob, step_fn: TrainStep,
         dataset, state: dict | None) -> dict:
    model, mcfg = job.model, job.model.cfg
    start_step = int(state["step"]) if state else 0
    sinks = Sinks(run.path, env.is_main, tensorboard=cfg.tensorboard, wandb_project=cfg.wandb_project,
                  config=to_dict(cfg))
    n_matmul = matmul_params(model)
    flops_tok = flops_per_token(n_matmul, mcfg.n_layer, mcfg.n_embd, cfg.data.seq_len)
    peak, peak_label = peak_flops(env.device, cfg.mfu_peak_tflops)
    cadence = Cadence(cfg.log_interval, cfg.eval_interval, cfg.save_interval, cfg.max_bad_steps, cfg.progress_bar)
    loop = Loop(env, cadence, sinks, stop, job.ckpt, step_fn.run_hooks, flops_tok, peak,
                units_done=int(state["tokens"]) if state else 0,
                bad_total=int(state.get("bad_steps", 0)) if state else 0)
    job.loop = loop
    split = describe_split(model, cfg.optim)
    sinks.write(event="start", params=model.num_params(), params_matmul=n_matmul, device=str(env.device),
                world_size=env.world_size, strategy=job.layout.strategy, precision=job.layout.precision.name,
                fully_shard=job.layout.fully_sharded, float8=cfg.float8, muon_ns_dtype=muon_ns_dtype(step_fn.optimizer),
                tokens_per_step=job.units_per_step, flops_per_token=flops_tok, peak_flops=peak,
                peak_flops_source=peak_label, train_tokens=dataset.split_tokens("train"),
                val_tokens=dataset.split_tokens("val"), resumed_from=run.checkpoint, start_step=start_step,
                optimizer_groups=split)
    for line in split:
        loop.log(f"optimizer {line}")
    if run.checkpoint:
        loop.log(f"resumed from {run.checkpoint} at step {start_step} ({loop.units_done:,} tokens)")
    first_val = loop.evaluate(job, start_step)["val_loss"]
    loop.run(job, step_fn, start_step, cfg.max_steps)
    return loop.finish(tokens=loop.units_done, params=model.num_params(), val_loss_start=first_val,
                       val_loss_end=loop.val.get("val_loss"), checkpoint=str(job.ckpt.last_complete),
                       world_size=env.world_size)
