"""Fault injection for the tests (and for trying the fault handling by hand): one spec format, a comma list of
`KIND@N` and `NAME=VALUE` settings, read from an environment variable that is off unless set.

PHIFORGE_FAULT, for the training engine (`Faults`, its hooks: phiforge.hooks.RunHooks):

    nan@S          the loss of step S is NaN on every rank (the step must be skipped)
    raise@S        step S raises a plain RuntimeError (a "bug": its traceback must go to RUN/errors/rank-N.txt)
    oom@S          step S raises torch.OutOfMemoryError (the message must name the settings to change)
    cpu_oom@S      step S asks the CPU allocator for 4 EiB, which fails at once as a real out-of-memory does
    hang@S         step S (after its backward pass) writes RUN/fault-hang and sleeps forever (a test then kill -9s the process)
    hang_stage@S   the save of step S writes RUN/fault-hang-stage once its RNG and train state are in step-S.tmp,
                   before the model and optimizer state are staged or written, and sleeps forever
    hang_write@S   the save of step S writes RUN/fault-hang-write once every rank's DCP data files are written,
                   before DCP's .metadata (in DCP's writer on rank 0: an async save's background thread), and
                   sleeps forever
    hang_save@S    the save of step S writes RUN/fault-hang-save once its DCP data is on disk, before the
                   checkpoint is completed (renamed; an async save's completion thread), and sleeps forever
    sleep=SEC      sleep SEC seconds after every step (gives a test time to send a signal)
    rank=R         the faults above fire on global rank R only (default: on every rank), e.g.
                   `raise@3,rank=1`: rank 1 fails alone, as one GPU running out of memory does

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
from phiforge.hooks import PrepareHooks, RunHooks

PREPARE_HANG = "fault-hang"  # WORK/fault-hang: a prepare hangs (hang@K)


def parse_faults(spec: str, var: str, kinds: tuple[str, ...],
                 settings: dict[str, type] | None = None) -> tuple[dict[str, set[int]], dict]:
    """({kind: {N, ...}}, {setting: value}) from "kind@N,...,name=value"; `settings` names the settings allowed
    and their types (default: sleep, in seconds); a one-line error naming `var` otherwise."""
    settings = settings or {"sleep": float}
    found: dict[str, set[int]] = {k: set() for k in kinds}
    values: dict = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        try:
            if "=" in item:
                name, value = item.split("=", 1)
                values[name] = settings[name](value)
                continue
            kind, n = item.split("@", 1)
            found[kind].add(int(n))
        except (ValueError, KeyError):
            shown = ", ".join(f"{name}={typ.__name__.upper()}" for name, typ in settings.items())
            raise ConfigError(f"{var}: cannot parse '{item}' (kinds: {', '.join(kinds)}, {shown}; "
                              "see phiforge/faults.py)") from None
    return found, values


def hang_forever(marker: Path | None) -> None:
    if marker is not None:
        marker.write_text(str(os.getpid()))
    while True:
        time.sleep(1)


class Faults(RunHooks):
    """PHIFORGE_FAULT's injections, as the run's hooks (phiforge.hooks.RunHooks)."""

    def __init__(self, spec: str, rank: int = 0, run_dir: Path | None = None):
        kinds = ("nan", "oom", "cpu_oom", "raise", "hang", "hang_stage", "hang_write", "hang_save")
        found, values = parse_faults(spec, "PHIFORGE_FAULT", kinds, {"sleep": float, "rank": int})
        if values.get("rank", rank) != rank:  # the faults are another rank's: this one runs clean
            found = {kind: set() for kind in found}
        self.sleep = values.get("sleep", 0.0)
        self.marker_rank = values.get("rank", 0)  # the rank that writes the hang markers
        self.nan, self.oom, self.cpu_oom, self.raise_ = found["nan"], found["oom"], found["cpu_oom"], found["raise"]
        self.hang, self.hang_save = found["hang"], found["hang_save"]
        self.hang_stage, self.hang_write = found["hang_stage"], found["hang_write"]
        self.rank, self.run_dir = rank, Path(run_dir) if run_dir is not None else Path(".")

    def _hang(self, marker: str) -> None:
        hang_forever(self.run_dir / marker if self.rank == self.marker_rank else None)

    def loss(self, step: int, loss):
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

    def after_backward(self, step: int) -> None:
        if step in self.hang:
            self._hang("fault-hang")

    def after_step(self, step: int) -> None:
        if self.sleep:
            time.sleep(self.sleep)

    def staging(self, step: int) -> None:
        if step in self.hang_stage:
            self._hang("fault-hang-stage")

    def writing(self, step: int) -> None:
        if step in self.hang_write:
            self._hang("fault-hang-write")

    def saving(self, step: int) -> None:
        if step in self.hang_save:
            self._hang("fault-hang-save")


def run_hooks(rank: int, run_dir: Path) -> RunHooks:
    """The hooks a training run gets: PHIFORGE_FAULT's injections when the variable is set, else none."""
    spec = os.environ.get("PHIFORGE_FAULT", "")
    return Faults(spec, rank, run_dir) if spec.strip() else RunHooks()


class PrepareFaults(PrepareHooks):
    """PHIFORGE_PREPARE_FAULT's injections, as the hooks of a prepare whose work directory is `work`."""

    def __init__(self, spec: str, work: Path):
        found, values = parse_faults(spec, "PHIFORGE_PREPARE_FAULT", ("hang",))
        self.sleep = values.get("sleep", 0.0)
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
