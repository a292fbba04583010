"""The points of a long job where it can be observed or disturbed, one base class per job whose methods do
nothing. The job calls the one hooks object it is given without knowing what it does; phiforge.faults subclasses
these with the tests' fault injection and makes the object a job gets (faults.prepare_hooks).

    PrepareHooks   `phiforge prepare` (phiforge.data.prepare)
"""

from __future__ import annotations


class PrepareHooks:
    def written(self, unit: int, writer) -> None:
        """A batch of input unit `unit`'s documents is in the DatasetWriter `writer` (not yet journaled)."""

    def unit_done(self, unit: int) -> None:
        """Input unit `unit` is complete (before the checkpoint that may follow it)."""
