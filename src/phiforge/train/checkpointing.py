"""Sharded, atomic, resumable training checkpoints with torch.distributed.checkpoint (DCP).

A run directory:

    RUN/latest                              name of the newest complete checkpoint (written last, atomically)
    RUN/checkpoints/step-00000020/          a complete checkpoint:
        .metadata, __0_0.distcp, ...          DCP: {"model": ..., "optim": ...}, each rank writes its own shards
        rng/rank-00000.pt ...                 per-rank RNG states (torch CPU/CUDA, python, numpy)
        train_state.json                      step, tokens seen, data-loader state, schedule, model config
        tokenizer.json, tokenizer_config.json
        config.json, model.safetensors        only in the final checkpoint: the single-directory model format
                                              (N ranks: model-0000k-of-0000N.safetensors + index, one per rank)
        files.json                            every file's size, written last: a later load checks them first
    RUN/checkpoints/step-00000030.tmp/      a save in progress (or one killed mid-way): never read

Atomicity: every rank writes into step-N.tmp; only when DCP has finished on every rank (data and .metadata,
files fsynced) does rank 0 rename step-N.tmp to step-N and then rewrite RUN/latest (tmp file + os.replace). A
kill at any moment leaves `latest` naming a complete checkpoint, and `resume: auto` only ever picks complete
ones (those with train_state.json outside a .tmp directory). Old checkpoints beyond keep_checkpoints are
deleted after, in the background. With async_checkpoint the write and the completion run in background
threads while training goes on (the save pipeline: the comment above `Checkpointer`).

Damage after the fact (a deleted or truncated shard): files.json records each file's size when the checkpoint
is completed, and `verify_checkpoint` compares them before any load. `resume: auto` then falls back to the
newest intact checkpoint, warning which one it skipped and why; a damaged checkpoint named by path is a
one-line error naming the file.

Resharding: DCP stores every tensor by its global shape and FQN, so a checkpoint written by N ranks (FSDP
shards, DDP replicas or one plain process) loads into M ranks of any strategy. The data loader's (epoch,
position) is the same on every rank and is stored once; PackedLoader.load_state_dict converts the position
to the new world size (docs/training.md, "Resuming on another number of ranks").
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import shutil
import time
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors.torch import save_file

from phiforge.model_files import (load_torch_file, read_latest, shard_name, write_index, write_model_config,
                                  write_model_files)
from phiforge.errors import CheckpointError, disk_full
from phiforge.fileio import fsync_dir, plain_name, write_text_atomic
from phiforge.model import Phi2, Phi2Config
from phiforge.model.init import on_meta
from phiforge.train.dcp_reader import load_dcp, read_dcp_metadata
from phiforge.hooks import RunHooks

TRAIN_STATE = "train_state.json"
STATE_FORMAT = "phiforge-train-state"
STATE_VERSION = 1


def step_name(step: int) -> str:
    return f"step-{step:08d}"


def is_complete(ckpt: Path) -> bool:
    return ckpt.is_dir() and not ckpt.name.endswith(".tmp") and (ckpt / TRAIN_STATE).is_file() \
        and (ckpt / ".metadata").is_file()


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    """Every checkpoint directory of a run, oldest first, complete or damaged (not a save in progress, .tmp)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step-*") if p.is_dir() and re.fullmatch(r"step-\d{8}", p.name))


def complete_checkpoints(run_dir: Path) -> list[Path]:
    return [p for p in checkpoint_dirs(run_dir) if is_complete(p)]


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint `RUN/latest` names if it is complete, else the newest complete one, else None."""
    ckpt = read_latest(run_dir)
    if ckpt is not None and is_complete(ckpt):
        return ckpt
    found = complete_checkpoints(run_dir)
    return found[-1] if found else None


MANIFEST = "files.json"


def verify_checkpoint(ckpt: Path) -> str | None:
    """Why checkpoint `ckpt` cannot be loaded (a missing or resized file), or None if it is intact. Checkpoints
    written before files.json existed are checked for their DCP metadata and train state only."""
    ckpt = Path(ckpt)
    if not is_complete(ckpt):
        return f"no {TRAIN_STATE} or .metadata"
    if not (ckpt / MANIFEST).is_file():
        return None
    try:
        sizes = json.loads((ckpt / MANIFEST).read_text(encoding="utf-8"))["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return f"{MANIFEST} is unreadable"
    if not isinstance(sizes, dict):
        return f"{MANIFEST} is unreadable"
    outside = [rel for rel in sizes if not plain_name(rel, subfolders=True)]
    if outside:
        return f"{MANIFEST} names a file outside the checkpoint: {outside[0]!r:.100}"
    for rel, size in sorted(sizes.items()):
        f = ckpt / rel
        if not f.is_file():
            return f"{rel} is missing"
        if f.stat().st_size != size:
            return f"{rel} is {f.stat().st_size:,} bytes but was {size:,} when saved (truncated or changed)"
    return None


def resolve_training_checkpoint(path: Path, warn=None) -> Path:
    """A step directory (checked: a damaged one is an error), or a run directory (its newest intact checkpoint;
    `warn(message)` hears about each damaged one skipped)."""
    path = Path(path)
    if is_complete(path):
        problem = verify_checkpoint(path)
        if problem:
            raise CheckpointError(f"checkpoint {path} is damaged: {problem}")
        return path
    if (path / "checkpoints").is_dir() or (path / "latest").is_file():
        ckpt = newest_intact_checkpoint(path, warn)
        if ckpt is None:
            raise CheckpointError(f"run directory {path} holds no complete, intact training checkpoint")
        return ckpt
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.name.endswith(".tmp"):
        raise CheckpointError(f"{path} is an unfinished save (the process died while writing it); "
                              "use the run's `latest` checkpoint")
    raise CheckpointError(f"{path} is not a training checkpoint (no {TRAIN_STATE} and .metadata)")


def newest_intact_checkpoint(run_dir: Path, warn=None) -> Path | None:
    """The newest checkpoint of the run whose files are intact (`warn(message)` for each damaged one skipped), or
    None when the run has no checkpoint at all. When it has checkpoints and none is intact: CheckpointError naming
    each one and why, so that nothing starts at step 0 over them."""
    damaged = []
    for ckpt in reversed(checkpoint_dirs(run_dir)):
        problem = verify_checkpoint(ckpt)
        if problem is None:
            for older, why in damaged:
                if warn is not None:
                    warn(f"skipping damaged checkpoint {older}: {why}")
            return ckpt
        damaged.append((ckpt, problem))
    if damaged:
        listed = "; ".join(f"{c.name}: {why}" for c, why in reversed(damaged))
        raise CheckpointError(f"{Path(run_dir) / 'checkpoints'} holds no intact checkpoint to resume from "
                              f"({listed}); restore them, resume from another checkpoint with --resume PATH, or start "
                              "over with --overwrite (deletes them)")
    return None


def find_resume(run_dir: Path, resume: str, warn=None) -> Path | None:
    """resume: none -> None; auto -> the run's newest intact checkpoint, None when it has no checkpoint at all (a
    CheckpointError when it has only damaged ones); otherwise that path."""
    if resume == "none":
        return None
    if resume == "auto":
        return newest_intact_checkpoint(run_dir, warn)
    return resolve_training_checkpoint(Path(resume))


def read_train_state(ckpt: Path) -> dict:
    try:
        state = json.loads((Path(ckpt) / TRAIN_STATE).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{ckpt} has no {TRAIN_STATE}: not a complete training checkpoint") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{Path(ckpt) / TRAIN_STATE} is not valid JSON: {e}") from None
    if state.get("format") != STATE_FORMAT or int(state.get("version", 0)) > STATE_VERSION:
        raise CheckpointError(f"{Path(ckpt) / TRAIN_STATE}: unknown format or a newer version than this phiforge")
    return state


# ---------------------------------------------------------------------------------------------
# RNG states


def rng_state(device: torch.device) -> dict:
    np_state = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]]}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


# ---------------------------------------------------------------------------------------------
# Save and load
#
# The save pipeline (docs/training.md, "The save pipeline"). On the training thread of every rank: wait for
# the save before (one at a time), write this rank's RNG state (rank 0: also the train state and tokenizer)
# into step-N.tmp, then
#   async (periodic saves with async_checkpoint): stage the model + optimizer state into CPU memory and return;
#          DCP writes it from a background thread on a gloo group of its own, and a second background thread
#          completes the save when DCP is done (rank 0: fsync, files.json, rename, `latest`);
#   sync (the final save, async_checkpoint false): DCP writes; the final save's model files are exported by
#          every rank, a share each; rank 0 completes the save.
# Deleting old checkpoints always happens on rank 0's pruning thread. Nothing in the background makes another
# rank wait: DCP's own collectives run on its gloo group between the background threads.


def _state_dicts(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    from torch.distributed.checkpoint.state_dict import get_state_dict

    msd, osd = get_state_dict(model, optimizer)
    return {"model": msd, "optim": osd}


class _Writer(dcp.FileSystemWriter):
    """DCP's file writer, calling the run's hooks between the data files and .metadata (RunHooks.writing)."""

    def __init__(self, path: Path, step: int, run_hooks: RunHooks):
        super().__init__(str(path))
        self.step, self.run_hooks = step, run_hooks

    def finish(self, metadata, results) -> None:  # rank 0, once every rank's data files are written
        self.run_hooks.writing(self.step)
        super().finish(metadata, results)


def _stager(device: torch.device):
    """A stager kept for the whole run: its CPU buffers (pinned on CUDA, for a fast device-to-host copy) are
    allocated at the first save and reused. None where the installed torch has no DefaultStager (DCP then stages
    with the writer, into new buffers each time)."""
    try:
        from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions
    except ImportError:
        return None
    return DefaultStager(StagingOptions(use_pinned_memory=device.type == "cuda", use_shared_memory=False,
                                        use_async_staging=False, use_non_blocking_copy=False))


def async_save_available() -> bool:
    return hasattr(dcp, "async_save")


@dataclass
class PendingSave:
    """A save being written in the background. `done` resolves when it is complete: on rank 0 renamed and named by
    `latest`; on the other ranks, once every rank's data and DCP's .metadata are written."""

    step: int
    tmp: Path
    final: Path
    done: Future
    started: float = field(default_factory=time.perf_counter)


class Checkpointer:
    """Saves and loads training checkpoints for one run; every rank makes the same calls."""

    def __init__(self, run_dir: Path, env, keep: int, async_save: bool = False, tokenizer_dir: Path | None = None,
                 run_hooks: RunHooks | None = None, collective_timeout_s: float | None = None):
        self.run_dir, self.root = Path(run_dir), Path(run_dir) / "checkpoints"
        self.env, self.keep, self.async_save = env, keep, async_save and async_save_available()
        self.tokenizer_dir = tokenizer_dir
        self.run_hooks = run_hooks or RunHooks()
        self.pending: PendingSave | None = None
        self.last_complete: Path | None = latest_checkpoint(self.run_dir)
        # background threads: completing async saves (every rank), deleting old checkpoints (rank 0)
        self.completer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="phiforge-save")
        self.pruner = ThreadPoolExecutor(max_workers=1, thread_name_prefix="phiforge-prune")
        self.pruning: Future | None = None
        self.stager = None
        # async saves run DCP's collectives from a background thread: they get their own gloo group, which waits
        # for a peer as long as the run's own collectives do (parallel.collective_timeout_s)
        timeout = None if collective_timeout_s is None else timedelta(seconds=collective_timeout_s)
        self.group = dist.new_group(backend="gloo", timeout=timeout) if self.async_save else None
        if env.is_main and self.root.is_dir():  # saves killed mid-way by an earlier process
            for stale in self.root.glob("step-*.tmp"):
                shutil.rmtree(stale, ignore_errors=True)
        self._barrier()  # at start-up: no rank writes into a step-N.tmp before the stale ones are gone

    def _barrier(self) -> None:
        if self.env.world_size > 1:
            dist.barrier()

    def save(self, step: int, model, optimizer, train_state: dict, export_model=False) -> Path:
        """Write checkpoint step-N; returns its final path. Async (when configured, and not exporting): returns
        once the state is staged in CPU memory; `poll`/`wait` complete it. Otherwise returns on every rank once
        it is complete. export_model: True adds the single-directory Phi2 model files (a share written by every
        rank); a callable(dir) writes its own instead (the vision fine-tune's model files, on rank 0)."""
        self.wait()  # one save at a time: the staging buffers and the background threads are reused
        final = self.root / step_name(step)
        tmp = self.root / (final.name + ".tmp")
        try:
            self._write_small_files(step, tmp, train_state)
            sd = _state_dicts(model, optimizer)
            writer = _Writer(tmp, step, self.run_hooks)
            if self.async_save and not export_model:
                self._start_async(step, sd, writer, tmp, final)
            else:
                self._save_sync(step, sd, writer, tmp, final, export_model)
        except BaseException as e:  # DCP's CheckpointException is a BaseException
            self._raise_if_disk_full(e, final, tmp)
            raise
        return final

    def _write_small_files(self, step: int, tmp: Path, train_state: dict) -> None:
        (tmp / "rng").mkdir(parents=True, exist_ok=True)  # every rank: no rank waits for another to create it
        torch.save(rng_state(self.env.device), tmp / "rng" / f"rank-{self.env.rank:05d}.pt")
        if self.env.is_main:
            from phiforge.tokenizer import save_tokenizer_files

            save_tokenizer_files(tmp, source_dir=self.tokenizer_dir)
            state = {"format": STATE_FORMAT, "version": STATE_VERSION, **train_state, "saved_at": time.time()}
            (tmp / TRAIN_STATE).write_text(json.dumps(state, indent=1) + "\n", encoding="utf-8")
        self.run_hooks.staging(step)

    def _start_async(self, step: int, sd: dict, writer: _Writer, tmp: Path, final: Path) -> None:
        kwargs = {}
        if self.stager is None:
            self.stager = _stager(self.env.device)
        if self.stager is not None:
            kwargs["async_stager"] = self.stager
        # returns once the state is copied to CPU memory; the write runs in DCP's thread
        response = dcp.async_save(sd, storage_writer=writer, process_group=self.group, **kwargs)
        written = getattr(response, "upload_completion", response)
        done = self.completer.submit(self._complete_async, written, step, tmp, final)
        self.pending = PendingSave(step, tmp, final, done)

    def _complete_async(self, written: Future, step: int, tmp: Path, final: Path) -> None:
        # DCP's write ends with a gather of every rank's results on rank 0, which then writes .metadata, and a
        # broadcast: when it returns on any rank, every rank's data and the .metadata are on disk. That is the
        # agreement rank 0 needs to complete the save, made between background threads only.
        written.result()
        self._complete(tmp, final, step)

    def _save_sync(self, step: int, sd: dict, writer: _Writer, tmp: Path, final: Path, export_model) -> None:
        dcp.save(sd, storage_writer=writer)
        if callable(export_model):
            if self.env.is_main:
                export_model(tmp)
        elif export_model:
            self._export_model_files(tmp)
        self._complete(tmp, final, step)
        self.last_complete = final
        self._barrier()  # a sync save returns complete on every rank

    def _export_model_files(self, tmp: Path) -> None:
        """The single-directory model files, read back from the DCP files just written: on N ranks each writes a
        share of the tensors (model-0000r-of-0000N.safetensors) at the same time, so no rank waits on one alone."""
        if self.env.world_size == 1:
            export_model_files(tmp, tmp)
            return
        export_model_shard(tmp, self.env.rank, self.env.world_size)
        self._barrier()  # every share is written (and fsynced)
        if self.env.is_main:
            write_shard_index(tmp, self.env.world_size)

    def poll(self) -> None:
        """At a step boundary: take note of an async save that has completed (raising its error, if it failed).
        Cheap, and no collective."""
        if self.pending is not None and self.pending.done.done():
            self.wait()

    def wait(self) -> None:
        """Block until the async save in flight (if any) is complete."""
        pending, self.pending = self.pending, None
        if pending is None:
            return
        try:
            pending.done.result()
        except BaseException as e:
            self._raise_if_disk_full(e, pending.final, pending.tmp)
            raise
        self.last_complete = pending.final

    def close(self) -> None:
        """At the end of the run: the save in flight completed, old checkpoints deleted, staging memory freed."""
        self.wait()
        if self.pruning is not None:
            self.pruning.result()
        if self.stager is not None:
            self.stager.close()
            self.stager = None

    def _raise_if_disk_full(self, e: BaseException, final: Path, tmp: Path) -> None:
        """A save that ran out of disk space (or quota) becomes one line naming the checkpoint that is still
        intact; the partial step-N.tmp is removed (it is never read, and its space is the user's)."""
        full = disk_full(e)
        if full is None:
            return
        if self.env.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        before = self.last_complete
        kept = (f"the previous checkpoint {before.name} is intact (free some space, then --resume auto)" if before
                else "no earlier checkpoint was saved (free some space and start again)")
        raise CheckpointError(f"no space left on device while saving checkpoint {final.name} in {self.run_dir} "
                              f"({full.strerror}); {kept}") from None

    def _complete(self, tmp: Path, final: Path, step: int) -> None:
        self.run_hooks.saving(step)
        if self.env.is_main:
            publish(tmp, final, self.run_dir)
            if self.keep > 0:
                self.pruning = self.pruner.submit(prune, self.run_dir, self.keep, final)

    def load(self, ckpt: Path, model, optimizer, model_cfg: Phi2Config) -> dict:
        """Load model + optimizer (resharded to this run's layout), this rank's RNG; return train_state.json."""
        from torch.distributed.checkpoint.state_dict import set_state_dict

        ckpt = Path(ckpt)
        state = read_train_state(ckpt)
        saved_cfg = state.get("model", {})
        now = model_cfg.to_dict()
        diff = sorted(k for k in set(saved_cfg) | set(now) if saved_cfg.get(k) != now.get(k))
        if diff:
            k = diff[0]
            raise CheckpointError(f"checkpoint {ckpt} was saved for another model: {k}={saved_cfg.get(k)!r} there, "
                                  f"{now.get(k)!r} in this config" + (f" (+{len(diff) - 1} more)" if len(diff) > 1 else ""))
        problem = verify_checkpoint(ckpt)
        if problem:
            raise CheckpointError(f"checkpoint {ckpt} is damaged: {problem}")
        sd = _state_dicts(model, optimizer)
        load_dcp(sd, ckpt)
        set_state_dict(model, optimizer, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
        rng_file = ckpt / "rng" / f"rank-{self.env.rank:05d}.pt"
        if int(state.get("world_size", 0)) == self.env.world_size and rng_file.exists():
            set_rng_state(load_torch_file(rng_file, "RNG state"), self.env.device)
        else:  # another world size: per-rank streams cannot carry over; derive fresh ones from the step
            seed = int(state.get("seed", 0)) + 1_000_003 * int(state["step"]) + self.env.rank
            torch.manual_seed(seed)
            random.seed(seed)
            np.random.seed(seed % 2**32)
        self.last_complete = ckpt
        return state


def publish(tmp: Path, final: Path, run_dir: Path) -> None:
    """Complete a checkpoint (rank 0, once every rank's files are written): fsync its files, record their sizes in
    files.json, rename step-N.tmp to step-N, then point `latest` at it (temp file + os.replace). A kill at any
    moment leaves `latest` naming a complete checkpoint."""
    for f in tmp.rglob("*"):
        if f.is_file() and f.suffix in (".json", ".pt", ".safetensors"):  # DCP fsyncs its own files
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    sizes = {str(f.relative_to(tmp)): f.stat().st_size for f in sorted(tmp.rglob("*")) if f.is_file()}
    write_text_atomic(tmp / MANIFEST, json.dumps({"files": sizes}, indent=0) + "\n")
    fsync_dir(tmp)
    if final.exists():  # re-saving the same step (e.g. a resumed run that stopped at once)
        old = final.with_name(final.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    fsync_dir(final.parent)
    write_text_atomic(Path(run_dir) / "latest", final.name + "\n")


def prune(run_dir: Path, keep: int, newest: Path) -> None:
    """Delete all but the `keep` newest complete checkpoints, never `newest` (rank 0's pruning thread). Each is
    renamed to step-N.old first, so a kill mid-way never leaves a half-deleted checkpoint that looks complete;
    .old directories left by such a kill go too."""
    for old in complete_checkpoints(run_dir)[:-keep]:
        if old != newest:
            trash = old.with_name(old.name + ".old")
            shutil.rmtree(trash, ignore_errors=True)
            try:
                os.replace(old, trash)
            except OSError:
                continue
    for trash in (Path(run_dir) / "checkpoints").glob("step-*.old"):
        shutil.rmtree(trash, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# Consolidation to the single-directory model format


def _model_specs(ckpt: Path) -> tuple[Phi2Config, dict, dict[str, tuple[tuple[int, ...], torch.dtype]]]:
    """The model config and train state of DCP checkpoint `ckpt`, and {weight name: (shape, dtype)} of the model
    weights it holds, each checked against the model that config describes."""
    state = read_train_state(ckpt)
    cfg = Phi2Config.from_dict(state["model"])
    meta = read_dcp_metadata(ckpt)
    with on_meta():
        model = Phi2(cfg)
    specs = {}
    for k, want in model.state_dict().items():
        md = meta.state_dict_metadata.get(f"model.{k}")
        if md is None or not hasattr(md, "size"):
            raise CheckpointError(f"{ckpt} has no tensor for model weight {k}")
        if tuple(md.size) != tuple(want.shape):
            raise CheckpointError(f"{ckpt} holds model weight {k} of shape {tuple(md.size)}, but the model its "
                                  f"{TRAIN_STATE} describes has {tuple(want.shape)}")
        specs[k] = (tuple(md.size), md.properties.dtype)
    return cfg, state, specs


def _read_weights(ckpt: Path, specs: dict) -> dict[str, torch.Tensor]:
    """The model weights `specs` names, read from the DCP files of `ckpt` by this process alone."""
    sd = {k: torch.empty(shape, dtype=dtype) for k, (shape, dtype) in specs.items()}
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.filterwarnings("ignore", message=".*single process.*")
        load_dcp({"model": sd}, ckpt, no_dist=True)
    return sd


def _model_from_dcp(ckpt: Path) -> tuple[Phi2, dict]:
    cfg, state, specs = _model_specs(ckpt)
    with on_meta():
        model = Phi2(cfg)
    model.load_state_dict(_read_weights(ckpt, specs), strict=True, assign=True)
    model.reset_rope()
    return model.eval(), state


def _train_info(state: dict) -> dict:
    return {"train": {"step": state["step"], "tokens": state["tokens"]}}


def export_model_files(ckpt: Path, out_dir: Path) -> None:
    """Write config.json + safetensors + tokenizer for DCP checkpoint `ckpt` into existing directory out_dir."""
    model, state = _model_from_dcp(ckpt)
    write_model_files(out_dir, model.state_dict(), model.cfg, tokenizer_dir=ckpt, extra=_train_info(state))


def _nbytes(spec: tuple) -> int:
    shape, dtype = spec
    return math.prod(shape) * dtype.itemsize


def shard_plan(specs: dict, n_files: int) -> list[list[str]]:
    """The weight names in at most n_files groups of about equal bytes, whole tensors only (largest first, each
    into the lightest group): the same on every rank."""
    groups: list[list[str]] = [[] for _ in range(max(1, min(n_files, len(specs))))]
    loads = [0] * len(groups)
    for k in sorted(specs, key=lambda k: (-_nbytes(specs[k]), k)):
        i = loads.index(min(loads))
        groups[i].append(k)
        loads[i] += _nbytes(specs[k])
    return groups


def export_model_shard(ckpt: Path, rank: int, world: int) -> None:
    """Rank `rank`'s share of the model files of DCP checkpoint `ckpt` (every rank at once): whole tensors, read
    back from its DCP files into model-0000{rank+1}-of-0000N.safetensors, fsynced. write_shard_index, once every
    share is written, makes the set a model directory."""
    _, _, specs = _model_specs(ckpt)
    groups = shard_plan(specs, world)
    if rank >= len(groups):
        return
    path = Path(ckpt) / shard_name(rank + 1, len(groups))
    save_file(_read_weights(ckpt, {k: specs[k] for k in groups[rank]}), str(path), metadata={"format": "pt"})
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def write_shard_index(ckpt: Path, world: int) -> None:
    """After every rank's export_model_shard (rank 0): model.safetensors.index.json, then config.json."""
    cfg, state, specs = _model_specs(ckpt)
    groups = shard_plan(specs, world)
    weight_map = {k: shard_name(i + 1, len(groups)) for i, keys in enumerate(groups) for k in keys}
    write_index(ckpt, weight_map, sum(_nbytes(spec) for spec in specs.values()))
    write_model_config(ckpt, cfg, _train_info(state))


def consolidate(src: Path, out: Path, overwrite: bool = False) -> Path:
    """`phiforge checkpoint consolidate RUN/STEP OUT`: the sharded checkpoint as a single model directory.
    OUT follows fileio.claim_output_dir: never the run or the checkpoint, inside them or around them."""
    from phiforge.fileio import output_dir

    ckpt = resolve_training_checkpoint(src)
    with output_dir(out, "model", inputs=[src, ckpt], overwrite=overwrite) as tmp:
        export_model_files(ckpt, tmp)
    return Path(out)
