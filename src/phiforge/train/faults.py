"""Fault injection for the engine's tests (and for trying the fault handling by hand). Off unless
PHIFORGE_FAULT is set; a comma-separated list of:

    nan@S          the loss of step S is NaN on every rank (the step must be skipped)
    raise@S        step S raises a plain RuntimeError (a "bug": its traceback must go to RUN/errors/rank-N.txt)
    oom@S          step S raises torch.OutOfMemoryError (the message must name the settings to change)
    hang@S         step S (after its backward pass) writes RUN/fault-hang and sleeps forever (a test then kill -9s the process)
    hang_save@S    the save of step S writes RUN/fault-hang-save once its DCP data is on disk, before the
                   checkpoint is completed (renamed), and sleeps forever
    sleep=SEC      sleep SEC seconds after every step (gives a test time to send a signal)
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch

from phiforge.errors import ConfigError


class Faults:
    def __init__(self, spec: str, rank: int = 0):
        self.nan, self.oom, self.hang, self.hang_save, self.raise_ = set(), set(), set(), set(), set()
        self.sleep = 0.0
        self.rank = rank
        for item in filter(None, (s.strip() for s in spec.split(","))):
            try:
                if item.startswith("sleep="):
                    self.sleep = float(item.split("=", 1)[1])
                    continue
                kind, step = item.split("@", 1)
                getattr(self, kind + "_" if kind == "raise" else kind).add(int(step))
            except (ValueError, AttributeError):
                raise ConfigError(f"PHIFORGE_FAULT: cannot parse '{item}' (see phiforge/train/faults.py)") from None

    @classmethod
    def from_env(cls, rank: int = 0) -> "Faults | None":
        spec = os.environ.get("PHIFORGE_FAULT", "")
        return cls(spec, rank) if spec.strip() else None

    def _hang(self, marker: Path) -> None:
        if self.rank == 0:
            marker.write_text(str(os.getpid()))
        while True:
            time.sleep(1)

    def before_backward(self, step: int, loss: torch.Tensor) -> torch.Tensor:
        if step in self.raise_:
            raise RuntimeError(f"injected failure at step {step} (PHIFORGE_FAULT=raise@{step})")
        if step in self.oom:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (injected by PHIFORGE_FAULT)")
        if step in self.nan:
            return loss * float("nan")
        return loss

    def during_step(self, step: int, run_dir: Path) -> None:
        """Between the backward pass and the optimizer step."""
        if step in self.hang:
            self._hang(Path(run_dir) / "fault-hang")

    def after_step(self, step: int, run_dir: Path) -> None:
        if self.sleep:
            time.sleep(self.sleep)

    def in_save(self, step: int, run_dir: Path) -> None:
        if step in self.hang_save:
            self._hang(Path(run_dir) / "fault-hang-save")
