"""`PhiforgeLitData`: litgpt's `LitData` over the chunks `phiforge litgpt prepare` writes, optionally unshuffled.

Stock `LitData` always shuffles the training set. The chunks written by `phiforge litgpt prepare` already hold
the training windows in the order phiforge's loader serves them, so with `shuffle: false` (the default here)
LitGPT trains on exactly phiforge's batches, in phiforge's order; `shuffle: true` is stock LitData. Used by
`litgpt pretrain` through its YAML (`data: {class_path: phiforge.litgpt.datamodule.PhiforgeLitData, ...}`);
importing this module needs litgpt.
"""

from __future__ import annotations

from dataclasses import dataclass

from litgpt.data import LitData
from torch.utils.data import DataLoader

from phiforge.data.prefetch import DEPTH as PREFETCH_FACTOR


@dataclass
class PhiforgeLitData(LitData):
    """LitData with the training order under control; see the module docstring."""

    shuffle: bool = False
    """False: read the training windows in the order they were written (phiforge's). True: litdata shuffles."""
    pin_memory: bool = False
    """Pin host memory for asynchronous GPU copies (stock LitData always pins); `phiforge litgpt pretrain` pins on
    CUDA only, as phiforge's own trainer does."""

    def _dataloader(self, input_dir: str, train: bool) -> DataLoader:
        from litdata.streaming import StreamingDataLoader, StreamingDataset, TokensLoader

        dataset = StreamingDataset(input_dir=input_dir, item_loader=TokensLoader(block_size=self.seq_length),
                                   shuffle=train and self.shuffle, seed=self.seed)
        # with workers: PREFETCH_FACTOR batches built ahead per worker, as phiforge's Prefetcher builds DEPTH
        ahead = {"prefetch_factor": PREFETCH_FACTOR} if self.num_workers > 0 else {}
        return StreamingDataLoader(dataset, batch_size=self.batch_size, pin_memory=self.pin_memory,
                                   num_workers=self.num_workers, drop_last=True, **ahead)
