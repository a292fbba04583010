"""Documents -> tokens -> packed shards + index, streamed, in parallel, resumable after a crash.

`prepare(source, out_dir, val_ids, **options)` (options: the fields of `PrepareOptions`, checked before any
work; `phiforge.data.corpora.prepare_corpus` builds the source and options from a PrepareConfig):

    main process                                   worker processes (--workers, default: all cores)
    ------------                                   --------------------------------------------------
    source.units(): files / books / row groups
    source.read(unit) -> raw documents, batched -> decode (UTF-8, cp1252, latin-1), Gutenberg cleaning,
                                                    tokenize (one encode_batch per batch), content hash,
                                                    MinHash signature
    results in submission order <-----------------
    dedup (exact, near), split (val ids / fraction),
    shards + documents.jsonl, report, journal

Memory is bounded whatever the corpus size: the reader is a stream, at most 4 x workers + 2 batches
(`batch_chars` characters each) are in flight, shards and documents.jsonl are written as they fill, and the
index holds only per-shard entries. Results are consumed in submission order and every decision is made in
the main process, so the output is byte-for-byte the same for any number of workers.

Each document is encoded in pieces (split at whitespace after a non-space character, where GPT-2's
pre-tokenizer always has a boundary, so the ids equal those of encoding the whole text at once), and
documents are joined by the EOT token (each document's tokens end with it).

Crash safety and resume. Work happens in a hidden sibling `.NAME.partial/`. After an input unit completes,
at most every `checkpoint_seconds`, the open shard and documents.jsonl are flushed and fsynced and
`journal.json` records the units done, the shards finished (with sha256) and the byte lengths of the open
shard and documents.jsonl; the dedup state and report go to JSON (and a .npy of signatures) beside it, never a
pickle, and every name the journal holds must be a file of the work directory (phiforge.data.journal).
One process at a time: a lock beside OUT (`.NAME.lock`) covers OUT and its work directory for the whole run,
and a second `prepare` of the same OUT is refused at once, naming the holder's pid. SIGTERM or SIGINT stop the
workers and keep the journaled work (one line: rerun to resume). Re-running the same command
continues after the last journaled unit: the open shard and documents.jsonl are cut back to the journaled
lengths (so nothing half-written or duplicated survives) and the result is byte-identical to an
uninterrupted run. A run with different inputs or options refuses to resume (--restart starts over). At the
end index.json is written (last), the journal removed, and the directory swapped in for NAME; an existing
dataset there is replaced only then, and a directory that is not a phiforge dataset is refused.

The code: `_Run` holds one run's state; `_open_work`/`_load` (resume), `_feed`/`_submit`/`_drain_one`
(workers, results in order), `_add` (dedup, split, write), `_checkpoint`, `_finish`/`_check_splits`.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import re
import shutil
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from phiforge import __version__
from phiforge.data.dedup import Deduper, content_hash, minhash_signature
from phiforge.data.gutenberg import CLEANER_VERSION
from phiforge.data.journal import FORMAT as JOURNAL_FORMAT
from phiforge.data.journal import JOURNAL, load_state, read_journal, remove_other_states, save_state
from phiforge.data.output import PrepareInterrupted, Signalled, check_out_dir, dataset_lock, stop_on_signals
from phiforge.data.report import Report
from phiforge.data.shards import DEFAULT_SHARD_TOKENS, INDEX, DatasetWriter, read_index, record_head
from phiforge.data.sources import RawDoc, Skip, Source, clean_raw
from phiforge.data.tasks import DedupLog, Task, fingerprint_sha
from phiforge.errors import DataError
from phiforge.faults import prepare_hooks
from phiforge.fileio import swap_in_dir, write_json_atomic
from phiforge.tokenizer import EOT, eot_id, load_tokenizer, tokenizer_sha256

CHUNK_CHARS = 32_768
BATCH_CHARS = 1 << 18  # characters of text per worker task
BATCH_DOCS = 512
REPORT = "prepare-report.json"
_PARA_CUT = re.compile(r"(?<=\S)(?=\n\n)")  # end of a paragraph
_WORD_CUT = re.compile(r"(?<=\S)(?=[ \n])")  # end of any word

def _last_cut(pattern: re.Pattern, text: str, lo: int, hi: int) -> int | None:
    cut = None
    for m in pattern.finditer(text, lo, min(len(text), hi + 2)):
        if m.start() <= hi:
            cut = m.start()
    return cut if cut is not None and cut > lo else None


def text_chunks(text: str, target_chars: int = CHUNK_CHARS) -> list[str]:
    """Pieces of about target_chars (at most ~target_chars unless a single word is longer) whose separate
    GPT-2 encodings concatenate to the encoding of the whole text.

    Cuts go between a non-space character and a following space or newline (preferring paragraph ends):
    every GPT-2 pre-token there ends at the non-space character, and the next one starts fresh.
    """
    chunks, start, n = [], 0, len(text)
    while n - start > target_chars:
        lo, hi = start + target_chars // 2, start + target_chars
        cut = _last_cut(_PARA_CUT, text, lo, hi) or _last_cut(_WORD_CUT, text, start, hi)
        if cut is None:  # one very long word: cut at the next word end after it
            m = _WORD_CUT.search(text, hi)
            cut = m.start() if m else None
        if cut is None or cut <= start:
            break
        chunks.append(text[start:cut])
        start = cut
    chunks.append(text[start:])
    return chunks


def _encode_many(tok, texts: list[str]) -> list[list[int]]:
    fast = getattr(tok, "encode_batch_fast", None)  # tokenizers >= 0.20: no offsets, faster
    encs = (fast or tok.encode_batch)(texts, add_special_tokens=False)
    return [e.ids for e in encs]


def tokenize_documents(tok, texts: list[str], eot: int, chunk_chars: int = CHUNK_CHARS,
                       dtype=np.int64) -> list[np.ndarray]:
    """Each document's token ids followed by EOT, with one `encode_batch` call for all their pieces.

    A literal "<|endoftext|>" inside a text is encoded as ordinary text, never as the EOT token, so document
    boundaries in the shards come only from here.
    """
    pieces: list[str] = []
    plans: list[list[int]] = []  # per document: piece indices, -1 = the literal "<|endoftext|>" text
    for text in texts:
        plan = []
        parts = text.split(EOT) if EOT in text else [text]
        for i, part in enumerate(parts):
            if i:
                plan.append(-1)
            for c in text_chunks(part, chunk_chars) if part else []:
                plan.append(len(pieces))
                pieces.append(c)
        plans.append(plan)
    encoded = _encode_many(tok, pieces) if pieces else []
    literal = None
    out = []
    for plan in plans:
        if -1 in plan and literal is None:
            literal = [i for p in _encode_many(tok, [EOT[:2], EOT[2:]]) for i in p]
        ids: list[int] = []
        for k in plan:
            ids.extend(literal if k < 0 else encoded[k])
        ids.append(eot)
        out.append(np.asarray(ids, dtype=dtype))
    return out


def tokenize_document(tok, text: str, eot: int, chunk_chars: int = CHUNK_CHARS) -> np.ndarray:
    """A document's token ids followed by EOT, as int64 (see tokenize_documents)."""
    return tokenize_documents(tok, [text], eot, chunk_chars)[0]


# ---------------------------------------------------------------------------------------------- workers

_W: dict = {}


def _worker_init(tok_json: str, eot: int, dtype: str, chunk_chars: int, exact: bool, near: bool,
                 parent: int | None) -> None:
    if parent is not None:  # a worker process: one core each (in-process, leave the caller's settings alone)
        os.environ["RAYON_NUM_THREADS"] = "1"
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
        # the main process handles a signal and stops the workers (SIGTERM); Ctrl-C reaches the whole terminal
        # group, and a worker's KeyboardInterrupt would print a traceback
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    from tokenizers import Tokenizer

    _W.update(tok=Tokenizer.from_str(tok_json), eot=eot, dtype=np.dtype(dtype), chunk=chunk_chars, exact=exact,
              near=near)
    if parent is not None:  # exit if the main process dies (SIGKILL leaves pool workers behind otherwise)
        threading.Thread(target=_watch_parent, args=(parent,), daemon=True).start()


def _watch_parent(pid: int) -> None:
    while True:
        time.sleep(1.0)
        if os.getppid() != pid:
            os._exit(1)


def _work(batch: list[RawDoc]) -> list[tuple]:
    """Decode, clean, tokenize, hash: ("doc", id, title, source, meta, tokens, hash, signature, info, fraction,
    record head) or ("skip", reason, example, chars) per document, in order. The id's hash fraction (for the
    val split) and the documents.jsonl record's JSON are made here too, to spare the main process."""
    out: list = [None] * len(batch)
    texts, todo = [], []
    for i, raw in enumerate(batch):
        c = clean_raw(raw)
        if isinstance(c, Skip):
            out[i] = ("skip", c.reason, c.example, c.chars)
            continue
        text, title, meta, info = c
        meta["bytes"] = len(text.encode("utf-8"))  # for bits per byte in evaluation
        texts.append(text)
        todo.append((i, raw, title, meta, info))
    tokens = tokenize_documents(_W["tok"], texts, _W["eot"], _W["chunk"], _W["dtype"])
    for (i, raw, title, meta, info), text, t in zip(todo, texts, tokens):
        chash = content_hash(text) if _W["exact"] else None
        sig = minhash_signature(text) if _W["near"] else None
        head = record_head({"id": raw.id, "title": title, "source": raw.source, **meta})
        out[i] = ("doc", raw.id, title, raw.source, meta, t, chash, sig, info, _fraction(raw.id), head)
    return out


def _make_pool(workers: int, initargs: tuple):
    """A process pool: forked on Linux when this process runs no other thread (instant start, nothing to
    import), spawned otherwise. The workers get TOKENIZERS_PARALLELISM=false (one core each; it also keeps
    `tokenizers` from warning about a fork after its thread pool was used here)."""
    method = "fork" if sys.platform == "linux" and threading.active_count() == 1 else "spawn"
    saved = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        return multiprocessing.get_context(method).Pool(workers, initializer=_worker_init, initargs=initargs)
    finally:
        if saved is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = saved


class _Done:
    """A finished result, for the in-process path (workers=0)."""

    def __init__(self, value):
        self.value = value

    def get(self):
        return self.value


# ---------------------------------------------------------------------------------------------- options


def _flag(key: str) -> str:
    return f"--{key.replace('_', '-')} ({key})"


def dedup_modes(spec: str) -> tuple[bool, bool]:
    """"exact,near" | "exact" | "near" | "none" -> (exact, near)."""
    modes = {m.strip() for m in str(spec).split(",") if m.strip()} - {"none"}
    unknown = modes - {"exact", "near"}
    if unknown:
        raise DataError(f"--dedup: unknown mode(s) {', '.join(sorted(unknown))} (use exact, near, exact,near or none)")
    return "exact" in modes, "near" in modes


def check_mixture(weights: dict | None) -> None:
    if weights is None:
        return
    if not isinstance(weights, dict) or not all(isinstance(w, (int, float)) and not isinstance(w, bool) and w >= 0
                                                for w in weights.values()):
        raise DataError(f"--weights (weights): each source needs a number >= 0, got {weights!r}")
    if not any(w > 0 for w in weights.values()):
        raise DataError("--weights (weights): at least one source needs a positive weight")


@dataclass
class PrepareOptions:
    """How `prepare` runs; every value is checked when the options are made, before any work.

    Validation: documents whose id is in `val_ids`, or (`val_fraction`) a deterministic fraction of documents by
    a hash of their id; when that leaves the val split empty and at least 2 documents were kept, the document
    with the smallest hash is held out (the run is repeated with it; the report says so). progress: True shows
    the bar, None only on a terminal. workers: processes for decoding/cleaning/tokenizing (None: all cores, 0:
    in this process). dedup: "exact", "near", "exact,near" or "none" (None: the source's default). mixture:
    per-source sampling weights, recorded in the index for the loader for the sources the train split holds
    (renormalised to the same total). summary: called with each line of the short report at the end. task: one
    of N tasks (phiforge.data.tasks): this run prepares only its slice of the units into a part for `data merge`.
    """

    val_ids: list[str] | None = None
    val_method: str = "val-ids"  # how val_ids were chosen, recorded in the index
    val_fraction: float | None = None
    tokenizer_dir: str | Path | None = None
    shard_tokens: int = DEFAULT_SHARD_TOKENS
    workers: int | None = None
    dedup: str | None = None
    near_dup_threshold: float = 0.8
    mixture: dict[str, float] | None = None
    checkpoint_seconds: float = 60.0
    restart: bool = False
    progress: bool | None = None
    summary: Callable[[str], None] | None = None
    on_document: Callable[[dict], None] | None = None
    chunk_chars: int = CHUNK_CHARS
    batch_chars: int = BATCH_CHARS
    task: Task | None = None

    def __post_init__(self):
        if not isinstance(self.shard_tokens, int) or self.shard_tokens < 1:
            raise DataError(f"{_flag('shard_tokens')} must be at least 1, got {self.shard_tokens}")
        if self.workers is not None and (not isinstance(self.workers, int) or self.workers < 0):
            raise DataError(f"{_flag('workers')} must be 0 (in this process) or more, got {self.workers}")
        if not 0 < self.near_dup_threshold <= 1:
            raise DataError(f"{_flag('near_dup_threshold')} is a Jaccard similarity: it must be above 0 and at "
                            f"most 1, got {self.near_dup_threshold}")
        if not self.checkpoint_seconds >= 0:
            raise DataError(f"{_flag('checkpoint_seconds')} must be 0 or more, got {self.checkpoint_seconds}")
        if self.val_ids is None and self.val_fraction is None:
            raise DataError("give validation ids or a validation fraction")
        if self.val_fraction is not None and not 0 < self.val_fraction < 1:
            raise DataError(f"{_flag('val_fraction')} must be between 0 and 1, got {self.val_fraction}")
        if self.dedup is not None:
            dedup_modes(self.dedup)
        check_mixture(self.mixture)
        if self.chunk_chars < 1 or self.batch_chars < 1:
            raise DataError("chunk_chars and batch_chars must be at least 1")


def _fraction(doc_id: str) -> float:
    return int.from_bytes(hashlib.blake2b(doc_id.encode("utf-8"), digest_size=8).digest(), "little") / 2**64


def _tokenizer_info(tokenizer_dir) -> tuple[str, dict]:
    """(tokenizer.json text, the index's "tokenizer" entry)."""
    tok = load_tokenizer(Path(tokenizer_dir) if tokenizer_dir else None)
    if tokenizer_dir and not (Path(tokenizer_dir) / "tokenizer.json").is_file():
        raise DataError(f"no tokenizer.json in --tokenizer-dir {tokenizer_dir}")
    tok_json = tok.to_str()
    return tok_json, {"name": "gpt2-bpe (builtin)" if not tokenizer_dir else str(Path(tokenizer_dir).resolve()),
                      "vocab_size": tok.get_vocab_size(), "eot_id": eot_id(tok),
                      "sha256": tokenizer_sha256(tok), "file": "tokenizer.json"}


def recorded_mixture(weights: dict[str, float] | None, have: dict) -> tuple[dict[str, float] | None, list[str]]:
    """The mixture to record for a train split holding the sources in `have`: the weighted sources it holds,
    renormalised to the total of the weights given (unchanged when it holds them all; None when it holds none),
    and notes for the report on what was left out."""
    if weights is None:
        return None, []
    kept = {k: float(w) for k, w in weights.items() if w > 0 and k in have}
    dropped = [k for k, w in weights.items() if w > 0 and k not in have]
    unweighted = sorted(k for k in have if not weights.get(k))
    if not kept:
        return None, [f"mixture: none of the weighted sources ({', '.join(dropped)}) has training documents; "
                      "no mixture recorded"]
    notes = []
    if dropped:
        scale = sum(float(w) for w in weights.values() if w > 0) / sum(kept.values())
        kept = {k: w * scale for k, w in kept.items()}
        notes.append(f"mixture: {', '.join(dropped)} not in this dataset, left out; the weights of "
                     f"{', '.join(kept)} renormalised to the same total")
    if unweighted:
        verb = "has no weight and is" if len(unweighted) == 1 else "have no weight and are"
        notes.append(f"mixture: {', '.join(unweighted)} {verb} not sampled")
    return kept, notes


class _HoldOutOne(Exception):
    """The val split came out empty under val_fraction: run again holding out this document."""

    def __init__(self, doc_id: str):
        super().__init__(doc_id)
        self.doc_id = doc_id


# ---------------------------------------------------------------------------------------------- prepare


def prepare(source: Source, out_dir: str | Path, val_ids: list[str] | None = None, **options) -> dict:
    """Tokenize a source's documents into a dataset directory; returns the index written.

    `options` are the fields of PrepareOptions (val_fraction, workers, dedup, mixture, summary, ...).
    """
    t0 = time.perf_counter()
    opts = PrepareOptions(val_ids=val_ids, **options)
    check_out_dir(Path(out_dir))
    with dataset_lock(out_dir):
        run = _Run(source, Path(out_dir), opts, t0)
        done = run.completed_part()
        if done is not None:
            return done
        try:
            return run.run()
        except _HoldOutOne as e:
            return _Run(source, Path(out_dir), opts, t0, held_out=e.doc_id).run()


class _Run:
    """One pass of `prepare`: settings, the work directory, the writer, and the results in flight.

    run(): open the work directory (resuming from its journal), feed the units to the workers, handle the
    results in submission order, checkpoint after units, and finish (index, report, swap into place).
    """

    def __init__(self, source: Source, out_dir: Path, opts: PrepareOptions, t0: float, held_out: str | None = None):
        self.source, self.out_dir, self.opts, self.t0 = source, out_dir, opts, t0
        self.exact, self.near = dedup_modes(source.default_dedup if opts.dedup is None else opts.dedup)
        self.tok_json, self.tok_info = _tokenizer_info(opts.tokenizer_dir)
        units = source.units()
        self._check_mixture_sources(units)
        self.task = opts.task
        self.unit_span = self.task.unit_range([u.size for u in units]) if self.task else (0, len(units))
        self.units = units[self.unit_span[0] : self.unit_span[1]]  # this task's (all, without a task)
        self.workers = (os.cpu_count() or 1) if opts.workers is None else opts.workers
        self.prepared = self._describe()
        units_sig = hashlib.sha256("\n".join(f"{u.key}\t{u.size}" for u in units).encode()).hexdigest()
        self.fingerprint = {"prepared": self.prepared, "tokenizer": self.tok_info["sha256"], "units": units_sig,
                            "mixture": opts.mixture, "format": JOURNAL_FORMAT,
                            "task": [self.task.index, self.task.count] if self.task else None}
        self.work = out_dir.parent / f".{out_dir.name}.partial"
        self.journal_path = self.work / JOURNAL
        self.hooks = prepare_hooks(self.work)  # nothing, but for the tests' fault injection
        self.held_out = held_out
        self.val = set(opts.val_ids or ()) | ({held_out} if held_out else set())
        self.pool = self.bar = self.writer = self.dedup_log = None
        self.pending: deque = deque()  # (kind, unit index, future / payload) in input order
        self.in_flight = 0
        # in this process (workers=0) a batch is done when submitted: handle it at once (units journal promptly)
        self.max_in_flight = 4 * self.workers + 2 if self.workers else 0
        self.run_tokens, self.finishing = 0, False

    def _check_mixture_sources(self, units: list) -> None:
        weights = self.opts.mixture
        if weights is None:
            return
        have = {u.source for u in units}
        if not any(w > 0 and k in have for k, w in weights.items()):
            raise DataError(f"--weights: none of the weighted sources ({', '.join(k for k, w in weights.items() if w)}"
                            f") is in the input (it has: {', '.join(sorted(have))})")

    def _describe(self) -> dict:
        """The index's "prepared" entry: what was prepared and how (also the resume fingerprint)."""
        o = self.opts
        val_info = {"method": o.val_method, "ids": list(o.val_ids)} if o.val_ids is not None else \
            {"method": "fraction", "fraction": o.val_fraction}
        dedup_info = {"exact": self.exact, "near": self.near, **(
            {"threshold": o.near_dup_threshold, "shingle_words": 5, "num_perm": 128, "bands": 16} if self.near else {})}
        return {"corpus": self.source.corpus, "source": self.source.name, "inputs": self.source.describe(),
                "val": val_info, "cleaner_version": CLEANER_VERSION, "shard_tokens": o.shard_tokens,
                "chunk_chars": o.chunk_chars, "dedup": dedup_info, "phiforge_version": __version__, "report": REPORT}

    # ------------------------------------------------------------------ the work directory

    def _open_work(self) -> dict | None:
        """Create the work directory, or find the journal of an interrupted run of the same inputs."""
        self.out_dir.parent.mkdir(parents=True, exist_ok=True)
        if self.opts.restart:
            shutil.rmtree(self.work, ignore_errors=True)
        journal = read_journal(self.work)
        if journal is not None and journal.get("fingerprint") != self.fingerprint:
            old = isinstance(journal.get("fingerprint"), dict) and \
                journal["fingerprint"].get("format") != JOURNAL_FORMAT
            raise DataError(f"{self.work} holds an interrupted prepare of "
                            + ("an older phiforge, which this one does not resume; add --restart to start over"
                               if old else "other inputs or options; re-run it with the same arguments to "
                               "resume, or add --restart to start over"))
        if journal is None and self.work.exists():  # died before its first checkpoint: nothing to keep
            shutil.rmtree(self.work)
        self.work.mkdir(exist_ok=True)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(self.work, 0o777 & ~umask)
        return journal

    def _load(self, journal: dict | None) -> None:
        """The writer and the decision state: restored from the journal, or new. A task decides no duplicates
        (the merge does, across parts): it logs each document's hash and signature instead."""
        decide = self.task is None
        self.deduper = Deduper(self.exact and decide, self.near and decide, self.opts.near_dup_threshold)
        log = not decide and (self.exact or self.near)
        if journal is None:
            self.writer = DatasetWriter(self.work, self.tok_info, self.opts.shard_tokens)
            (self.work / "tokenizer.json").write_text(self.tok_json, encoding="utf-8")
            self.dedup_log = DedupLog(self.work, self.exact, self.near) if log else None
            self.report = Report()
            self.val_seen: list[str] = []
            self.candidate: tuple[float, str] | None = None  # the train document with the smallest hash
            self.units_done = 0
            return
        self.report, self.val_seen, self.candidate = load_state(self.work, journal.get("state"), self.deduper)
        try:
            self.units_done = int(journal["units_done"])
            if not 0 <= self.units_done <= len(self.units):
                raise ValueError(f"units_done {self.units_done} of {len(self.units)}")
            self.writer = DatasetWriter.restore(self.work, self.tok_info, self.opts.shard_tokens, journal["writer"])
            self.dedup_log = DedupLog(self.work, self.exact, self.near, journal["dedup_log"]) if log else None
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise DataError(f"cannot resume from {self.journal_path}: {e}; re-run with --restart") from None
        self.held_out = journal.get("held_out")
        if self.held_out:
            self.val.add(str(self.held_out))
        self.report.notes.append(f"resumed after {self.units_done} of {len(self.units)} input unit(s)")

    def _checkpoint(self, done: int) -> None:
        """Flush and journal everything written for the first `done` units."""
        snap = self.writer.snapshot()
        log = self.dedup_log.snapshot() if self.dedup_log is not None else None
        name = save_state(self.work, done, self.report, self.deduper, self.val_seen, self.candidate)
        write_json_atomic(self.journal_path, {"fingerprint": self.fingerprint, "units_done": done,
                                              "units": len(self.units), "writer": snap, "dedup_log": log,
                                              "state": name, "held_out": self.held_out})
        remove_other_states(self.work, name)

    # ------------------------------------------------------------------ the run

    def run(self) -> dict:
        self._load(self._open_work())
        try:
            with stop_on_signals(self):
                self._start()
                self._feed()
                self._stop_workers()
                self.finishing = True
                return self._finish()
        except Signalled as e:
            self._abandon()
            name = signal.Signals(e.signum).name
            kept = (f"the work so far is kept in {self.work}: rerun the same command to resume"
                    if self.work.exists() else "nothing was kept yet: rerun the same command to start again")
            raise PrepareInterrupted(f"interrupted by {name}; {kept}", e.signum) from None
        except BaseException:
            self._abandon()
            raise

    def _start(self) -> None:
        initargs = (self.tok_json, self.tok_info["eot_id"], self.writer.dtype.str, self.opts.chunk_chars,
                    self.exact, self.near)
        if self.workers > 0:
            self.pool = _make_pool(self.workers, initargs + (os.getpid(),))
        else:
            _worker_init(*initargs, None)
        total = sum(u.size for u in self.units)
        progress = self.opts.progress
        self.bar = tqdm(total=total, initial=sum(u.size for u in self.units[:self.units_done]), unit="B",
                        unit_scale=True, desc=f"prepare {self.source.name}", smoothing=0.1,
                        disable=None if progress is None else not progress)
        self.run_t0 = time.perf_counter()
        self.cpu0, self.children_cpu0 = time.process_time(), _children_cpu()
        self.run_bytes = sum(u.size for u in self.units[self.units_done:])
        self.last_ckpt = time.monotonic()

    def _feed(self) -> None:
        """Read the remaining units in order, in batches of about batch_chars characters, and handle every
        result; at most max_in_flight batches are out at any time."""
        for ui in range(self.units_done, len(self.units)):
            batch, chars = [], 0
            for raw in self.source.read(self.units[ui]):
                if isinstance(raw, Skip):
                    self.pending.append(("skip", ui, raw))
                    continue
                batch.append(raw)
                chars += len(raw.text) if raw.text is not None else len(raw.data or b"")
                if chars >= self.opts.batch_chars or len(batch) >= BATCH_DOCS:
                    self._submit(ui, batch)
                    batch, chars = [], 0
            if batch:
                self._submit(ui, batch)
            self.pending.append(("unit", ui, None))
            self._drain(self.max_in_flight)
        self._drain(0)
        while self.pending:  # unit markers and skips after the last batch
            self._drain_one()

    def _submit(self, ui: int, batch: list[RawDoc]) -> None:
        future = self.pool.apply_async(_work, (batch,)) if self.pool is not None else _Done(_work(batch))
        self.pending.append(("batch", ui, future))
        self.in_flight += 1
        self._drain(self.max_in_flight)

    def _drain(self, limit: int) -> None:
        while self.in_flight > limit:
            self._drain_one()
        while self.pending and self.pending[0][0] != "batch":  # skips and unit ends with nothing left before them
            self._drain_one()

    def _drain_one(self) -> None:
        kind, ui, item = self.pending.popleft()
        if kind == "batch":
            self.in_flight -= 1
            for r in item.get():
                if r[0] == "skip":
                    self.report.read["documents"] += 1
                    self.report.skip(r[1], r[2], r[3])
                else:
                    self._add(*r[1:])
            self.hooks.written(ui, self.writer)
        elif kind == "skip":
            self.report.read["documents"] += int(item.document)
            self.report.skip(item.reason, item.example, item.chars)
        else:
            self._unit_done(ui)

    def _add(self, doc_id: str, title: str, src: str, meta: dict, tokens: np.ndarray, chash, sig, info: dict,
             frac: float, head: bytes):
        """One cleaned, tokenized document: dedup, split, write, count."""
        rep = self.report
        rep.read["documents"] += 1
        if "encoding" in info:
            rep.encodings[info["encoding"]] += 1
        if doc_id in self.val:
            self.val_seen.append(doc_id)
        dup = self.deduper.check(doc_id, chash, sig) if self.deduper.enabled else None
        if dup is not None:
            rep.duplicate(dup, doc_id, title, meta.get("chars", 0), doc_id in self.val)
            return
        rep.cleaning["header_chars"] += info.get("header_chars", 0)
        rep.cleaning["footer_chars"] += info.get("footer_chars", 0)
        rep.cleaning["documents_with_markers"] += int(bool(info.get("markers")))
        split = "val" if doc_id in self.val else "train"
        if self.opts.val_fraction is not None:
            if frac < self.opts.val_fraction:
                split = "val"
            elif split == "train" and (self.candidate is None or (frac, doc_id) < self.candidate):
                self.candidate = (frac, doc_id)
        offset = self.writer.add_encoded(split, tokens, src, head)
        if self.dedup_log is not None:
            self.dedup_log.add(chash, sig)
        rep.kept["documents"] += 1
        rep.kept["tokens"] += len(tokens)
        rep.kept["chars"] += meta.get("chars", 0)
        rep.sources[src]["documents"] += 1
        rep.sources[src]["tokens"] += len(tokens)
        self.run_tokens += len(tokens)
        if self.opts.on_document:
            self.opts.on_document({"id": doc_id, "title": title, "source": src, **meta, "split": split,
                                   "tokens": len(tokens), "offset": offset})

    def _unit_done(self, ui: int) -> None:
        """Everything of unit ui is written: count it, and checkpoint when it is time."""
        size = self.units[ui].size
        self.report.read["units"] += 1
        self.report.read["bytes"] += size
        self.bar.update(size)
        dt = max(time.perf_counter() - self.run_t0, 1e-9)
        self.bar.set_postfix_str(f"docs={self.report.kept['documents']:,} tok/s={self.run_tokens / dt:,.0f}",
                                 refresh=False)
        self.hooks.unit_done(ui)
        if time.monotonic() - self.last_ckpt >= self.opts.checkpoint_seconds and ui + 1 < len(self.units):
            self._checkpoint(ui + 1)
            self.last_ckpt = time.monotonic()

    def _stop_workers(self) -> None:
        self.bar.close()
        if self.pool is not None:
            self.pool.close()
            self.pool.join()
            self.pool = None

    def _abandon(self) -> None:
        """After an error: stop the workers; keep a journaled work directory for resume, else remove it."""
        if self.bar is not None:
            self.bar.close()
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()
        if self.dedup_log is not None:
            self.dedup_log.close()
        if self.journal_path.exists() and not self.finishing:
            self.writer.close_files()  # re-running resumes from here
        else:
            if self.writer is not None:
                self.writer.abort()
            shutil.rmtree(self.work, ignore_errors=True)

    # ------------------------------------------------------------------ the end

    def _finish(self) -> dict:
        """Write the index (last of the dataset files) and the report, and swap the directory into place."""
        extra = self._index_extra() if self.task is None else self._task_extra()
        index = self.writer.finish(**extra)
        # what listing the input skipped: the same for every task, so part 0's report holds it
        scan = self.source.scan_report if self.task is None or self.task.index == 0 else Report()
        merged = _merge_reports(scan, self.report)
        rep = merged.to_json()
        rep["timing"] = self._timing()
        write_json_atomic(self.work / REPORT, rep)
        self.journal_path.unlink(missing_ok=True)
        remove_other_states(self.work, None)
        swap_in_dir(self.work, self.out_dir)
        if self.opts.summary is not None:
            for line in merged.summary_lines():
                self.opts.summary(line)
            self.opts.summary(f"report: {self.out_dir / REPORT}")
        return index

    def _index_extra(self) -> dict:
        """Check the splits; the index's "prepared" (with a held-out document) and "mixture" entries."""
        missing = sorted(self.val - set(self.val_seen))
        if missing:
            raise DataError(f"validation id(s) {', '.join(missing)} were not produced by the source")
        self._check_splits()
        prepared = self.prepared
        if self.held_out:
            prepared = {**prepared, "val": {**prepared["val"], "held_out": [self.held_out]}}
            self.report.notes.append(
                f"validation: no document's hash fell under --val-fraction {self.opts.val_fraction} "
                f"({self.report.kept['documents']:,} kept); held out one document ({self.held_out}) so that the "
                "val split is not empty")
        extra = {"prepared": prepared}
        mixture, notes = recorded_mixture(self.opts.mixture, self.writer.writers["train"].sources)
        self.report.notes.extend(notes)
        if mixture is not None:
            extra["mixture"] = {"weights": mixture}
        return extra

    def _task_extra(self) -> dict:
        """A part's "prepared" (as a whole run's) and "task": what `data merge` needs to join the parts. Splits may
        be empty here; the merge checks them, and the validation ids, over all parts."""
        t = self.task
        task = {"index": t.index, "count": t.count, "units": list(self.unit_span),
                "fingerprint": fingerprint_sha(self.fingerprint), "units_sha256": self.fingerprint["units"],
                "weights": self.opts.mixture, "val_ids_seen": sorted(set(self.val_seen)),
                "dedup": self.dedup_log.finish() if self.dedup_log is not None else None}
        return {"prepared": self.prepared, "task": task}

    def _timing(self) -> dict:
        """Wall time and where the CPU time went: the main process (reading, dedup, writing, and handing batches
        to the workers and taking back their results) against the workers (cleaning, tokenizing, hashing)."""
        run_s = max(time.perf_counter() - self.run_t0, 1e-9)
        return {"seconds": round(time.perf_counter() - self.t0, 2), "tokens_this_run": self.run_tokens,
                "tokens_per_second_this_run": round(self.run_tokens / run_s), "workers": self.workers,
                "input_bytes_this_run": self.run_bytes, "run_seconds": round(run_s, 3),
                "main_cpu_seconds": round(time.process_time() - self.cpu0, 3),
                "workers_cpu_seconds": round(_children_cpu() - self.children_cpu0, 3)}

    def completed_part(self) -> dict | None:
        """For a task whose part is already complete with these inputs and options: its index (nothing to do)."""
        if self.task is None or not (self.out_dir / INDEX).is_file():
            return None
        try:
            index = read_index(self.out_dir)
        except DataError:
            return None
        if (index.get("task") or {}).get("fingerprint") != fingerprint_sha(self.fingerprint):
            return None
        if self.opts.summary is not None:
            self.opts.summary(f"{self.out_dir} is complete (task {self.task.index} of {self.task.count}); "
                              "nothing to do")
        return index

    def _check_splits(self) -> None:
        """Both splits need documents. An empty val split under val_fraction holds out one document instead,
        when at least 2 were kept (raises _HoldOutOne: prepare runs again)."""
        w = self.writer.writers
        kept = self.report.kept["documents"]
        what = f"{kept:,} document(s) kept of {self.report.read['documents']:,} read; {_short_removed(self.report)}"
        if w["val"].tokens == 0:
            if self.opts.val_fraction is not None:
                if kept >= 2 and self.candidate is not None and not self.held_out:
                    raise _HoldOutOne(self.candidate[1])
                raise DataError(f"the val split came out empty: {what}; holding out a document needs at least 2")
            raise DataError(f"the val split came out empty: the validation book(s) {', '.join(sorted(self.val))} "
                            f"were removed ({what}); choose others with --val-ids or --val-books")
        if w["train"].tokens == 0:
            hint = "a smaller --val-fraction" if self.opts.val_fraction is not None else "fewer validation books"
            raise DataError(f"the train split came out empty: every kept document is held out for validation "
                            f"({what}); use {hint}")


def _children_cpu() -> float:
    """CPU seconds of this process's child processes that have ended (the workers, once joined)."""
    try:
        import resource
    except ImportError:  # not on Unix
        return 0.0
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def _short_removed(report: Report) -> str:
    items = sorted(report.removed.items(), key=lambda kv: -kv[1]["count"])[:3]
    return "removed " + ", ".join(f"{r['count']} x {k}" for k, r in items) if items else "nothing removed"


def _merge_reports(scan: Report, run: Report) -> Report:
    m = Report()
    for rep in (scan, run):
        m.add_json(rep.to_json())
    return m
