"""The points of a long job where it can be observed or disturbed, one base class per job whose methods do
nothing. The job calls the one hooks object it is given without knowing what it does; phiforge.faults subclasses
these with the tests' fault injection (PHIFORGE_FAULT, PHIFORGE_PREPARE_FAULT) and makes the object a job gets
(faults.run_hooks, faults.prepare_hooks).

    RunHooks       a training run: the engine (TrainStep, Loop, Checkpointer) and every trainer
    PrepareHooks   `phiforge prepare` (phiforge.data.prepare)
"""

from __future__ import annotations


class RunHooks:
    def loss(self, step: int, loss):
        """A micro-step's loss, just before its backward pass; returns the loss to backpropagate."""
        return loss

    def after_backward(self, step: int) -> None:
        """Between the last backward pass of optimizer step `step` and the optimizer step."""

    def after_step(self, step: int) -> None:
        """After optimizer step `step` and its cadence (log, validation, save)."""

    def staging(self, step: int) -> None:
        """The save of step `step` has its small files (RNG states, train state) in step-N.tmp; the model and
        optimizer state are about to be staged (async) or written (sync). Every rank, on the training thread."""

    def writing(self, step: int) -> None:
        """Every rank's data files of the save of step `step` are written; DCP's .metadata is next. Rank 0 only,
        in DCP's writer: for an async save, a background thread."""

    def saving(self, step: int) -> None:
        """The checkpoint of step `step` has its data on disk and is about to be completed (renamed, `latest`).
        Every rank; for an async save, in the save's completion thread."""


class PrepareHooks:
    def written(self, unit: int, writer) -> None:
        """A batch of input unit `unit`'s documents is in the DatasetWriter `writer` (not yet journaled)."""

    def unit_done(self, unit: int) -> None:
        """Input unit `unit` is complete (before the checkpoint that may follow it)."""
