"""The training engine: one code path for 1 process on a CPU and N processes on GPUs (torchrun).

    phiforge train --config F [--set k=v ...] [--resume auto]                      # one process
    torchrun --nproc-per-node 8 -m phiforge train --config configs/phi2-8xh100.yaml   # eight

Steps: process group (distributed.py) -> model built identically on every rank -> parallelize() (AC, compile,
FSDP2/DDP) -> AdamW -> resume (DCP, checkpointing.py) -> evaluate -> steps of grad_accum_steps micro-batches
(gradient communication only on the last one), a global grad-norm clip and the AdamW step, with validation
every eval_interval, sharded checkpoints every save_interval and at the end, metrics on rank 0 to
RUN/metrics.jsonl (+ TensorBoard / W&B) and a progress bar. The resolved config is written to RUN/config.yaml.

Faults: a step whose loss or gradient norm is not finite on any rank is skipped (no optimizer step) and
counted; max_bad_steps in a row halt the run naming the last good checkpoint. SIGTERM/SIGINT finish the
current step, save a checkpoint and return normally (exit 0). CUDA OOM becomes a message naming the settings
that reduce memory. Once per step the ranks agree on (loss, stop request) with one small all-reduce.
"""

from __future__ import annotations

import math
import signal
import threading
import time
from dataclasses import asdict
from pathlib import Path

import torch
import yaml
from tqdm import tqdm

from phiforge.checkpoint import load_checkpoint
from phiforge.config import to_dict
from phiforge.data.loader import PackedLoader, eval_batches
from phiforge.data.shards import open_token_dataset
from phiforge.errors import ConfigError, PhiforgeError
from phiforge.model import Phi2
from phiforge.model.moe import moe_metrics
from phiforge.train.checkpointing import Checkpointer, find_resume
from phiforge.train.config import TrainConfig
from phiforge.train.distributed import DistEnv, all_reduce_, barrier, broadcast_object, init_distributed, shutdown
from phiforge.train.faults import Faults
from phiforge.train.metrics import Sinks, flops_per_token, matmul_params, peak_flops, peak_memory
from phiforge.train.optim import build_optimizer, lr_at
from phiforge.train.parallelize import (autocast_for, build_mesh, clip_grad_norm_, grad_sync, parallelize,
                                        resolve_precision, resolve_strategy)
from phiforge.train.runtime import MetricsLog, autocast_context, resolve_device  # noqa: F401 (re-exported)


class TrainingHalted(PhiforgeError):
    """Too many consecutive non-finite steps."""


def oom_message(cfg: TrainConfig, step: int, strategy: str, world: int) -> str:
    p = cfg.parallel
    return (f"CUDA out of memory at step {step} (micro_batch_size={cfg.micro_batch_size}, data.seq_len="
            f"{cfg.data.seq_len}, parallel.activation_checkpointing={p.activation_checkpointing}, "
            f"parallel.strategy={strategy} on {world} GPU(s), precision={cfg.precision}): lower micro_batch_size "
            "(raise grad_accum_steps to keep the global batch), set parallel.activation_checkpointing=full (or "
            "selective), lower data.seq_len, use parallel.strategy=fsdp on more GPUs, or precision=bf16-mixed; "
            "`phiforge plan` predicts what fits")


class StopRequest:
    """SIGTERM / SIGINT set a flag; the loop checkpoints at the end of the step and exits 0.
    A second SIGINT interrupts at once."""

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict = {}

    def _handler(self, signum, frame):
        if self.signum == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handler)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


@torch.no_grad()
def evaluate(train_model: torch.nn.Module, batches, device: torch.device, autocast, env: DistEnv | None = None) -> float:
    """Mean loss over `batches`, split across ranks (each rank runs the same number of forwards)."""
    rank, world = (env.rank, env.world_size) if env is not None else (0, 1)
    mine = batches[rank::world]
    n = -(-len(batches) // world)
    total = torch.zeros(2, device=device, dtype=torch.float64)
    train_model.eval()
    for i in range(n):
        x, y = mine[i] if i < len(mine) else batches[0]
        with autocast():
            loss = train_model(x.to(device), y.to(device))
        if i < len(mine):
            total += torch.stack([loss.double(), torch.ones((), device=device, dtype=torch.float64)])
    train_model.train()
    if env is not None:
        all_reduce_(total, env)
    return (total[0] / total[1].clamp_min(1)).item()


def build_model(cfg: TrainConfig) -> Phi2:
    if cfg.init_from:
        return load_checkpoint(cfg.init_from).train()
    return Phi2(cfg.model_config())


def train(cfg: TrainConfig) -> dict:
    """Run training; returns a summary dict (on rank 0 also the last line of metrics.jsonl)."""
    env = init_distributed(cfg.device)
    stop = StopRequest()
    stop.install()
    try:
        return _train(cfg, env, stop)
    finally:
        stop.restore()
        shutdown(env)


def _train(cfg: TrainConfig, env: DistEnv, stop: StopRequest) -> dict:
    run_dir = Path(cfg.out_dir)
    main = env.is_main
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False), encoding="utf-8")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)  # the same on every rank: every rank builds the same initial weights
    device, world = env.device, env.world_size
    strategy = resolve_strategy(cfg, world)
    precision = resolve_precision(cfg, device)
    faults = Faults.from_env(env.rank)

    model = build_model(cfg)  # first, so a bad preset or model key is reported before any data problem
    dataset = open_token_dataset(cfg.data.dir)
    mcfg = model.cfg
    if dataset.vocab_size > mcfg.vocab_size:
        raise ConfigError(f"data in {cfg.data.dir} uses a tokenizer of {dataset.vocab_size} tokens but the model's "
                          f"vocabulary has {mcfg.vocab_size}; choose a larger preset or set model.vocab_size")
    if cfg.data.seq_len > mcfg.max_seq_len:
        raise ConfigError(f"data.seq_len {cfg.data.seq_len} exceeds the model's max_seq_len {mcfg.max_seq_len}")
    n_params = model.num_params()
    n_matmul = matmul_params(model)
    model.to(device).train()
    mesh = build_mesh(cfg, env)
    train_model = parallelize(model, cfg, mesh, env)
    autocast = autocast_for(cfg, strategy, device)
    # fused AdamW: one kernel per step; on CPU only for plain (non-DTensor) parameters, where it is ~2x foreach's speed
    optimizer = build_optimizer(model, cfg.optim, fused=device.type == "cuda" or strategy == "none")
    params = [p for p in model.parameters() if p.requires_grad]
    loader = PackedLoader(cfg.data.dir, "train", cfg.data.seq_len, cfg.micro_batch_size, seed=cfg.data.seed,
                          rank=env.rank, world_size=world, mixture=cfg.data.mixture)
    val = eval_batches(cfg.data.dir, "val", cfg.data.seq_len, cfg.micro_batch_size, cfg.eval_batches,
                       mixture=cfg.data.mixture)
    tokens_per_step = cfg.micro_batch_size * cfg.data.seq_len * cfg.grad_accum_steps * world
    flops_tok = flops_per_token(n_matmul, mcfg.n_layer, mcfg.n_embd, cfg.data.seq_len)
    peak, peak_label = peak_flops(device, cfg.mfu_peak_tflops)

    tokenizer_dir = Path(cfg.init_from) if cfg.init_from else Path(cfg.data.dir)
    ckpt = Checkpointer(run_dir, env, cfg.keep_checkpoints, async_save=cfg.async_checkpoint,
                        tokenizer_dir=tokenizer_dir, fault=faults)
    resume_from = broadcast_object(str(p) if (p := find_resume(run_dir, cfg.resume)) else None, env)
    start_step, tokens, bad_total = 0, 0, 0
    if resume_from:
        state = ckpt.load(Path(resume_from), train_model, optimizer, mcfg)
        start_step, tokens, bad_total = int(state["step"]), int(state["tokens"]), int(state.get("bad_steps", 0))
        loader.load_state_dict(state["loader"])

    sinks = Sinks(run_dir, main, tensorboard=cfg.tensorboard, wandb_project=cfg.wandb_project, config=to_dict(cfg))
    log = tqdm.write if main else (lambda *a, **k: None)
    sinks.write(event="start", params=n_params, params_matmul=n_matmul, device=str(device), world_size=world,
                strategy=strategy, precision=precision, tokens_per_step=tokens_per_step,
                flops_per_token=flops_tok, peak_flops=peak, peak_flops_source=peak_label,
                train_tokens=dataset.split_tokens("train"), val_tokens=dataset.split_tokens("val"),
                resumed_from=resume_from, start_step=start_step)
    if resume_from:
        log(f"resumed from {resume_from} at step {start_step} ({tokens:,} tokens)")

    def train_state(step: int) -> dict:
        return {"step": step, "tokens": tokens, "seed": cfg.seed, "world_size": world, "strategy": strategy,
                "precision": precision, "micro_batch_size": cfg.micro_batch_size,
                "grad_accum_steps": cfg.grad_accum_steps, "seq_len": cfg.data.seq_len,
                "global_batch": cfg.micro_batch_size * cfg.grad_accum_steps * world,
                "loader": loader.state_dict(), "bad_steps": bad_total, "max_steps": cfg.max_steps,
                "schedule": asdict(cfg.optim), "model": mcfg.to_dict(), "tokenizer_dir": str(tokenizer_dir)}

    def save(step: int, final: bool = False) -> Path:
        return ckpt.save(step, train_model, optimizer, train_state(step), export_model=final)

    t0 = time.perf_counter()
    val_loss = evaluate(train_model, val, device, autocast, env)
    first_val = val_loss
    sinks.write(event="eval", step=start_step, tokens=tokens, val_loss=val_loss, val_ppl=math.exp(min(val_loss, 50)))
    log(f"step {start_step}: val loss {val_loss:.4f}")

    bar = tqdm(total=cfg.max_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True,
               disable=not (main and cfg.progress_bar))
    t_log, tokens_at_log = time.perf_counter(), tokens
    loss_sum, good_in_interval = 0.0, 0
    moe_layers = list(model.moe_layers().values())
    consecutive_bad, first_bad = 0, 0
    stopped_by: str | None = None
    step = start_step
    last_saved = start_step if resume_from else None
    grad_norm = float("nan")
    try:
        for step in range(start_step + 1, cfg.max_steps + 1):
            lr = lr_at(step - 1, cfg.max_steps, cfg.optim)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss_acc = torch.zeros((), device=device)
            lm_acc = torch.zeros((), device=device)
            for micro in range(cfg.grad_accum_steps):
                x, y = loader.next_batch()
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                with grad_sync(train_model, strategy, micro == cfg.grad_accum_steps - 1, cfg.parallel.defer_grad_sync):
                    with autocast():
                        loss = train_model(x, y)
                    if faults is not None:
                        loss = faults.before_backward(step, loss)
                    (loss / cfg.grad_accum_steps).backward()
                loss_acc += loss.detach().float() / cfg.grad_accum_steps
                lm_acc += model.lm_loss.float() / cfg.grad_accum_steps  # the LM loss, without MoE balancing terms
            if faults is not None:
                faults.during_step(step, run_dir)
            norm = clip_grad_norm_(params, cfg.optim.grad_clip)
            # one small all-reduce per step: the global loss, and whether any rank was asked to stop
            agreed = all_reduce_(torch.stack([loss_acc, lm_acc, torch.tensor(float(stop.signum is not None),
                                                                             device=device)]), env)
            loss_g, lm_g, stop_votes, grad_norm = torch.cat([agreed, norm.reshape(1).float()]).tolist()
            loss_g, lm_g = loss_g / world, lm_g / world
            if math.isfinite(loss_g) and math.isfinite(grad_norm):
                optimizer.step()
                consecutive_bad = 0
                if world > 1:
                    for moe in moe_layers:  # every rank routes its own tokens: balance on the global load
                        if moe._load_sum is not None:
                            all_reduce_(moe._load_sum, env)
                for moe in moe_layers:
                    moe.update_bias()  # aux-loss-free balancing (no-op unless moe.bias_balancing)
                loss_sum += lm_g
                good_in_interval += 1
            else:
                bad_total += 1
                if consecutive_bad == 0:
                    first_bad = step
                consecutive_bad += 1
                for moe in moe_layers:
                    moe._load_sum = None  # no balancing update from a skipped step
                sinks.write(event="skip", step=step, loss=loss_g if math.isfinite(loss_g) else str(loss_g),
                            grad_norm=grad_norm if math.isfinite(grad_norm) else str(grad_norm),
                            skipped_total=bad_total, consecutive=consecutive_bad)
                log(f"step {step}: non-finite loss or gradient norm ({loss_g}, {grad_norm}); step skipped")
            optimizer.zero_grad(set_to_none=True)
            tokens += tokens_per_step
            bar.update(1)
            if consecutive_bad >= cfg.max_bad_steps:
                ckpt.wait()
                last = ckpt.last_complete
                raise TrainingHalted(
                    f"halting at step {step}: {consecutive_bad} consecutive steps with a non-finite loss or gradient "
                    f"norm (steps {first_bad}-{step}, all skipped); last good checkpoint: "
                    + (f"{last} (restart with --resume auto, e.g. with a lower optim.lr)" if last
                       else "none saved yet (lower optim.lr or raise optim.warmup_steps and start again)"))
            ckpt.poll()

            if step % cfg.log_interval == 0 or step == cfg.max_steps:
                now = time.perf_counter()
                tok_s = (tokens - tokens_at_log) / max(now - t_log, 1e-9)
                train_loss = loss_sum / good_in_interval if good_in_interval else float("nan")
                rec = {"event": "train", "step": step, "tokens": tokens,
                       "loss": train_loss if good_in_interval else None, "lr": lr, "grad_norm": grad_norm,
                       "tokens_per_s": tok_s, "tokens_per_s_per_device": tok_s / world, "elapsed_s": now - t0}
                if peak:
                    rec["mfu"] = tok_s / world * flops_tok / peak
                mem, mem_kind = peak_memory(device)
                if mem is not None:
                    rec["peak_mem_gib"], rec["peak_mem_kind"] = mem, mem_kind
                if bad_total:
                    rec["skipped_steps"] = bad_total
                sinks.write(**rec)
                if moe_layers:  # routing stats of the last micro-batch, per MoE layer
                    sinks.write(event="moe", step=step, tokens=tokens, layers=moe_metrics(model))
                postfix = {"loss": f"{train_loss:.3f}", "tok_s": f"{tok_s:,.0f}"}
                if peak:
                    postfix["mfu"] = f"{rec['mfu']:.1%}"
                bar.set_postfix(postfix)
                t_log, tokens_at_log = now, tokens
                loss_sum, good_in_interval = 0.0, 0
            if step % cfg.eval_interval == 0 or step == cfg.max_steps:
                val_loss = evaluate(train_model, val, device, autocast, env)
                sinks.write(event="eval", step=step, tokens=tokens, val_loss=val_loss,
                            val_ppl=math.exp(min(val_loss, 50)), elapsed_s=time.perf_counter() - t0)
                log(f"step {step}: val loss {val_loss:.4f}")
            if stop_votes > 0:
                stopped_by = signal.Signals(stop.signum).name if stop.signum else "a signal on another rank"
                save(step)
                ckpt.wait()  # complete it (an async save included) before saying so and exiting
                last_saved = step
                sinks.write(event="stopped", step=step, tokens=tokens, signal=stopped_by,
                            checkpoint=str(ckpt.last_complete))
                log(f"{stopped_by}: saved {ckpt.last_complete} at step {step}; resume with --resume auto")
                break
            if cfg.save_interval and step % cfg.save_interval == 0 and step != cfg.max_steps:
                if consecutive_bad:  # keep the last checkpoint of a good step as the one to go back to
                    log(f"step {step}: not saving in the middle of {consecutive_bad} non-finite step(s)")
                else:
                    save(step)
                    last_saved = step
            if faults is not None:
                faults.after_step(step, run_dir)
        bar.close()
        if stopped_by is None and last_saved != step:
            save(step, final=True)
        ckpt.wait()
    except torch.OutOfMemoryError:
        raise PhiforgeError(oom_message(cfg, step, strategy, world)) from None
    finally:
        bar.close()
    barrier(env)
    summary = {"event": "end", "steps": step, "tokens": tokens, "params": n_params,
               "val_loss_start": first_val, "val_loss_end": val_loss, "elapsed_s": time.perf_counter() - t0,
               "checkpoint": str(ckpt.last_complete), "skipped_steps": bad_total, "world_size": world}
    if stopped_by:
        summary["stopped_by"] = stopped_by
    sinks.write(**summary)
    sinks.close()
    summary["rank"] = env.rank
    return summary
