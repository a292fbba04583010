"""Training and validation batches from packed token shards.

A split's token stream is cut into windows of seq_len+1 tokens with stride seq_len: window w is
tokens[w*seq_len : w*seq_len + seq_len + 1], x = its first seq_len tokens, y = its last seq_len. Windows share
only their boundary token, so every token of the stream is a target exactly once per epoch.

Training (`PackedLoader`): epoch e visits the windows in the permutation drawn by
numpy.random.Generator(PCG64([seed, e])). Rank r of world_size takes permutation entries r, r+world_size, ...
(every rank gets the same count, the remainder is dropped), so ranks never share a window and step in
lockstep. A batch is the rank's next batch_size windows; an epoch ends when fewer than batch_size are left,
and epochs roll over forever. The whole state is (epoch, position) with position counted in windows of this
rank, the same on every rank: a loader restored from `state_dict()` yields exactly the batches an
uninterrupted one would. Restoring with another world_size resumes at the same place in the epoch
(no window repeated, at most world_size-1 skipped); another batch_size is fine too.

Validation (`eval_batches`): the first max_batches * batch_size windows of the split in order; the same on
every call.
"""

from __future__ import annotations

import operator

import numpy as np
import torch

from phiforge.data.shards import TokenStream, open_token_dataset
from phiforge.errors import ConfigError, DataError


def _count_windows(stream: TokenStream, seq_len: int, what: str) -> int:
    n = (stream.total - 1) // seq_len if stream.total > 0 else 0
    if n < 1:
        raise DataError(f"{what} has {stream.total} tokens, fewer than one window of seq_len+1 = {seq_len + 1}")
    return n


def _int(value, what: str, minimum: int) -> int:
    try:
        v = operator.index(value)  # ints and numpy integers; not floats or strings
    except TypeError:
        v = None
    if v is None or isinstance(value, bool) or v < minimum:
        raise ConfigError(f"{what} must be an integer >= {minimum}, got {value!r}")
    return int(v)


def _batch(stream: TokenStream, windows, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    rows = np.stack([stream.read(int(w) * seq_len, seq_len + 1) for w in windows])
    t = torch.from_numpy(rows)
    return t[:, :-1].contiguous(), t[:, 1:].contiguous()


class PackedLoader:
    """Shuffled, rank-sharded, exactly resumable batches of a split. See the module docstring."""

    def __init__(self, data_dir, split: str, seq_len: int, batch_size: int, seed: int = 0, rank: int = 0,
                 world_size: int = 1):
        seq_len, batch_size = _int(seq_len, "seq_len", 1), _int(batch_size, "batch size", 1)
        seed, rank, world_size = _int(seed, "seed", 0), _int(rank, "rank", 0), _int(world_size, "world_size", 1)
        if rank >= world_size:
            raise ConfigError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        self.dataset = open_token_dataset(data_dir)
        self.split = split
        self.stream = self.dataset.stream(split)
        self.seq_len, self.batch_size, self.seed = seq_len, batch_size, seed
        self.rank, self.world_size = rank, world_size
        what = f"split '{split}' of {data_dir}"
        self.n_windows = _count_windows(self.stream, seq_len, what)
        self.per_rank = self.n_windows // world_size
        if self.per_rank < batch_size:
            raise DataError(f"{what} has {self.n_windows} windows of {seq_len + 1} tokens: too few for batch size "
                            f"{batch_size} on {world_size} rank(s)")
        self.epoch = 0
        self.position = 0  # windows of this rank's share of the epoch already served
        self._order: np.ndarray | None = None
        self._order_epoch = -1

    @property
    def tokens_per_batch(self) -> int:
        """Target tokens per batch on this rank (batch_size * seq_len)."""
        return self.batch_size * self.seq_len

    @property
    def batches_per_epoch(self) -> int:
        return self.per_rank // self.batch_size

    def epoch_order(self, epoch: int | None = None) -> np.ndarray:
        """This rank's window indices for an epoch, in the order they are served."""
        epoch = self.epoch if epoch is None else epoch
        if self._order is None or self._order_epoch != epoch:
            perm = np.random.Generator(np.random.PCG64([self.seed, epoch])).permutation(self.n_windows)
            self._order = perm[self.rank :: self.world_size][: self.per_rank]
            self._order_epoch = epoch
        return self._order

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """x, y: int64 [batch_size, seq_len]; y is x shifted left by one token."""
        if self.position + self.batch_size > self.per_rank:
            self.epoch, self.position = self.epoch + 1, 0
        idx = self.epoch_order()[self.position : self.position + self.batch_size]
        self.position += self.batch_size
        return _batch(self.stream, idx, self.seq_len)

    def __iter__(self):
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict:
        """Plain ints (JSON-able). epoch/position are the same on every rank, so one rank's state restores all."""
        return {"version": 1, "epoch": self.epoch, "position": self.position, "seed": self.seed,
                "seq_len": self.seq_len, "batch_size": self.batch_size, "world_size": self.world_size,
                "windows": self.n_windows}

    def load_state_dict(self, state: dict) -> None:
        try:
            epoch, position = int(state["epoch"]), int(state["position"])
        except (KeyError, TypeError, ValueError):
            raise DataError(f"not a data loader state (needs integer epoch and position): {state!r:.200}") from None
        for key in ("seed", "seq_len"):
            if key in state and int(state[key]) != getattr(self, key):
                raise DataError(f"data loader state was saved with {key}={state[key]}, this run has "
                                f"{key}={getattr(self, key)}: resuming would not continue the same data order")
        if "windows" in state and int(state["windows"]) != self.n_windows:
            raise DataError(f"data loader state was saved for a '{self.split}' split of {state['windows']} windows, "
                            f"{self.dataset.dir} has {self.n_windows}: the dataset changed since")
        old_ws = int(state.get("world_size", self.world_size))
        if old_ws != self.world_size:  # same windows of the epoch consumed: perm[: position * world_size]
            position = -(-position * old_ws // self.world_size)
        if epoch < 0 or position < 0:
            raise DataError(f"data loader state has a negative epoch or position: {state!r:.200}")
        self.epoch, self.position = epoch, position


def eval_batches(data_dir, split: str, seq_len: int, batch_size: int, max_batches: int):
    """The split's first windows in order, as up to max_batches full batches [(x, y), ...]; the same every call.

    A split too small for one full batch gives one smaller batch.
    """
    seq_len, batch_size = _int(seq_len, "seq_len", 1), _int(batch_size, "batch size", 1)
    max_batches = _int(max_batches, "max_batches", 1)
    stream = open_token_dataset(data_dir).stream(split)
    n = min(_count_windows(stream, seq_len, f"split '{split}' of {data_dir}"), batch_size * max_batches)
    if n >= batch_size:
        n -= n % batch_size  # full batches only: the loop averages per batch
    return [_batch(stream, range(i, min(i + batch_size, n)), seq_len) for i in range(0, n, batch_size)]
