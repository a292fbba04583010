"""Sharded, atomic, resumable training checkpoints with torch.distributed.checkpoint (DCP).

A run directory:

    RUN/latest                              name of the newest complete checkpoint (written last, atomically)
    RUN/checkpoints/step-00000020/          a complete checkpoint:
        .metadata, __0_0.distcp, ...          DCP: {"model": ..., "optim": ...}, each rank writes its own shards
        rng/rank-00000.pt ...                 per-rank RNG states (torch CPU/CUDA, python, numpy)
        train_state.json                      step, tokens seen, data-loader state, schedule, model config
        tokenizer.json, tokenizer_config.json
        config.json, model.safetensors        only in the final checkpoint: the single-directory model format
        files.json                            every file's size, written last: a later load checks them first
    RUN/checkpoints/step-00000030.tmp/      a save in progress (or one killed mid-way): never read

Atomicity: every rank writes into step-N.tmp; only when DCP has finished (data and .metadata, files fsynced)
does rank 0 rename step-N.tmp to step-N and then rewrite RUN/latest (tmp file + os.replace). A kill at any
moment leaves `latest` naming a complete checkpoint, and `resume: auto` only ever picks complete ones (those
with train_state.json outside a .tmp directory). Old checkpoints beyond keep_checkpoints are deleted after.

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
import os
import random
import re
import shutil
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from phiforge.model_files import load_torch_file, read_latest, write_model_files
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


def _state_dicts(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    from torch.distributed.checkpoint.state_dict import get_state_dict

    msd, osd = get_state_dict(model, optimizer)
    return {"model": msd, "optim": osd}


class Checkpointer:
    """Saves and loads training checkpoints for one run; every rank makes the same calls."""

    def __init__(self, run_dir: Path, env, keep: int, async_save: bool = False, tokenizer_dir: Path | None = None,
                 run_hooks: RunHooks | None = None):
        self.run_dir, self.root = Path(run_dir), Path(run_dir) / "checkpoints"
        self.env, self.keep, self.async_save = env, keep, async_save
        self.tokenizer_dir = tokenizer_dir
        self.run_hooks = run_hooks or RunHooks()
        self.pending: tuple | None = None  # (future, tmp dir, final dir) of an async save in flight
        self.last_complete: Path | None = latest_checkpoint(self.run_dir)
        # async saves run collectives from a background thread: give them their own gloo group
        self.group = dist.new_group(backend="gloo") if async_save else None
        self._ready = False  # nothing is written before the first save

    def _prepare_root(self) -> None:
        if self.env.is_main and not self._ready:
            self.root.mkdir(parents=True, exist_ok=True)
            for stale in self.root.glob("step-*.tmp"):  # saves killed mid-way by an earlier process
                shutil.rmtree(stale, ignore_errors=True)
        self._ready = True

    def _barrier(self) -> None:
        if self.env.world_size > 1:
            dist.barrier()

    def save(self, step: int, model, optimizer, train_state: dict, export_model: bool = False) -> Path:
        """Write checkpoint step-N (sync, or async when configured and not exporting); returns its final path.
        export_model: True adds the single-directory Phi2 model files; a callable(dir) writes its own instead
        (the vision fine-tune's model files), on rank 0, into the checkpoint before it is completed."""
        self.wait()  # one save at a time
        final = self.root / step_name(step)
        tmp = self.root / (final.name + ".tmp")
        try:
            return self._save(step, final, tmp, model, optimizer, train_state, export_model)
        except BaseException as e:  # DCP's CheckpointException is a BaseException
            self._raise_if_disk_full(e, final, tmp)
            raise

    def _save(self, step: int, final: Path, tmp: Path, model, optimizer, train_state: dict, export_model) -> Path:
        self._prepare_root()
        if self.env.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            (tmp / "rng").mkdir(parents=True)
        self._barrier()
        torch.save(rng_state(self.env.device), tmp / "rng" / f"rank-{self.env.rank:05d}.pt")
        if self.env.is_main:
            from phiforge.tokenizer import save_tokenizer_files

            save_tokenizer_files(tmp, source_dir=self.tokenizer_dir)
            state = {"format": STATE_FORMAT, "version": STATE_VERSION, **train_state, "saved_at": time.time()}
            (tmp / TRAIN_STATE).write_text(json.dumps(state, indent=1) + "\n", encoding="utf-8")
        sd = _state_dicts(model, optimizer)
        if self.async_save and not export_model:
            fut = dcp.async_save(sd, checkpoint_id=str(tmp), process_group=self.group)
            self.pending = (fut, tmp, final, step)
            return final
        dcp.save(sd, checkpoint_id=str(tmp))
        self._complete(tmp, final, step, export_model)
        self._barrier()
        return final

    def poll(self) -> None:
        """Finish an async save whose writes are done (rank 0 renames; cheap, no collective)."""
        if self.pending is not None and self.pending[0].done():
            self.wait()

    def wait(self) -> None:
        if self.pending is None:
            return
        fut, tmp, final, step = self.pending
        self.pending = None
        try:
            fut.result()  # raises if the background write failed; done on rank 0 means every rank's data is written
            self._complete(tmp, final, step, export_model=False)
        except BaseException as e:
            self._raise_if_disk_full(e, final, tmp)
            raise

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

    def _complete(self, tmp: Path, final: Path, step: int, export_model: bool) -> None:
        self.run_hooks.saving(step)
        if not self.env.is_main:
            self.last_complete = final
            return
        if callable(export_model):
            export_model(tmp)
        elif export_model:  # the single-directory model format, read back from the DCP files just written
            export_model_files(tmp, tmp)
        for f in tmp.rglob("*"):
            if f.is_file() and f.suffix in (".json", ".pt", ".safetensors"):
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
        fsync_dir(self.root)
        write_text_atomic(self.run_dir / "latest", final.name + "\n")
        self.last_complete = final
        self.prune()

    def prune(self) -> None:
        if self.keep <= 0:
            return
        done = complete_checkpoints(self.run_dir)
        for old in done[: -self.keep]:
            if old != self.last_complete:
                shutil.rmtree(old, ignore_errors=True)
        for old in self.root.glob("step-*.old"):
            shutil.rmtree(old, ignore_errors=True)

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


# ---------------------------------------------------------------------------------------------
# Consolidation to the single-directory model format


def _model_from_dcp(ckpt: Path) -> tuple[Phi2, dict]:
    state = read_train_state(ckpt)
    cfg = Phi2Config.from_dict(state["model"])
    meta = read_dcp_metadata(ckpt)
    with on_meta():
        model = Phi2(cfg)
    sd = {}
    for k, want in model.state_dict().items():
        md = meta.state_dict_metadata.get(f"model.{k}")
        if md is None or not hasattr(md, "size"):
            raise CheckpointError(f"{ckpt} has no tensor for model weight {k}")
        if tuple(md.size) != tuple(want.shape):
            raise CheckpointError(f"{ckpt} holds model weight {k} of shape {tuple(md.size)}, but the model its "
                                  f"{TRAIN_STATE} describes has {tuple(want.shape)}")
        sd[k] = torch.empty(tuple(md.size), dtype=md.properties.dtype)
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.filterwarnings("ignore", message=".*single process.*")
        load_dcp({"model": sd}, ckpt, no_dist=True)
    model.load_state_dict(sd, strict=True, assign=True)
    model.reset_rope()
    return model.eval(), state


def export_model_files(ckpt: Path, out_dir: Path) -> None:
    """Write config.json + safetensors + tokenizer for DCP checkpoint `ckpt` into existing directory out_dir."""
    model, state = _model_from_dcp(ckpt)
    extra = {"train": {"step": state["step"], "tokens": state["tokens"]}}
    write_model_files(out_dir, model.state_dict(), model.cfg, tokenizer_dir=ckpt, extra=extra)


def consolidate(src: Path, out: Path, overwrite: bool = False) -> Path:
    """`phiforge checkpoint consolidate RUN/STEP OUT`: the sharded checkpoint as a single model directory.
    OUT follows fileio.claim_output_dir: never the run or the checkpoint, inside them or around them."""
    from phiforge.fileio import output_dir

    ckpt = resolve_training_checkpoint(src)
    with output_dir(out, "model", inputs=[src, ckpt], overwrite=overwrite) as tmp:
        export_model_files(ckpt, tmp)
    return Path(out)
