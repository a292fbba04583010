"""Failing together: when one rank of a multi-process run fails, every rank stops within seconds, on torchrun
and on ranks started directly from RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT (as `srun` starts them), and the
console shows the failing rank's own message once, printed by rank 0.

    the failing rank      writes its one-line message into the run's rendezvous store (DistEnv.store: torchrun's
                          agent store, or the TCPStore that rank 0 hosts) under the failure key; the first rank
                          to do so wins. A bug's traceback is written to RUN/errors/rank-N.txt first and the
                          message names the file. On GPUs it aborts its NCCL communicators
    every rank            runs a watchdog thread that polls the store every POLL_S seconds on a connection of
                          its own. On another rank's failure it aborts the NCCL communicators (a rank waiting on
                          the GPU for a dead peer is freed), and if the process is still running GRACE_S seconds
                          later, blocked in a call that no error reaches (a gloo collective whose peer has not
                          exited yet, a CUDA wait), rank 0 prints the failing rank's message and the process
                          exits with status 1. A lost store (its host died) ends the rank the same way
    a rank whose run      breaks in a collective or a lost connection reports the first failing rank's message
      breaks after that   (RankFailed) instead of its own consequence; a rank's own user error (the same bad
                          input on every rank) stays its own

The CLI prints a user error (RankFailed is one) on rank 0 only, so the other ranks end quietly with status 1.
Rank 0 of directly started ranks hosts the store, so when it is the one that fails it keeps the store up until
the others have read its message (a few polls at most).

Measured on gloo (FSDP2, 2 ranks): neither ProcessGroup.abort() nor destroy_process_group() on the failing rank
closes its connections while FSDP still holds the group, so a peer blocked in a collective with it waits for
that process to exit, or for its own watchdog. A rank killed outright (kill -9, a lost node) writes nothing:
torchrun stops the others at once, `srun --kill-on-bad-exit=1` does too, otherwise gloo peers fail when its
connections drop and NCCL peers wait parallel.collective_timeout_s.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time

import torch.distributed as dist

from phiforge.errors import PhiforgeError, environment_error, printable
from phiforge.tracebacks import unexpected_summary, write_traceback
from phiforge.train.distributed import DistEnv

FAILURE_KEY = "phiforge/failure"
POLL_S = 0.5  # how often the watchdog looks for a failure
GRACE_S = 3.0  # how long a rank that saw a failure may take to end on its own before it is ended


class RankFailed(PhiforgeError):
    """A rank of a multi-process run failed: the message is that rank's own, after its number."""


class FailTogether:
    """The failure key in the rendezvous store and the watchdog over it, for one rank. Use it as
    `FailTogether(env, collective_timeout_s).start()`; `failed(e)` with the error that ends this rank; `close()`
    at the end. A world of one (or a group this process did not set up) does nothing."""

    def __init__(self, env: DistEnv, timeout_s: float):
        self.env, self.timeout_s = env, timeout_s
        # a group torchrun restarts (--max-restarts) starts with a clean key
        self.key = f"{FAILURE_KEY}/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
        self.enabled = env.world_size > 1 and env.store is not None
        self.closed = threading.Event()
        self.seen: dict | None = None  # another rank's failure, once the watchdog has read it

    def start(self) -> "FailTogether":
        if self.enabled:
            store = self.env.store.clone()  # its own connection: the main thread may be blocked on the other
            threading.Thread(target=self._watch, args=(store,), name="phiforge-fail-together", daemon=True).start()
        return self

    def close(self) -> None:
        self.closed.set()

    def failed(self, e: BaseException) -> BaseException | None:
        """On the main thread, with the error that ends this rank's run: tells the other ranks (or learns that
        another rank failed first) and returns the error to raise instead of `e` (None: `e` itself)."""
        if not self.enabled or isinstance(e, (SystemExit, GeneratorExit)):
            return None
        own = isinstance(e, (PhiforgeError, KeyboardInterrupt))  # not a consequence of another rank's failure
        first = self.seen or self._read(self.env.store)  # the watchdog's record: the store may be gone since
        if first is None or own:
            message, instead = self._describe(e)
            first = self._publish(message)
            if first is not None and first["rank"] == self.env.rank:
                self._abort_nccl()
                self._keep_store_for_peers()
                return instead
        elif self.seen is None:
            self._acknowledge(self.env.store)
        self._abort_nccl()
        return RankFailed(first["message"]) if first is not None and not own else None

    def _describe(self, e: BaseException) -> tuple[str, BaseException | None]:
        """This rank's one-line message, and the error to raise instead of `e`: an unexpected error's traceback
        goes to its file now and the CLI gets the one line (printed by rank 0 only)."""
        rank = self.env.rank
        if isinstance(e, KeyboardInterrupt):
            return f"rank {rank}: interrupted", None
        known = e if isinstance(e, PhiforgeError) else environment_error(e)
        if known is not None:
            return printable(f"rank {rank}: {known}"), None
        path, note = write_traceback(e, sys.argv[1:], rank)
        hint = ""
        if "timed out" in str(e).lower():  # gloo's "Timed out waiting 600000ms for recv operation to complete"
            hint = (f"no answer from the other ranks within parallel.collective_timeout_s={self.timeout_s:g} s (one "
                    "is hung, or slower than that at a save or a load: then raise the key): ")
        message = f"rank {rank}: {hint}{unexpected_summary(e, path, note)}"
        return message, RankFailed(message)

    def _publish(self, message: str) -> dict | None:
        """The failure on record after offering this one (the first rank's wins); None if the store is gone."""
        record = json.dumps({"rank": self.env.rank, "message": message})
        try:
            return json.loads(self.env.store.compare_set(self.key, "", record))
        except Exception:  # the store's host has exited: nobody to tell
            return None

    def _read(self, store) -> dict | None:
        """The failure on record: {"rank", "message"}; rank -1 when the store itself is gone."""
        try:
            return json.loads(store.get(self.key)) if store.check([self.key]) else None
        except Exception:
            where = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
            return {"rank": -1, "message": f"lost the run's rendezvous store at {where}: the process that hosted "
                                           "it (rank 0, or torchrun's agent) has exited; its output says why"}

    def _abort_nccl(self) -> None:
        """ncclCommAbort on every communicator of this rank: returns at once, and frees the kernels waiting on a
        dead peer. (gloo has nothing to abort: its connections close when the process ends, and a peer waiting on
        them is ended by its watchdog.)"""
        abort = getattr(dist.distributed_c10d, "_abort_process_group", None)  # torch's own, still experimental
        if self.env.device.type != "cuda" or abort is None or not dist.is_initialized():
            return
        try:
            abort()
        except Exception:
            pass

    def _acknowledge(self, store) -> None:
        """Tell the failing rank that this one has its message (it may then let the store go)."""
        try:
            store.add(f"{self.key}/seen", 1)
        except Exception:
            pass

    def _keep_store_for_peers(self) -> None:
        """Rank 0 of ranks started directly hosts the store: it stays up until every other rank has read the
        failure (a few polls at most), so that none finds the store gone and reports that instead."""
        if self.env.rank != 0 or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
            return
        deadline = time.monotonic() + 4 * POLL_S
        while time.monotonic() < deadline:
            try:
                if self.env.store.add(f"{self.key}/seen", 0) >= self.env.world_size - 1:
                    return
            except Exception:
                return
            time.sleep(0.05)

    def _watch(self, store) -> None:
        while not self.closed.wait(POLL_S):
            failure = self._read(store)
            if failure is None or failure["rank"] == self.env.rank:
                continue
            self.seen = failure
            self._acknowledge(store)
            self._abort_nccl()
            if self.closed.wait(GRACE_S):  # the main thread ended the run itself
                return
            if self.env.is_main:
                print(f"phiforge: error: {failure['message']}", file=sys.stderr, flush=True)
            os._exit(1)  # blocked where no error reaches: end the process (the checkpoints are atomic)
