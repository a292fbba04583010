"""A training run's directory, claimed before anything is written to it (`phiforge train`, `vision finetune`).

    new, or empty                          a new run
    holds an earlier run (checkpoints      resume: auto continues from its newest intact checkpoint;
      or metrics), resume none             --overwrite starts over (its checkpoints and metrics are deleted,
                                           when training starts); anything else is a one-line error
    resume: PATH                           continue from that checkpoint (it may belong to another run)
    not empty, not a phiforge run          refused unless --overwrite (which then deletes only phiforge's
                                           own run files there, never anything else)

Nothing is written until `start()`, which runs once the config, the data, the model and the checkpoint to
resume from have all been checked; a refused or failed start-up leaves the directory byte-identical (and a
new one is not created at all). From `start()` on, an unexpected error's traceback goes to RUN/errors/.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

import yaml

from phiforge import errors
from phiforge.errors import ConfigError
from phiforge.fileio import write_text_atomic
from phiforge.train.checkpointing import complete_checkpoints, find_resume
from phiforge.train.distributed import DistEnv, barrier, broadcast_object

# what a run writes into its directory; --overwrite deletes these and nothing else
RUN_FILES = ("checkpoints", "latest", "metrics.jsonl", "tensorboard", "errors", "config.yaml", "wandb")


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
    def __init__(self, out_dir: str | Path, env: DistEnv, command: str, resume: str, overwrite: bool = False):
        if overwrite and resume != "none":
            raise ConfigError("--overwrite starts the run over; it cannot be combined with --resume")
        self.path, self.env, self.overwrite = Path(out_dir), env, overwrite
        self.created = not self.path.exists()
        problem = self._claim(command, resume) if env.is_main else None
        problem = broadcast_object(problem, env)
        if problem:
            raise ConfigError(problem)
        ckpt = find_resume(self.path, resume, warn=warn) if env.is_main else None
        self.checkpoint: str | None = broadcast_object(str(ckpt) if ckpt else None, env)  # to resume from

    def _claim(self, command: str, resume: str) -> str | None:
        """Why this run may not use the directory (None: it may)."""
        p = self.path
        if p.exists() and not p.is_dir():
            return f"out_dir {p} is a file, not a directory"
        _check_writable(p)
        if self.created or self.overwrite or not any(p.iterdir()):
            return None
        ours = [n for n in RUN_FILES if (p / n).exists()]
        if not ours:
            return (f"out_dir {p} is not empty and holds no phiforge run; choose a new out_dir, or pass "
                    f"--overwrite to train there anyway")
        if resume != "none":
            return None
        saved = complete_checkpoints(p)
        held = f"checkpoints up to {saved[-1].name}" if saved else "an earlier run's " + " and ".join(ours)
        return (f"out_dir {p} already holds a training run ({held}): pass --resume auto to continue it, or "
                f"--overwrite to start over (deletes its checkpoints and metrics)")

    def start(self, config: dict) -> None:
        """Training starts: clear an overwritten run, write the resolved config, route tracebacks here."""
        if self.env.is_main:
            if self.overwrite:
                for name in RUN_FILES:
                    target = self.path / name
                    if target.is_dir():
                        shutil.rmtree(target)
                    elif target.exists():
                        target.unlink()
            self.path.mkdir(parents=True, exist_ok=True)
            write_text_atomic(self.path / "config.yaml", yaml.safe_dump(config, sort_keys=False))
        barrier(self.env)
        errors.set_error_dir(self.path / "errors")

    def discard_if_new(self) -> None:
        """After a failure before the first step: a directory this run created is removed again."""
        if self.created and self.env.is_main and self.path.exists():
            shutil.rmtree(self.path, ignore_errors=True)
            errors.set_error_dir(None)

