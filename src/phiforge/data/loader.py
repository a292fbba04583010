"""Training and validation batches from packed token shards.

A split's token stream is cut into windows of seq_len+1 tokens with stride seq_len: window w is
tokens[w*seq_len : w*seq_len + seq_len + 1], x = its first seq_len tokens, y = its last seq_len. Windows share
only their boundary token, so every token of the stream is a target exactly once per epoch.

Training (`PackedLoader`): epoch e visits the windows in a seeded random order. Up to 2^22 windows (8.6B
tokens at seq_len 2048) that order is the permutation drawn by numpy.random.Generator(PCG64([seed, e]))
("permutation"); above, where an explicit permutation would cost gigabytes, it is a keyed Feistel
bijection of [0, n) with cycle walking ("feistel": every window once per epoch, computed on demand in O(1)
memory). Rank r of world_size takes order entries r, r+world_size, ... (every rank gets the same count, the
remainder is dropped), so ranks never share a window and step in lockstep. A batch is the rank's next
batch_size windows; an epoch ends when fewer than batch_size are left, and epochs roll over forever. The
whole state is (epoch, position) with position counted in windows of this rank, the same on every rank: a
loader restored from `state_dict()` yields exactly the batches an uninterrupted one would. Restoring with
another world_size resumes at the same place in the epoch (no window repeated, at most world_size-1
skipped); another batch_size is fine too.

Source mixture (`mixture=` a {source: weight} dict, or "index" for the weights `prepare redpajama` recorded):
each source's shards form their own stream and windows (a window never crosses sources). Global sample i
draws its source from the weights (seeded by (seed, i // 8192), so the choice of sample i never depends on
how it is reached) and takes that source's next window in the source's own order (a Feistel order per
source and source-epoch: a source that runs out starts its next epoch, independently of the others). Rank r
takes global samples r, r+world_size, ... The state is the global position plus how many windows each
source has served, so resume is exact here too, across world sizes as well.

Validation (`eval_batches`): the first max_batches * batch_size windows of the split in order; the same on
every call. With a mixture, each source contributes its first windows in proportion to its weight.

Reading from object storage (fsspec, litdata) is an extension point: `TokenDataset` memory-maps local files;
a subclass whose `_memmap` returns arrays backed by remote reads would serve the same windows.
"""

from __future__ import annotations

import operator
from pathlib import Path

import numpy as np
import torch

from phiforge.data.shards import TokenStream, open_token_dataset
from phiforge.errors import ConfigError, DataError

PERMUTATION_MAX_WINDOWS = 1 << 22
MIX_BLOCK = 8192
_M64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def count_windows(stream: TokenStream, seq_len: int, what: str) -> int:
    """Windows of seq_len + 1 tokens (inputs and targets) that start every seq_len tokens of `stream`; a stream
    without one is a DataError naming `what`."""
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


def check_ids(rows: np.ndarray, streams: list[TokenStream], starts: list[int], vocab_size: int | None) -> None:
    """Refuse token ids the model has no embedding for (row i was read from streams[i] at starts[i]): one max per
    batch, so a corrupt or foreign shard is a one-line error naming it, not an IndexError (or a CUDA assert)."""
    if vocab_size is None or not len(rows) or int(rows.max()) < vocab_size:
        return
    r, c = (int(v) for v in np.argwhere(rows >= vocab_size)[0])
    shard = streams[r].file_at(starts[r] + c)
    raise DataError(f"shard {shard} holds token id {int(rows[r, c])}, at or above the model's vocabulary of "
                    f"{vocab_size}: corrupt, or made by another tokenizer; `phiforge data inspect "
                    f"{Path(shard).parent} --verify` checks every shard")


def _batch(stream: TokenStream, windows, seq_len: int, vocab_size: int | None = None):
    starts = [int(w) * seq_len for w in windows]
    rows = np.stack([stream.read(start, seq_len + 1) for start in starts])
    check_ids(rows, [stream] * len(starts), starts, vocab_size)
    t = torch.from_numpy(rows)
    return t[:, :-1].contiguous(), t[:, 1:].contiguous()


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser, vectorised over uint64."""
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


class FeistelOrder:
    """A keyed bijection of [0, n): a balanced Feistel network on the smallest even bit width >= log2(n), with
    cycle walking back into range. `order[i]` for an array of positions i, in O(len(i)) memory."""

    ROUNDS = 6

    def __init__(self, n: int, key: tuple[int, ...]):
        if n < 1:
            raise ValueError("n must be >= 1")
        self.n = n
        bits = max(2, (n - 1).bit_length())
        bits += bits % 2
        self.half = bits // 2
        self.mask = np.uint64((1 << self.half) - 1)
        seeds = np.random.SeedSequence(list(key)).generate_state(self.ROUNDS, dtype=np.uint64)
        self.keys = [np.uint64(k) for k in seeds]

    def _once(self, x: np.ndarray) -> np.ndarray:
        h = np.uint64(self.half)
        left, right = x >> h, x & self.mask
        for k in self.keys:
            left, right = right, left ^ (_mix64(right ^ k) & self.mask)
        return (left << h) | right

    def __getitem__(self, i) -> np.ndarray:
        x = np.asarray(i, dtype=np.uint64)
        scalar = x.ndim == 0
        x = np.atleast_1d(x).copy()
        if len(x) and int(x.max()) >= self.n:
            raise IndexError(f"position outside [0, {self.n})")
        y = self._once(x)
        bad = y >= self.n
        while bad.any():  # cycle walking: at most 4x the domain, so a few rounds
            y[bad] = self._once(y[bad])
            bad = y >= self.n
        y = y.astype(np.int64)
        return y[0] if scalar else y


def resolve_mixture(dataset, split: str, mixture, drop_missing: bool = False) -> dict[str, float] | None:
    """The {source: weight} to sample a split with: None (no mixture), "index" (the weights recorded by
    `prepare`), or a dict. Sources with weight 0 are left out; a weighted source the split lacks is an error,
    or with drop_missing (a small held-out split that did not draw every source) left out too."""
    if mixture is None or mixture is False:
        return None
    if mixture == "index" or mixture is True:
        spec = dataset.index.get("mixture", {}).get("weights")
        if not spec:
            raise DataError(f"dataset {dataset.dir} records no mixture weights (prepare redpajama writes them); "
                            "pass the weights explicitly")
    elif isinstance(mixture, dict):
        spec = mixture
    else:
        raise ConfigError(f"mixture must be None, 'index' or a {{source: weight}} dict, got {mixture!r}")
    weights = {}
    for k, v in spec.items():
        try:
            w = float(v)
        except (TypeError, ValueError):
            w = -1.0
        if not w >= 0:
            raise ConfigError(f"mixture weight of {k!r} must be a number >= 0, got {v!r}")
        if w > 0:
            weights[str(k)] = w
    if not weights:
        raise ConfigError("mixture: at least one source needs a positive weight")
    have = dataset.source_tokens(split)
    missing = sorted(k for k in weights if not have.get(k))
    if drop_missing and len(missing) < len(weights):
        return {k: w for k, w in sorted(weights.items()) if k not in missing}
    if missing:
        raise DataError(f"mixture weights name source(s) {', '.join(missing)} that split '{split}' of {dataset.dir} "
                        f"does not have (it has: {', '.join(k or '(none)' for k in have)}); give them weight 0")
    return dict(sorted(weights.items()))


class PackedLoader:
    """Shuffled, rank-sharded, exactly resumable batches of a split. See the module docstring."""

    def __init__(self, data_dir, split: str, seq_len: int, batch_size: int, seed: int = 0, rank: int = 0,
                 world_size: int = 1, mixture=None, shuffle: str = "auto", vocab_size: int | None = None):
        seq_len, batch_size = _int(seq_len, "seq_len", 1), _int(batch_size, "batch size", 1)
        seed, rank, world_size = _int(seed, "seed", 0), _int(rank, "rank", 0), _int(world_size, "world_size", 1)
        if rank >= world_size:
            raise ConfigError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        if shuffle not in ("auto", "permutation", "feistel"):
            raise ConfigError(f"shuffle must be auto, permutation or feistel, got {shuffle!r}")
        self.dataset = open_token_dataset(data_dir)
        self.split = split
        self.stream = self.dataset.stream(split)
        self.seq_len, self.batch_size, self.seed = seq_len, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.vocab_size = vocab_size  # set: every batch's ids are checked against it (check_ids)
        what = f"split '{split}' of {data_dir}"
        self.n_windows = count_windows(self.stream, seq_len, what)
        self.mixture = resolve_mixture(self.dataset, split, mixture)
        self.epoch = 0
        self.position = 0  # this rank's samples already served (in the epoch, without a mixture)
        self._order = None
        self._order_epoch = -1
        if self.mixture is None:
            self.per_rank = self.n_windows // world_size
            if self.per_rank < batch_size:
                raise DataError(f"{what} has {self.n_windows} windows of {seq_len + 1} tokens: too few for batch "
                                f"size {batch_size} on {world_size} rank(s)")
            if shuffle == "auto":
                shuffle = "permutation" if self.n_windows <= PERMUTATION_MAX_WINDOWS else "feistel"
            self.shuffle = shuffle
        else:
            self.shuffle = "feistel"
            self.sources = list(self.mixture)
            self.source_streams = [self.dataset.source_stream(split, s) for s in self.sources]
            self.source_windows = [count_windows(st, seq_len, f"source '{s}' of {what}")
                                   for s, st in zip(self.sources, self.source_streams)]
            w = np.array([self.mixture[s] for s in self.sources], dtype=np.float64)
            self._cdf = np.cumsum(w / w.sum())
            self._cdf[-1] = 1.0
            self.consumed = [0] * len(self.sources)  # windows each source has served (all ranks)
            self.per_rank = sum(self.source_windows) // world_size  # a nominal epoch, for batches_per_epoch
            self._src_orders: dict[tuple[int, int], FeistelOrder] = {}
            self._choice_cache: tuple[int, np.ndarray] | None = None

    @property
    def tokens_per_batch(self) -> int:
        """Target tokens per batch on this rank (batch_size * seq_len)."""
        return self.batch_size * self.seq_len

    @property
    def batches_per_epoch(self) -> int:
        return self.per_rank // self.batch_size

    # ------------------------------------------------------------------ plain (one stream)

    def _positions(self, epoch: int, positions: np.ndarray) -> np.ndarray:
        """Window indices at this rank's epoch positions."""
        if self.shuffle == "permutation":
            return self.epoch_order(epoch)[positions]
        return FeistelOrder(self.n_windows, (self.seed, epoch))[positions * self.world_size + self.rank]

    def epoch_order(self, epoch: int | None = None) -> np.ndarray:
        """This rank's window indices for an epoch, in the order they are served."""
        if self.mixture is not None:
            raise DataError("epoch_order() is not defined with a source mixture (sources have their own epochs)")
        epoch = self.epoch if epoch is None else epoch
        if self._order is None or self._order_epoch != epoch:
            if self.shuffle == "permutation":
                perm = np.random.Generator(np.random.PCG64([self.seed, epoch])).permutation(self.n_windows)
                self._order = perm[self.rank :: self.world_size][: self.per_rank]
            else:
                self._order = self._positions(epoch, np.arange(self.per_rank, dtype=np.int64))
            self._order_epoch = epoch
        return self._order

    # ------------------------------------------------------------------ mixture

    def _choices(self, start: int, stop: int) -> np.ndarray:
        """Source indices of global samples [start, stop)."""
        out = []
        b = start // MIX_BLOCK
        while b * MIX_BLOCK < stop:
            if self._choice_cache is None or self._choice_cache[0] != b:
                u = np.random.Generator(np.random.PCG64([self.seed, 0x6D6978, b])).random(MIX_BLOCK)
                self._choice_cache = (b, np.searchsorted(self._cdf, u, side="right").astype(np.int64))
            blk = self._choice_cache[1]
            lo, hi = max(start, b * MIX_BLOCK) - b * MIX_BLOCK, min(stop, (b + 1) * MIX_BLOCK) - b * MIX_BLOCK
            out.append(np.minimum(blk[lo:hi], len(self.sources) - 1))
            b += 1
        return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)

    def _source_window(self, k: int, c: int) -> int:
        n = self.source_windows[k]
        ep = c // n
        key = (k, ep)
        if key not in self._src_orders:
            if len(self._src_orders) > 64:
                self._src_orders.clear()
            self._src_orders[key] = FeistelOrder(n, (self.seed, ep, 1 + k))
        return int(self._src_orders[key][c % n])

    def _mixture_batch(self):
        ws = self.world_size
        g0 = self.position * ws
        g1 = g0 + self.batch_size * ws
        ch = self._choices(g0, g1)
        rows, streams, starts = [], [], []
        counts = list(self.consumed)
        for j, k in enumerate(ch):
            k = int(k)
            c = counts[k]
            counts[k] += 1
            if j % ws == self.rank:
                streams.append(self.source_streams[k])
                starts.append(self._source_window(k, c) * self.seq_len)
                rows.append(streams[-1].read(starts[-1], self.seq_len + 1))
        self.consumed = counts
        self.position += self.batch_size
        stacked = np.stack(rows)
        check_ids(stacked, streams, starts, self.vocab_size)
        t = torch.from_numpy(stacked)
        return t[:, :-1].contiguous(), t[:, 1:].contiguous()

    def _advance_mixture(self, g_from: int, g_to: int) -> None:
        if g_to > g_from:
            ch = self._choices(g_from, g_to)
            for k, c in enumerate(np.bincount(ch, minlength=len(self.sources))):
                self.consumed[k] += int(c)

    # ------------------------------------------------------------------ common

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """x, y: int64 [batch_size, seq_len]; y is x shifted left by one token."""
        if self.mixture is not None:
            return self._mixture_batch()
        if self.position + self.batch_size > self.per_rank:
            self.epoch, self.position = self.epoch + 1, 0
        if self.shuffle == "permutation":
            idx = self.epoch_order()[self.position : self.position + self.batch_size]
        else:
            idx = self._positions(self.epoch, np.arange(self.position, self.position + self.batch_size))
        self.position += self.batch_size
        return _batch(self.stream, idx, self.seq_len, self.vocab_size)

    def __iter__(self):
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict:
        """JSON-able. epoch/position (and per-source counts) are the same on every rank, so one rank's state
        restores all."""
        state = {"version": 1, "epoch": self.epoch, "position": self.position, "seed": self.seed,
                 "seq_len": self.seq_len, "batch_size": self.batch_size, "world_size": self.world_size,
                 "windows": self.n_windows}
        if self.shuffle != "permutation" or self.mixture is not None:
            state.update(version=2, order=self.shuffle)
        if self.mixture is not None:
            state.update(order="mixture", mixture=dict(self.mixture),
                         consumed=dict(zip(self.sources, self.consumed)),
                         source_windows=dict(zip(self.sources, self.source_windows)))
        return state

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
        order = state.get("order", "permutation")
        mine = "mixture" if self.mixture is not None else self.shuffle
        if order != mine:
            raise DataError(f"data loader state was saved with order '{order}', this loader uses '{mine}' "
                            "(mixture/shuffle settings differ): resuming would not continue the same data order")
        if epoch < 0 or position < 0:
            raise DataError(f"data loader state has a negative epoch or position: {state!r:.200}")
        old_ws = int(state.get("world_size", self.world_size))
        if self.mixture is None:
            if old_ws != self.world_size:  # same windows of the epoch consumed: order[: position * world_size]
                position = -(-position * old_ws // self.world_size)
            self.epoch, self.position = epoch, position
            return
        if state.get("mixture") != self.mixture or state.get("source_windows") != dict(
                zip(self.sources, self.source_windows)):
            raise DataError("data loader state was saved with other mixture weights or another dataset: "
                            f"{state.get('mixture')} vs {self.mixture}")
        consumed = state.get("consumed", {})
        self.consumed = [int(consumed.get(s, 0)) for s in self.sources]
        g = position * old_ws
        self.position = -(-g // self.world_size)
        self._advance_mixture(g, self.position * self.world_size)  # samples skipped to align the ranks
        self.epoch = 0


def eval_batches(data_dir, split: str, seq_len: int, batch_size: int, max_batches: int, mixture=None,
                 vocab_size: int | None = None):
    """The split's first windows in order, as up to max_batches full batches [(x, y), ...]; the same every call.
    vocab_size: their token ids are checked against it (check_ids).

    A split too small for one full batch gives one smaller batch. With a mixture, the windows are the first
    ones of each source, in numbers proportional to the weights (largest remainder), sources interleaved;
    weighted sources the split does not have are left out.
    """
    seq_len, batch_size = _int(seq_len, "seq_len", 1), _int(batch_size, "batch size", 1)
    max_batches = _int(max_batches, "max_batches", 1)
    ds = open_token_dataset(data_dir)
    stream = ds.stream(split)
    weights = resolve_mixture(ds, split, mixture, drop_missing=True)
    if weights is None:
        n = min(count_windows(stream, seq_len, f"split '{split}' of {data_dir}"), batch_size * max_batches)
        if n >= batch_size:
            n -= n % batch_size  # full batches only: the loop averages per batch
        return [_batch(stream, range(i, min(i + batch_size, n)), seq_len, vocab_size)
                for i in range(0, n, batch_size)]
    streams = {s: ds.source_stream(split, s) for s in weights}
    avail = {s: (st.total - 1) // seq_len if st.total > 0 else 0 for s, st in streams.items()}
    total_w = sum(weights.values())
    want = batch_size * max_batches
    quota = {s: want * w / total_w for s, w in weights.items()}
    take = {s: min(avail[s], int(q)) for s, q in quota.items()}
    for s in sorted(quota, key=lambda s: -(quota[s] - int(quota[s]))):
        if sum(take.values()) >= want:
            break
        if take[s] < avail[s]:
            take[s] += 1
    rows, read_from = [], []
    for i in range(max(take.values(), default=0)):
        for s in weights:
            if i < take[s]:
                rows.append(streams[s].read(i * seq_len, seq_len + 1))
                read_from.append((streams[s], i * seq_len))
    n = len(rows)
    if n == 0:
        raise DataError(f"split '{split}' of {data_dir} has no window of seq_len+1 = {seq_len + 1} in any source")
    if n >= batch_size:
        n -= n % batch_size
    stacked = np.stack(rows[:n])
    check_ids(stacked, [st for st, _ in read_from[:n]], [at for _, at in read_from[:n]], vocab_size)
    t = torch.from_numpy(stacked)
    return [(t[i : i + batch_size, :-1].contiguous(), t[i : i + batch_size, 1:].contiguous())
            for i in range(0, n, batch_size)]
