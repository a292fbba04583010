"""Fault injection for the tests (and for trying the fault handling by hand): one spec format, a comma list of
`KIND@N` and `sleep=SECONDS`, read from an environment variable that is off unless set.

PHIFORGE_FAULT, for the training engine (`Faults`):

    nan@S          the loss of step S is NaN on every rank (the step must be skipped)
    raise@S        step S raises a plain RuntimeError (a "bug": its traceback must go to RUN/errors/rank-N.txt)
    oom@S          step S raises torch.OutOfMemoryError (the message must name the settings to change)
    cpu_oom@S      step S asks the CPU allocator for 4 EiB, which fails at once as a real out-of-memory does
    hang@S         step S (after its backward pass) writes RUN/fault-hang and sleeps forever (a test then kill -9s the process)
    hang_save@S    the save of step S writes RUN/fault-hang-save once its DCP data is on disk, before the
                   checkpoint is completed (renamed), and sleeps forever
    sleep=SEC      sleep SEC seconds after every step (gives a test time to send a signal)

PHIFORGE_PREPARE_FAULT, for `phiforge prepare` (`PrepareFaults`, its hooks: phiforge.hooks.PrepareHooks):

    hang@K         once the first results of input unit K are written (past the last checkpoint) and flushed,
                   write WORK/fault-hang and sleep forever (a test then kill -9s the process)
    sleep=SEC      sleep SEC seconds after each unit
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from phiforge.errors import ConfigError
from phiforge.hooks import PrepareHooks

PREPARE_HANG = "fault-hang"  # WORK/fault-hang: a prepare hangs (hang@K)


def parse_faults(spec: str, var: str, kinds: tuple[str, ...]) -> tuple[dict[str, set[int]], float]:
    """({kind: {N, ...}}, sleep seconds) from "kind@N,...,sleep=S"; a one-line error naming `var` otherwise."""
    found: dict[str, set[int]] = {k: set() for k in kinds}
    sleep = 0.0
    for item in filter(None, (s.strip() for s in spec.split(","))):
        try:
            if item.startswith("sleep="):
                sleep = float(item.split("=", 1)[1])
                continue
            kind, n = item.split("@", 1)
            found[kind].add(int(n))
        except (ValueError, KeyError):
            raise ConfigError(f"{var}: cannot parse '{item}' (kinds: {', '.join(kinds)}, sleep=SECONDS; "
                              "see phiforge/faults.py)") from None
    return found, sleep


def hang_forever(marker: Path | None) -> None:
    if marker is not None:
        marker.write_text(str(os.getpid()))
    while True:
        time.sleep(1)


class Faults:
    def __init__(self, spec: str, rank: int = 0):
        found, self.sleep = parse_faults(spec, "PHIFORGE_FAULT", ("nan", "oom", "cpu_oom", "raise", "hang",
                                                                   "hang_save"))
        self.nan, self.oom, self.cpu_oom, self.raise_ = found["nan"], found["oom"], found["cpu_oom"], found["raise"]
        self.hang, self.hang_save = found["hang"], found["hang_save"]
        self.rank = rank

    @classmethod
    def from_env(cls, rank: int = 0) -> "Faults | None":
        spec = os.environ.get("PHIFORGE_FAULT", "")
        return cls(spec, rank) if spec.strip() else None

    def _hang(self, marker: Path) -> None:
        hang_forever(marker if self.rank == 0 else None)

    def before_backward(self, step: int, loss):
        import torch

        if step in self.raise_:
            raise RuntimeError(f"injected failure at step {step} (PHIFORGE_FAULT=raise@{step})")
        if step in self.oom:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (injected by PHIFORGE_FAULT)")
        if step in self.cpu_oom:
            torch.empty(2**62, dtype=torch.uint8)  # the allocator's own error, not an imitation
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


class PrepareFaults(PrepareHooks):
    """PHIFORGE_PREPARE_FAULT's injections, as the hooks of a prepare whose work directory is `work`."""

    def __init__(self, spec: str, work: Path):
        found, self.sleep = parse_faults(spec, "PHIFORGE_PREPARE_FAULT", ("hang",))
        self.hang, self.work = found["hang"], Path(work)

    def written(self, unit: int, writer) -> None:
        if unit in self.hang:
            writer.flush()  # what was written past the checkpoint reaches the files, as a crash may leave it
            hang_forever(self.work / PREPARE_HANG)

    def unit_done(self, unit: int) -> None:
        if self.sleep:
            time.sleep(self.sleep)


def prepare_hooks(work: Path) -> PrepareHooks:
    """The hooks of a prepare whose work directory is `work`: PHIFORGE_PREPARE_FAULT's injections when the
    variable is set, else none. Either way the marker a faulted run left in `work` goes, so that a resumed run's
    output holds only the dataset."""
    (Path(work) / PREPARE_HANG).unlink(missing_ok=True)
    spec = os.environ.get("PHIFORGE_PREPARE_FAULT", "")
    return PrepareFaults(spec, work) if spec.strip() else PrepareHooks()
