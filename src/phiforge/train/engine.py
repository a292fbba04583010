"""The one training step and the one loop cadence that every trainer shares (`phiforge train`,
`phiforge vision finetune`, `phiforge plan --measure`).

A trainer describes its work as a `Job`: where batches come from, how a batch becomes a loss, the lr of each
step, how to validate and how to save. `TrainStep` runs one optimizer step of a job; `Loop` runs the steps with
the cadence around them:

    for each step:  lr -> TrainStep (micro-batches, clip, optimizer step or skip, hooks) -> count tokens
                    -> log every log_interval -> validate every eval_interval -> stop on a signal (save first)
                    -> save every save_interval -> the run's hooks (RunHooks: fault injection in tests)
    at the end:     a final save, unless the last step was just saved

Faults: a step whose loss or gradient norm is not finite on any rank is skipped (no optimizer step) and
counted; max_bad_steps in a row halt the run naming the last good checkpoint. SIGTERM/SIGINT finish the
current step, save a checkpoint and return normally. Out of memory (CUDA or CPU) becomes a message naming the
settings that reduce memory. Once per step the ranks agree on (loss, stop request) with one small all-reduce.
"""

from __future__ import annotations

import math
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

from phiforge.errors import OutOfMemory, PhiforgeError, out_of_memory
from phiforge.train.distributed import DistEnv, all_reduce_, barrier
from phiforge.hooks import RunHooks
from phiforge.train.metrics import Sinks, peak_memory, reset_peak_memory
from phiforge.train.optim import set_lr
from phiforge.train.parallelize import Layout, clip_grad_norm_, grad_sync


class TrainingHalted(PhiforgeError):
    """Too many consecutive non-finite steps."""


class StopRequest:
    """SIGTERM / SIGINT set a flag; the loop checkpoints at the end of the step and returns.
    A second SIGINT interrupts at once."""

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict = {}

    def _handler(self, signum, frame):
        if self.signum == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    def install(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handler)
        return self

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


def run_distributed(body: Callable, cfg, overwrite: bool) -> dict:
    """Run `body(cfg, env, stop, overwrite)` in the process group with SIGTERM/SIGINT caught, under
    deterministic_mode(cfg.deterministic); always cleaned up. A failure on any rank ends every rank, with the
    failing rank's message (fail_together.py)."""
    from phiforge.train.determinism import deterministic_mode
    from phiforge.train.distributed import init_distributed, shutdown
    from phiforge.train.fail_together import FailTogether

    with deterministic_mode(cfg.deterministic):  # before any CUDA work: cuBLAS reads its workspace setting once
        env = init_distributed(cfg.device, cfg.parallel.collective_timeout_s)
        together = FailTogether(env, cfg.parallel.collective_timeout_s).start()
        stop = StopRequest().install()
        try:
            result = body(cfg, env, stop, overwrite)
            together.close()  # done: stop watching before rank 0, which may host the store, exits
            return result
        except BaseException as e:
            instead = together.failed(e)
            if instead is None:
                raise
            raise instead from e
        finally:
            stop.restore()
            shutdown(env)
            together.close()  # after a failure only now: a teardown that hangs is ended by the watchdog


def oom_message(step: int, settings: dict, device: str = "CUDA") -> str:
    """The settings that reduce training memory, for an out-of-memory error on `device` (CUDA, CPU, ...)."""
    shown = ", ".join(f"{k}={v}" for k, v in settings.items())
    chunk = ", set loss_chunk_rows (e.g. 4096)" if "loss_chunk_rows" in settings else ""
    more = ("use parallel.strategy=fsdp on more GPUs, or precision=bf16-mixed" if device != "CPU"
            else "or train on a machine with more memory (or a GPU)")
    return (f"{device} out of memory at step {step} ({shown}): lower micro_batch_size (raise grad_accum_steps to "
            "keep the global batch), set parallel.activation_checkpointing=full (or selective), lower the sequence "
            f"length{chunk}, {more}; `phiforge plan` predicts what fits")


class MoEBalancing:
    """Step hook for aux-loss-free MoE balancing: after an applied step, every rank's routing counts are summed
    and each layer updates its expert biases on the global load; a skipped step's counts are dropped."""

    def __init__(self, model: torch.nn.Module, env: DistEnv):
        layers = model.moe_layers() if hasattr(model, "moe_layers") else {}
        self.layers = [m for m in layers.values() if m.cfg.bias_balancing]
        self.env = env

    def after_step(self) -> None:
        for moe in self.layers:
            load = moe.balancing_load()
            if load is not None:
                all_reduce_(load, self.env)
            moe.update_bias()

    def after_skip(self) -> None:
        for moe in self.layers:
            moe.discard_load()


@dataclass
class StepResult:
    loss: float  # language-model loss, mean over the step's micro-batches and ranks
    grad_norm: float  # global, before clipping
    applied: bool  # False: the loss or the gradient norm was not finite and the optimizer step was skipped
    stop: bool  # a rank was asked to stop (SIGTERM / SIGINT)


class TrainStep:
    """One optimizer step: grad_accum_steps micro-batches (gradients communicated on the last one only), the
    global grad-norm clip, the optimizer step unless the loss or the norm is non-finite, then the hooks
    (`hooks`: step hooks such as MoEBalancing; `run_hooks`: the run's RunHooks)."""

    def __init__(self, train_model: torch.nn.Module, optimizer: torch.optim.Optimizer, env: DistEnv, layout: Layout,
                 grad_accum_steps: int, grad_clip: float, defer_grad_sync: bool = True, hooks: list | tuple = (),
                 run_hooks: RunHooks | None = None):
        self.model, self.optimizer, self.env, self.layout = train_model, optimizer, env, layout
        self.accum, self.grad_clip, self.defer = grad_accum_steps, grad_clip, defer_grad_sync
        self.hooks, self.run_hooks = list(hooks), run_hooks or RunHooks()
        self.params = [p for group in optimizer.param_groups for p in group["params"]]

    def __call__(self, step: int, job: "Job", stop_requested: bool) -> StepResult:
        device, n = self.env.device, self.accum
        acc = torch.zeros(2, device=device)  # [loss with aux terms, language-model loss]
        for micro in range(n):
            batch = job.next_batch()
            with grad_sync(self.model, self.layout, micro == n - 1, self.defer):
                out = job.loss(self.model, batch)
                loss = self.run_hooks.loss(step, out.loss)
                (loss / n).backward()
            acc += torch.stack([loss.detach().float(), out.lm_loss.detach().float()]) / n
        self.run_hooks.after_backward(step)
        norm = clip_grad_norm_(self.params, self.grad_clip)
        stop = torch.tensor([float(stop_requested)], device=device)
        total, lm, votes = all_reduce_(torch.cat([acc, stop]), self.env).tolist()
        grad_norm = float(norm)
        world = self.env.world_size
        applied = math.isfinite(total) and math.isfinite(grad_norm)
        if applied:
            self.optimizer.step()
        for hook in self.hooks:
            hook.after_step() if applied else hook.after_skip()
        self.optimizer.zero_grad(set_to_none=True)
        return StepResult(lm / world if applied else total / world, grad_norm, applied, votes > 0)


class Job:
    """What a trainer gives the loop. Override what applies; `units` names what a step consumes."""

    units: str = "tokens"
    units_per_step: int = 0
    tags: dict = {}  # added to every train/eval event (e.g. the vision stage)

    def next_batch(self):
        raise NotImplementedError

    def loss(self, model: torch.nn.Module, batch):
        """The model's LossOutput for one micro-batch."""
        raise NotImplementedError

    def lr(self, step: int) -> float:
        """Learning rate of optimizer step `step` (0-based, local to the job)."""
        raise NotImplementedError

    def evaluate(self) -> dict:
        """Validation metrics ({} when there is nothing to validate on)."""
        return {}

    def save(self, step: int, final: bool) -> Path | None:
        """Write a checkpoint after local step `step` (final: the job's last one); None if the job does not save."""
        return None

    def log_fields(self) -> dict:
        """Extra fields for each train event."""
        return {}

    def extra_events(self, step: int) -> list[dict]:
        """Extra records written at each log step (e.g. MoE routing statistics)."""
        return []

    def oom_settings(self) -> dict:
        return {}


@dataclass
class Cadence:
    log_interval: int = 10
    eval_interval: int = 100
    save_interval: int = 0  # 0: save only at the end
    max_bad_steps: int = 5
    progress_bar: bool = True


@dataclass
class _Window:
    """What the loop accumulates between two train events."""

    t: float = field(default_factory=time.perf_counter)
    units: int = 0
    loss_sum: float = 0.0
    good: int = 0


class Loop:
    """Runs jobs step by step with the shared cadence; one Loop can run several jobs in turn (the vision
    fine-tune's stages), keeping the counts, the clock and the validation result across them."""

    def __init__(self, env: DistEnv, cadence: Cadence, sinks: Sinks, stop: StopRequest, checkpointer=None,
                 run_hooks: RunHooks | None = None, flops_per_unit: float | None = None,
                 peak_flops: float | None = None, units_done: int = 0, bad_total: int = 0):
        self.env, self.cadence, self.sinks, self.stop = env, cadence, sinks, stop
        self.ckpt, self.run_hooks = checkpointer, run_hooks or RunHooks()
        self.flops_per_unit, self.peak_flops = flops_per_unit, peak_flops
        self.units_done, self.bad_total = units_done, bad_total
        self.consecutive_bad, self.first_bad = 0, 0
        self.t0 = time.perf_counter()
        self.val: dict = {}
        self.step = 0  # the last global step done
        self.stopped_by: str | None = None
        self.log = tqdm.write if self.env.is_main else (lambda *a, **k: None)

    def evaluate(self, job: Job, step: int) -> dict:
        val = job.evaluate()
        if val:
            self.val = val
            self.sinks.write(event="eval", **job.tags, step=step, **{job.units: self.units_done}, **val,
                             elapsed_s=time.perf_counter() - self.t0)
            shown = [k for k in ("val_loss", "val_bpb") if k in val] + sorted(k for k in val if "/" in k)
            self.log(f"step {step}: " + ", ".join(f"{k.replace('_', ' ')} {val[k]:.4f}" for k in shown))
        return val

    def run(self, job: Job, train_step: TrainStep, start: int, end: int, offset: int = 0, desc: str = "train") -> bool:
        """Local steps start+1 .. end of `job` (global step = offset + local step). True if a signal stopped it."""
        c = self.cadence
        bar = tqdm(total=end, initial=start, desc=desc, unit="step", dynamic_ncols=True,
                   disable=not (self.env.is_main and c.progress_bar))
        window, last_saved = _Window(units=self.units_done), start if start else None
        g = self.step = offset + start
        try:
            for s in range(start + 1, end + 1):
                g = offset + s
                lr = job.lr(s - 1)
                set_lr(train_step.optimizer, lr)
                result = train_step(g, job, self.stop.signum is not None)
                self.units_done += job.units_per_step
                self.step = g
                self._count(result, g, job, window)
                bar.update(1)
                if self.ckpt is not None:
                    self.ckpt.poll()
                last = s == end
                if g % c.log_interval == 0 or last:
                    self._log_train(job, g, lr, result, window, bar)
                if g % c.eval_interval == 0 or last:
                    self.evaluate(job, g)
                if result.stop:
                    self._stopped(job, s, g)
                    return True
                if c.save_interval and g % c.save_interval == 0 and not last:
                    if self.consecutive_bad:  # keep the last checkpoint of a good step as the one to go back to
                        self.log(f"step {g}: not saving in the middle of {self.consecutive_bad} non-finite step(s)")
                    else:
                        job.save(s, final=False)
                        last_saved = s
                self.run_hooks.after_step(g)
            if last_saved != end:
                job.save(end, final=True)
            if self.ckpt is not None:
                self.ckpt.wait()
        except (RuntimeError, MemoryError) as e:  # torch.OutOfMemoryError, the CPU allocator's RuntimeError
            device = out_of_memory(e)
            if device is None:
                raise
            raise OutOfMemory(oom_message(g, job.oom_settings(), device)) from None
        finally:
            bar.close()
        return False

    def finish(self, **fields) -> dict:
        """After the last step, on every rank: the "end" event (the run's summary, written on rank 0) and the
        sinks closed; returns the summary with this rank's number."""
        barrier(self.env)
        if self.ckpt is not None:  # after the barrier, so no rank waits for rank 0's deletion of old checkpoints
            self.ckpt.close()
        summary = {"event": "end", "steps": self.step, **fields, "elapsed_s": time.perf_counter() - self.t0,
                   "skipped_steps": self.bad_total}
        if self.stopped_by:
            summary["stopped_by"] = self.stopped_by
        self.sinks.write(**summary)
        self.sinks.close()
        return {**summary, "rank": self.env.rank}

    def _count(self, result: StepResult, step: int, job: Job, window: _Window) -> None:
        if result.applied:
            self.consecutive_bad = 0
            window.loss_sum += result.loss
            window.good += 1
            return
        self.bad_total += 1
        if self.consecutive_bad == 0:
            self.first_bad = step
        self.consecutive_bad += 1
        self.sinks.write(event="skip", **job.tags, step=step, loss=_finite_or_str(result.loss),
                         grad_norm=_finite_or_str(result.grad_norm), skipped_total=self.bad_total,
                         consecutive=self.consecutive_bad)
        self.log(f"step {step}: non-finite loss or gradient norm ({result.loss}, {result.grad_norm}); step skipped")
        if self.consecutive_bad >= self.cadence.max_bad_steps:
            last = None
            if self.ckpt is not None:
                self.ckpt.wait()
                last = self.ckpt.last_complete
            raise TrainingHalted(
                f"halting at step {step}: {self.consecutive_bad} consecutive steps with a non-finite loss or "
                f"gradient norm (steps {self.first_bad}-{step}, all skipped); last good checkpoint: "
                + (f"{last} (restart with --resume auto, e.g. with a lower optim.lr)" if last
                   else "none saved yet (lower optim.lr or raise optim.warmup_steps and start again)"))

    def _log_train(self, job: Job, step: int, lr: float, result: StepResult, window: _Window, bar) -> None:
        now = time.perf_counter()
        world = self.env.world_size
        rate = (self.units_done - window.units) / max(now - window.t, 1e-9)
        loss = window.loss_sum / window.good if window.good else None
        u = job.units
        rec = {"event": "train", **job.tags, "step": step, u: self.units_done, "loss": loss, "lr": lr,
               "grad_norm": result.grad_norm, f"{u}_per_s": rate, f"{u}_per_s_per_device": rate / world,
               "elapsed_s": now - self.t0, **job.log_fields()}
        if self.peak_flops and self.flops_per_unit:
            rec["mfu"] = rate / world * self.flops_per_unit / self.peak_flops
        rec.update(peak_memory(self.env.device))
        reset_peak_memory(self.env.device)  # each train event reports the peak of its own interval
        if self.bad_total:
            rec["skipped_steps"] = self.bad_total
        self.sinks.write(**rec)
        for extra in job.extra_events(step):
            self.sinks.write(**extra)
        postfix = {"loss": f"{loss:.3f}" if loss is not None else "-", f"{u[:3]}_s": f"{rate:,.0f}"}
        if "mfu" in rec:
            postfix["mfu"] = f"{rec['mfu']:.1%}"
        bar.set_postfix(postfix)
        window.t, window.units, window.loss_sum, window.good = now, self.units_done, 0.0, 0

    def _stopped(self, job: Job, local_step: int, step: int) -> None:
        self.stopped_by = signal.Signals(self.stop.signum).name if self.stop.signum else "a signal on another rank"
        path = job.save(local_step, final=False)
        if self.ckpt is not None:
            self.ckpt.wait()  # complete it (an async save included) before saying so
            path = self.ckpt.last_complete
        self.sinks.write(event="stopped", **job.tags, step=step, **{job.units: self.units_done},
                         signal=self.stopped_by, checkpoint=str(path))
        self.log(f"{self.stopped_by}: saved {path} at step {step}; resume with --resume auto")


def _finite_or_str(v: float):
    return v if math.isfinite(v) else str(v)
