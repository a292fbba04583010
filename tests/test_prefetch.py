"""The data path (issue 23, item 3): batches built ahead on a background thread (phiforge.data.prefetch.Prefetcher),
with exactly the plain loader's batches and resume state, errors carried over with their tracebacks, and no
thread left behind."""

from __future__ import annotations

import threading
import time
import traceback

import numpy as np
import pytest
import torch

from phiforge.data.loader import PackedLoader
from phiforge.data.prefetch import Prefetcher
from phiforge.data.shards import DatasetWriter
from phiforge.errors import DataError

VOCAB, T, B = 300, 16, 4
MIX = {"a": 2.0, "b": 1.0}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Two sources of random tokens, for the plain loader and the mixture loader."""
    out = tmp_path_factory.mktemp("prefetch") / "ds"
    rng = np.random.default_rng(0)
    w = DatasetWriter(out, {"name": "synthetic", "vocab_size": VOCAB, "eot_id": VOCAB - 1})
    for split, docs in (("train", 12), ("val", 2)):
        for d in range(docs):
            w.add(split, np.append(rng.integers(0, VOCAB - 1, 300), VOCAB - 1), id=f"{split}{d}",
                  source="ab"[d % 2])
    w.finish()
    return out


def _prefetcher_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "phiforge-prefetch"]


@pytest.mark.parametrize("mixture", [None, MIX])
def test_prefetched_batches_and_state_equal_the_plain_loaders(data, mixture):
    """Across an epoch boundary: the same batches in the same order, and after k consumed batches the state of
    the plain loader after k (not of the batches built ahead); resuming from it continues identically."""
    plain = PackedLoader(data, "train", T, B, seed=3, mixture=mixture)
    n = plain.batches_per_epoch + 5
    loader = PackedLoader(data, "train", T, B, seed=3, mixture=mixture)
    with Prefetcher(loader.next_batch, "cpu", state=loader.state_dict) as batches:
        assert batches.state_dict() == plain.state_dict()  # before any batch
        for k in range(1, n + 1):
            x, y = batches.next()
            px, py = plain.next_batch()
            assert torch.equal(x, px) and torch.equal(y, py), k
            assert batches.state_dict() == plain.state_dict(), k
            if k == 3:
                saved = batches.state_dict()
                deadline = time.monotonic() + 30
                while loader.state_dict() == saved and time.monotonic() < deadline:
                    time.sleep(0.01)
                assert loader.state_dict() != saved  # the thread has built batches ahead of the consumed ones
        assert mixture is not None or plain.epoch == 1  # the plain loader crossed into its second epoch
    resumed = PackedLoader(data, "train", T, B, seed=3, mixture=mixture)
    resumed.load_state_dict(saved)
    again = PackedLoader(data, "train", T, B, seed=3, mixture=mixture)
    for _ in range(3):
        again.next_batch()
    with Prefetcher(resumed.next_batch, "cpu", state=resumed.state_dict) as batches:
        for k in range(8):
            x, _ = batches.next()
            assert torch.equal(x, again.next_batch()[0]), k


def test_producer_error_reaches_the_consumer_with_its_traceback():
    calls = []

    def produce_third_fails():
        calls.append(1)
        if len(calls) == 3:
            raise DataError("shard s.bin holds token id 999")
        return torch.full((2, 3), len(calls))

    batches = Prefetcher(produce_third_fails, "cpu")
    assert batches.next()[0, 0] == 1 and batches.next()[0, 0] == 2  # the batches before the bad one arrive
    with pytest.raises(DataError, match="holds token id 999") as info:
        batches.next()
    frames = [f.name for f in traceback.extract_tb(info.value.__traceback__)]
    assert "produce_third_fails" in frames  # raised where it happened, not a bare re-raise
    assert not _prefetcher_threads()  # the thread ended
    with pytest.raises(DataError, match="holds token id 999"):
        batches.next()  # and stays failed
    batches.close()


def test_close_joins_the_thread_also_when_blocked_on_a_full_queue():
    before = len(_prefetcher_threads())
    batches = Prefetcher(lambda: torch.zeros(2), "cpu", depth=2)
    assert len(_prefetcher_threads()) == before + 1
    batches.next()
    batches.close()  # the thread is waiting to put into a full queue
    assert len(_prefetcher_threads()) == before
    with pytest.raises(RuntimeError, match="after close"):
        batches.next()
    batches.close()  # twice is fine


def test_cpu_batches_are_not_pinned_and_tuples_keep_their_type():
    with Prefetcher(lambda: (torch.zeros(2), torch.ones(2)), "cpu") as batches:
        got = batches.next()
        assert batches.pin is False and isinstance(got, tuple) and len(got) == 2
        assert not any(t.is_pinned() for t in got)
        assert batches.state_dict() is None  # no state function: the caller counts consumption itself
    with pytest.raises(ValueError, match="depth"):
        Prefetcher(lambda: torch.zeros(1), "cpu", depth=0)
