"""The next batches, built on a background thread while the current step runs: the data path of both trainers
(`phiforge train`, `phiforge vision finetune`).

    batches = Prefetcher(loader.next_batch, device, state=loader.state_dict)
    x, y = batches.next()     # on the training thread: the batch on `device`
    batches.state_dict()      # the loader's state after the batches next() returned, not the ones built ahead
    batches.close()           # stops and joins the thread (or use `with Prefetcher(...) as batches:`)

One daemon thread calls `produce()` and puts each batch, with `state()` taken right after it, into a queue of
`depth` batches (so up to depth + 1 are built ahead: one more waits in the thread). On CUDA that thread also
copies the batch into pinned (page-locked) host memory, so next()'s `.to(device, non_blocking=True)` on the
training thread is an asynchronous copy that overlaps the step; on a CPU nothing is pinned or copied.

Exact resume is unchanged: only the thread touches the loader, and state_dict() is the state recorded with the
last batch next() returned, i.e. that of the batches the run consumed. An exception in `produce()` (a corrupt
shard's DataError, say) is raised by the next() that would have returned that batch, with its own traceback;
the thread then ends.
"""

from __future__ import annotations

import queue
import threading
from typing import Callable

import torch

DEPTH = 2
JOIN_TIMEOUT_S = 60.0  # close(): a producer stuck in a read this long is left behind (a daemon: it cannot hold exit)


class _Raised:
    """What the thread queues instead of a batch when produce() raised."""

    def __init__(self, error: BaseException):
        self.error = error


class Prefetcher:
    """Batches of `produce()` built ahead on a daemon thread; see the module docstring.

    produce: returns one batch (a tensor or a tuple/list of tensors) per call. device: where next() puts it;
    pinned first when it is a CUDA device. state: returns the loader's state (called on the thread, right after
    each batch); None when the caller counts consumption itself."""

    def __init__(self, produce: Callable[[], object], device: torch.device | str,
                 state: Callable[[], dict] | None = None, depth: int = DEPTH, name: str = "phiforge-prefetch"):
        if depth < 1:
            raise ValueError(f"prefetch depth must be >= 1, got {depth}")
        self.device = torch.device(device)
        self.pin = self.device.type == "cuda"
        self._produce, self._state_fn = produce, state
        self._state = state() if state is not None else None  # before any batch: the loader's own state
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ the background thread

    def _run(self) -> None:
        try:
            if self.pin:  # pin with this rank's GPU current, or the thread would open a context on GPU 0
                torch.cuda.set_device(self.device)
            while not self._stop.is_set():
                batch = self._produce()
                if self.pin:
                    batch = _map(batch, torch.Tensor.pin_memory)
                if not self._put((batch, self._state_fn() if self._state_fn is not None else None)):
                    return
        except BaseException as e:  # noqa: BLE001 - handed to the training thread, which raises it
            self._put(_Raised(e))

    def _put(self, item) -> bool:
        """Queue item unless closed meanwhile (False)."""
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    # ------------------------------------------------------------------ the training thread

    def next(self):
        """The next batch on `device` (non_blocking copy from pinned memory on CUDA); raises produce()'s error."""
        if self._error is not None:
            raise self._error
        if self._stop.is_set():
            raise RuntimeError("Prefetcher.next() after close()")
        item = self._get()
        if isinstance(item, _Raised):
            self._error = item.error
            self.close()
            raise item.error
        batch, state = item
        if self._state_fn is not None:
            self._state = state
        if self.device.type == "cpu":
            return batch
        return _map(batch, lambda t: t.to(self.device, non_blocking=True))

    def _get(self):
        while True:
            try:
                return self._queue.get(timeout=1.0)
            except queue.Empty:
                if not self._thread.is_alive() and self._queue.empty():
                    raise RuntimeError("the batch prefetch thread ended without a batch or an error") from None

    def state_dict(self) -> dict | None:
        """The loader's state after the batches next() has returned (what a checkpoint must hold)."""
        return self._state

    def close(self) -> None:
        """Stop the thread and join it; the batches built ahead are dropped. Safe to call twice."""
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join(JOIN_TIMEOUT_S)
        try:
            while True:
                self._queue.get_nowait()
        except queue.Empty:
            pass

    def __enter__(self) -> "Prefetcher":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _map(batch, fn):
    if isinstance(batch, torch.Tensor):
        return fn(batch)
    return type(batch)(fn(t) for t in batch)
