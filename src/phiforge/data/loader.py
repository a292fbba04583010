"""Training and validation batches from packed token shards.

A split's shards form one token stream, cut into windows of seq_len+1 tokens with stride seq_len (so every
token is a target once). Each epoch visits the windows in a permutation seeded by (seed, epoch); rank r of
world_size takes every world_size-th window, so ranks never overlap. The loader's whole state is
(epoch, position): a restored loader yields exactly the batches an uninterrupted one would.
"""

from __future__ import annotations

import numpy as np
import torch

from phiforge.data.shards import TokenDataset, open_token_dataset
from phiforge.errors import DataError


class TokenStream:
    """Random access to a split's concatenated shards."""

    def __init__(self, ds: TokenDataset, split: str):
        self.arrays = ds.arrays(split)
        self.offsets = np.cumsum([0] + [len(a) for a in self.arrays])
        self.total = int(self.offsets[-1])

    def read(self, start: int, length: int) -> np.ndarray:
        out = np.empty(length, dtype=np.int64)
        pos, filled = start, 0
        i = int(np.searchsorted(self.offsets, pos, side="right") - 1)
        while filled < length:
            a = self.arrays[i]
            lo = pos - int(self.offsets[i])
            n = min(length - filled, len(a) - lo)
            out[filled : filled + n] = a[lo : lo + n]
            filled, pos, i = filled + n, pos + n, i + 1
        return out


def _windows(stream: TokenStream, seq_len: int, what: str) -> int:
    n = (stream.total - 1) // seq_len
    if n < 1:
        raise DataError(f"{what} has {stream.total} tokens, fewer than one window of seq_len+1 = {seq_len + 1}")
    return n


class PackedLoader:
    def __init__(self, data_dir, split: str, seq_len: int, batch_size: int, seed: int = 0, rank: int = 0,
                 world_size: int = 1):
        self.ds = open_token_dataset(data_dir)
        self.stream = TokenStream(self.ds, split)
        self.seq_len, self.batch_size, self.seed = seq_len, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.n_windows = _windows(self.stream, seq_len, f"split '{split}' of {data_dir}")
        self.per_rank = self.n_windows // world_size
        if self.per_rank < batch_size:
            raise DataError(f"split '{split}' of {data_dir} has {self.n_windows} windows of {seq_len + 1} tokens: "
                            f"too few for batch size {batch_size} on {world_size} rank(s)")
        self.epoch, self.position = 0, 0
        self._order = None

    @property
    def tokens_per_batch(self) -> int:
        return self.batch_size * self.seq_len

    def _epoch_order(self) -> np.ndarray:
        if self._order is None:
            rng = np.random.Generator(np.random.PCG64([self.seed, self.epoch]))
            perm = rng.permutation(self.n_windows)
            self._order = perm[self.rank :: self.world_size][: self.per_rank]
        return self._order

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.position + self.batch_size > self.per_rank:
            self.epoch, self.position, self._order = self.epoch + 1, 0, None
        idx = self._epoch_order()[self.position : self.position + self.batch_size]
        self.position += self.batch_size
        L = self.seq_len
        rows = np.stack([self.stream.read(int(w) * L, L + 1) for w in idx])
        t = torch.from_numpy(rows)
        return t[:, :-1].contiguous(), t[:, 1:].contiguous()

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "seq_len": self.seq_len,
                "batch_size": self.batch_size, "rank": self.rank, "world_size": self.world_size}

    def load_state_dict(self, state: dict) -> None:
        for key in ("seed", "seq_len", "batch_size"):
            if state.get(key, getattr(self, key)) != getattr(self, key):
                raise DataError(f"loader state was saved with {key}={state[key]}, this run uses {getattr(self, key)}")
        self.epoch, self.position, self._order = int(state["epoch"]), int(state["position"]), None


def eval_batches(data_dir, split: str, seq_len: int, batch_size: int, max_batches: int):
    """The first max_batches batches of consecutive windows of a split: the same every call."""
    ds = open_token_dataset(data_dir)
    stream = TokenStream(ds, split)
    n = min(_windows(stream, seq_len, f"split '{split}' of {data_dir}"), batch_size * max_batches)
    rows = np.stack([stream.read(w * seq_len, seq_len + 1) for w in range(n)])
    t = torch.from_numpy(rows)
    return [(t[i : i + batch_size, :-1].contiguous(), t[i : i + batch_size, 1:].contiguous())
            for i in range(0, n, batch_size)]
