"""A training run's directory, locked and claimed before anything is read or written in it (`phiforge train`,
`vision finetune`).

    new, or empty                          a new run
    a phiforge run (its marker, or         resume: auto continues from its newest intact checkpoint (refused,
      checkpoints / metrics of one)          naming each checkpoint and why, when it has only damaged ones);
                                           --overwrite starts over, deleting only what the run wrote there
                                           (run_files: checkpoints/step-N, latest, metrics, config.yaml, logs);
                                           anything else is a one-line error
    resume: PATH                           continue from that checkpoint (it may belong to another run)
    not empty, not a phiforge run          refused; --overwrite trains there, deleting nothing, unless the
                                           directory holds a config.yaml, latest or metrics.jsonl a run would
                                           write over (then refused even with --overwrite)
    empty out_dir, the working directory,  always refused
      one containing it, home, an input

One process at a time: global rank 0 holds an exclusive lock (fileio.DirectoryLock, `.NAME.lock` beside the
directory) from before the first look into the directory until the run ends; a second `train` or `vision
finetune` on the same out_dir is refused at once naming the holder's pid. The other ranks wait for rank 0's
verdict. Nothing is written until `start()`, which runs once the config, the data, the model and the checkpoint
to resume from have all been checked; a refused or failed start-up leaves the directory byte-identical (and a
new one is not created at all). `start()` marks the directory as a run (fileio.MARKER, kind "run"). From
`start()` on, an unexpected error's traceback goes to RUN/errors/.
"""

from __future__ import annotations

import re
import shutil
import sys
import tempfile
from pathlib import Path

import yaml

from phiforge import tracebacks
from phiforge.errors import ConfigError, PhiforgeError
from phiforge.fileio import (MARKER, OUTPUT_KINDS, DirectoryLock, check_output_location, output_kind,
                             write_marker, write_text_atomic)
from phiforge.train.checkpointing import complete_checkpoints, find_resume
from phiforge.train.distributed import DistEnv, barrier, broadcast_object

# what a run writes into its directory: these names, and in its folders only the entries of these patterns
_RUN_NAMES = (MARKER, "config.yaml", "latest", "metrics.jsonl", "wandb")
_RUN_FOLDERS = {"checkpoints": re.compile(r"step-\d{8}(\.tmp|\.old)?"), "errors": re.compile(r"rank-\d+\.txt"),
                "tensorboard": re.compile(r"events\.out\.tfevents\..*")}
# files a run writes over: in a directory that is not a run they are someone else's
_WRITTEN_OVER = ("config.yaml", "latest", "metrics.jsonl")


def is_run_dir(d: Path) -> bool:
    """d holds a phiforge training run: its marker says so, or (a run from before the marker) its files do."""
    kind = output_kind(d)
    return kind == "run" if kind is not None else OUTPUT_KINDS["run"][1](Path(d))


def run_files(d: Path) -> list[Path]:
    """What a phiforge run wrote in directory d and nothing else: what --overwrite deletes. Empty when d is not
    a run (e.g. a model directory that merely has its own checkpoints/ or config.yaml)."""
    d = Path(d)
    if not d.is_dir() or not is_run_dir(d):
        return []
    found = [d / n for name in _RUN_NAMES for n in (name, name + ".tmp") if (d / n).exists()]
    for folder, pattern in _RUN_FOLDERS.items():
        if (d / folder).is_dir():
            found += sorted(p for p in (d / folder).iterdir() if pattern.fullmatch(p.name))
    return found


def delete_run_files(d: Path) -> None:
    for f in run_files(d):
        shutil.rmtree(f) if f.is_dir() and not f.is_symlink() else f.unlink()
    for folder in _RUN_FOLDERS:
        try:
            (Path(d) / folder).rmdir()  # only when nothing else is left in it
        except OSError:
            pass


def warn(message: str) -> None:
    print(f"phiforge: warning: {message}", file=sys.stderr)


def _check_writable(path: Path) -> None:
    """Fail now, not at the first save after hours of training, if the run directory cannot be written."""
    probe_dir = path
    while not probe_dir.exists():
        probe_dir = probe_dir.parent
    if not probe_dir.is_dir():
        raise ConfigError(f"cannot create run directory {path}: {probe_dir} is not a directory")
    try:
        with tempfile.NamedTemporaryFile(dir=probe_dir, prefix=".phiforge-write-test-"):
            pass
    except OSError as e:
        raise ConfigError(f"cannot write to run directory {path}: {e.strerror or e}") from None


class RunDir:
    """The run directory, locked by rank 0 and claimed: use it as `with RunDir(...) as run:` (the lock is held
    until the block ends). `checkpoint`: the checkpoint to resume from (None: a new run)."""

    def __init__(self, out_dir: str | Path, env: DistEnv, command: str, resume: str, overwrite: bool = False,
                 inputs=()):
        if overwrite and resume != "none":
            raise ConfigError("--overwrite starts the run over; it cannot be combined with --resume")
        if not str(out_dir).strip():
            raise ConfigError("out_dir is empty, which would be the working directory; set out_dir to a directory "
                              "of its own")
        self.path, self.env, self.overwrite = Path(out_dir), env, overwrite
        self.created = not self.path.exists()
        self.lock: DirectoryLock | None = None
        self._made: list[Path] = []  # folders made to hold the lock file: removed again if no run was written
        verdict = self._verdict(resume, inputs) if env.is_main else None
        problem, checkpoint = broadcast_object(verdict, env)
        if problem:
            self.close()
            raise ConfigError(problem)
        self.checkpoint: str | None = checkpoint  # to resume from

    def _verdict(self, resume: str, inputs) -> tuple[str | None, str | None]:
        """Rank 0: (why this run may not use the directory or None, the checkpoint to resume from)."""
        try:
            check_output_location(self.path, inputs, "out_dir", ConfigError)
            lock = DirectoryLock(self.path, "out_dir", ConfigError)
            self._made = [p for p in (lock.path.parent, *lock.path.parent.parents) if not p.exists()]
            self.lock = lock.acquire()
            problem = self._claim(resume)
            ckpt = None if problem else find_resume(self.path, resume, warn=warn)
        except PhiforgeError as e:
            return str(e), None
        except OSError as e:  # e.g. a parent folder that is a file, or one that cannot be written
            return f"cannot use out_dir {self.path}: {e.strerror or e}", None
        return problem, str(ckpt) if ckpt else None

    def _claim(self, resume: str) -> str | None:
        """Why this run may not use the directory (None: it may)."""
        p = self.path
        if p.exists() and not p.is_dir():
            return f"out_dir {p} is a file, not a directory"
        _check_writable(p)
        if self.created or not any(p.iterdir()):
            return None
        if is_run_dir(p):
            if self.overwrite or resume != "none":
                return None
            saved = complete_checkpoints(p)
            ours = sorted({f.relative_to(p).parts[0] for f in run_files(p)} - {MARKER})
            held = f"checkpoints up to {saved[-1].name}" if saved else "an earlier run's " + " and ".join(ours)
            return (f"out_dir {p} already holds a training run ({held}): pass --resume auto to continue it, or "
                    f"--overwrite to start over (deletes its checkpoints and metrics)")
        clash = [n for n in _WRITTEN_OVER if (p / n).exists()]
        if clash:
            return (f"out_dir {p} is not a phiforge run but holds {' and '.join(clash)}, which training would write "
                    f"over; move {'it' if len(clash) == 1 else 'them'} away or choose another out_dir (refused even "
                    "with --overwrite)")
        if self.overwrite:
            return None
        return (f"out_dir {p} is not empty and holds no phiforge run; choose a new out_dir, or pass --overwrite to "
                f"train there anyway (nothing that is not a phiforge run's is deleted)")

    def start(self, config: dict) -> None:
        """Training starts: clear an overwritten run's files, mark the directory as a run, write the resolved
        config, route tracebacks here."""
        if self.env.is_main:
            if self.overwrite:
                delete_run_files(self.path)
            self.path.mkdir(parents=True, exist_ok=True)
            write_marker(self.path, "run")
            write_text_atomic(self.path / "config.yaml", yaml.safe_dump(config, sort_keys=False))
        barrier(self.env)
        tracebacks.set_error_dir(self.path / "errors")

    def discard_if_new(self) -> None:
        """After a failure before the first step: a directory this run created is removed again."""
        if self.created and self.env.is_main and self.path.exists():
            shutil.rmtree(self.path, ignore_errors=True)
            tracebacks.set_error_dir(None)

    def close(self) -> None:
        """Release the lock (rank 0); folders made only to hold it go too when no run was written."""
        if self.lock is None:
            return
        self.lock.release()
        self.lock = None
        for folder in self._made if not self.path.exists() else ():
            try:
                folder.rmdir()
            except OSError:
                break

    def __enter__(self) -> "RunDir":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
