"""Documents -> tokens -> packed shards + index, streamed, in parallel, resumable after a crash.

`prepare(source, out_dir, ...)`:

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
shard and documents.jsonl; the dedup state and report go to a pickle beside it. Re-running the same command
continues after the last journaled unit: the open shard and documents.jsonl are cut back to the journaled
lengths (so nothing half-written or duplicated survives) and the result is byte-identical to an
uninterrupted run. A run with different inputs or options refuses to resume (--restart starts over). At the
end index.json is written (last), the journal removed, and the directory swapped in for NAME; an existing
dataset there is replaced only then, and a directory that is not a phiforge dataset is refused.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import pickle
import re
import shutil
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path

import numpy as np
from tqdm import tqdm

from phiforge import __version__
from phiforge.data.dedup import Deduper, content_hash, minhash_signature
from phiforge.data.gutenberg import CLEANER_VERSION, clean_book, decode_with_encoding, header_title
from phiforge.data.report import Report
from phiforge.data.shards import DEFAULT_SHARD_TOKENS, DatasetWriter
from phiforge.data.sources import RawDoc, Skip, Source
from phiforge.errors import DataError
from phiforge.fileio import write_json_atomic
from phiforge.tokenizer import EOT, eot_id, load_tokenizer

CHUNK_CHARS = 32_768
BATCH_CHARS = 1 << 18  # characters of text per worker task
BATCH_DOCS = 512
REPORT = "prepare-report.json"
JOURNAL = "journal.json"
_PARA_CUT = re.compile(r"(?<=\S)(?=\n\n)")  # end of a paragraph
_WORD_CUT = re.compile(r"(?<=\S)(?=[ \n])")  # end of any word
_DATASET_FILE = re.compile(r"^(index\.json|tokenizer\.json|documents\.jsonl|prepare-report\.json|"
                           r"[A-Za-z0-9_]+-\d{5}\.bin)(\.tmp)?$")


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


def _check_out_dir(out_dir: Path) -> None:
    """Refuse an output path that holds anything but a phiforge dataset (fileio's rule for every output)."""
    from phiforge.errors import PhiforgeError
    from phiforge.fileio import MARKER, claim_output_dir

    try:
        claim_output_dir(out_dir, "dataset", overwrite_hint="choose another --out (or empty it yourself)")
    except PhiforgeError as e:
        raise DataError(str(e)) from None
    if not out_dir.is_dir():
        return
    foreign = sorted(p.name for p in out_dir.iterdir() if not _DATASET_FILE.match(p.name) and p.name != MARKER)
    if foreign:
        raise DataError(f"{out_dir} is a phiforge dataset but also holds other files ({', '.join(foreign[:5])}); "
                        "move them or choose another --out")


def _swap_in(tmp: Path, out_dir: Path) -> None:
    if out_dir.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
        old.rmdir()
        out_dir.rename(old)
        try:
            tmp.rename(out_dir)
        except OSError:
            old.rename(out_dir)  # put the previous dataset back
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(out_dir)


# ---------------------------------------------------------------------------------------------- workers

_W: dict = {}


def _worker_init(tok_json: str, eot: int, dtype: str, chunk_chars: int, exact: bool, near: bool,
                 parent: int | None) -> None:
    if parent is not None:  # a worker process: one core each (in-process, leave the caller's settings alone)
        os.environ["RAYON_NUM_THREADS"] = "1"
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
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
    """Decode, clean, tokenize, hash: ("doc", id, title, source, meta, tokens, hash, signature, info) or
    ("skip", reason, example, chars) per document, in order."""
    out: list = [None] * len(batch)
    texts, todo = [], []
    for i, raw in enumerate(batch):
        info: dict = {}
        title, meta = raw.title, dict(raw.meta)
        text = raw.text
        if text is None:
            try:
                text, enc = decode_with_encoding(raw.data, raw.origin)
            except DataError as e:
                reason = "empty file" if str(e).startswith("empty") else "binary file"
                out[i] = ("skip", reason, raw.origin, len(raw.data or b""))
                continue
            if enc != "utf-8":
                info["encoding"] = enc
        if meta.pop("title_from_header", False):
            title = header_title(text) or title
        if raw.clean == "gutenberg":
            c = clean_book(text)
            info.update(header_chars=c.header_chars, footer_chars=c.footer_chars, markers=c.had_markers)
            meta.update(removed_header_chars=c.header_chars, removed_footer_chars=c.footer_chars)
            text = c.text
        if not text.strip():
            out[i] = ("skip", "empty after cleaning", raw.origin, 0)
            continue
        meta["chars"] = len(text)
        texts.append(text)
        todo.append((i, raw, title, meta, info))
    tokens = tokenize_documents(_W["tok"], texts, _W["eot"], _W["chunk"], _W["dtype"])
    for (i, raw, title, meta, info), text, t in zip(todo, texts, tokens):
        chash = content_hash(text) if _W["exact"] else None
        sig = minhash_signature(text) if _W["near"] else None
        out[i] = ("doc", raw.id, title, raw.source, meta, t, chash, sig, info)
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
    """A finished result, for the in-process path (workers=0) and for markers in the queue."""

    def __init__(self, value):
        self.value = value

    def get(self):
        return self.value


# ---------------------------------------------------------------------------------------------- faults


class _Fault:
    """PHIFORGE_PREPARE_FAULT (tests): "hang@K" = once the first results of unit K are written (past the last
    checkpoint) and flushed to the files, write WORK/fault-hang and sleep forever (a test then SIGKILLs the process); "sleep=S" = sleep
    S seconds after each unit."""

    def __init__(self, spec: str):
        self.hang, self.sleep = None, 0.0
        for item in filter(None, (x.strip() for x in spec.split(","))):
            if item.startswith("hang@"):
                self.hang = int(item[5:])
            elif item.startswith("sleep="):
                self.sleep = float(item[6:])
            else:
                raise DataError(f"PHIFORGE_PREPARE_FAULT: cannot parse {item!r}")

    def written(self, unit: int, work: Path, writer: DatasetWriter) -> None:
        if self.hang is not None and unit == self.hang:
            writer.flush()  # what was written past the checkpoint reaches the files, as a crash may leave it
            (work / "fault-hang").write_text(str(os.getpid()))
            while True:
                time.sleep(1)


# ---------------------------------------------------------------------------------------------- prepare


def _fraction(doc_id: str) -> float:
    return int.from_bytes(hashlib.blake2b(doc_id.encode("utf-8"), digest_size=8).digest(), "little") / 2**64


def _dedup_modes(dedup: str | None, source: Source) -> tuple[bool, bool]:
    spec = source.default_dedup if dedup is None else dedup
    modes = {m.strip() for m in spec.split(",") if m.strip()} - {"none"}
    unknown = modes - {"exact", "near"}
    if unknown:
        raise DataError(f"--dedup: unknown mode(s) {', '.join(sorted(unknown))} (use exact, near, exact,near or none)")
    return "exact" in modes, "near" in modes


def prepare(source: Source, out_dir: str | Path, val_ids: list[str] | None = None, *, val_method: str = "val-ids",
            val_fraction: float | None = None, tokenizer_dir: str | Path | None = None,
            shard_tokens: int = DEFAULT_SHARD_TOKENS, chunk_chars: int = CHUNK_CHARS, progress: bool | None = None,
            on_document: Callable[[dict], None] | None = None, workers: int | None = None,
            dedup: str | None = None, near_threshold: float = 0.8, mixture: dict[str, float] | None = None,
            batch_chars: int = BATCH_CHARS, checkpoint_seconds: float = 60.0, restart: bool = False,
            summary: Callable[[str], None] | None = None) -> dict:
    """Tokenize a source's documents into a dataset directory; returns the index written.

    Validation: documents whose id is in `val_ids`, or (`val_fraction`) a deterministic fraction of documents
    by a hash of their id. progress: True shows the bar, None only on a terminal. workers: processes for
    decoding/cleaning/tokenizing (None: all cores, 0: in this process). dedup: "exact", "near", "exact,near"
    or "none" (None: the source's default). mixture: per-source sampling weights recorded in the index for the
    loader. summary: called with each line of the short report at the end.
    """
    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    if shard_tokens < 1:
        raise DataError(f"--shard-tokens must be at least 1, got {shard_tokens}")
    if val_ids is None and val_fraction is None:
        raise DataError("give validation ids or a validation fraction")
    if val_fraction is not None and not 0 < val_fraction < 1:
        raise DataError(f"--val-fraction must be between 0 and 1, got {val_fraction}")
    exact, near = _dedup_modes(dedup, source)
    _check_out_dir(out_dir)
    tok = load_tokenizer(Path(tokenizer_dir) if tokenizer_dir else None)
    if tokenizer_dir and not (Path(tokenizer_dir) / "tokenizer.json").is_file():
        raise DataError(f"no tokenizer.json in --tokenizer-dir {tokenizer_dir}")
    tok_json = tok.to_str()
    tok_info = {"name": "gpt2-bpe (builtin)" if not tokenizer_dir else str(Path(tokenizer_dir).resolve()),
                "vocab_size": tok.get_vocab_size(), "eot_id": eot_id(tok),
                "sha256": hashlib.sha256(tok_json.encode()).hexdigest(), "file": "tokenizer.json"}
    val = set(val_ids or ())
    units = source.units()
    if workers is None:
        workers = os.cpu_count() or 1
    val_info = {"method": val_method, "ids": list(val_ids)} if val_ids is not None else \
        {"method": "fraction", "fraction": val_fraction}
    dedup_info = {"exact": exact, "near": near, **({"threshold": near_threshold, "shingle_words": 5,
                                                     "num_perm": 128, "bands": 16} if near else {})}
    prepared = {"corpus": source.corpus, "source": source.name, "inputs": source.describe(), "val": val_info,
                "cleaner_version": CLEANER_VERSION, "shard_tokens": shard_tokens, "chunk_chars": chunk_chars,
                "dedup": dedup_info, "phiforge_version": __version__, "report": REPORT}
    units_sig = hashlib.sha256("\n".join(f"{u.key}\t{u.size}" for u in units).encode()).hexdigest()
    fingerprint = {"prepared": prepared, "tokenizer": tok_info["sha256"], "units": units_sig, "mixture": mixture,
                   "format": 2}

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    work = out_dir.parent / f".{out_dir.name}.partial"
    journal_path = work / JOURNAL
    journal = None
    if restart:
        shutil.rmtree(work, ignore_errors=True)
    if journal_path.is_file():
        try:
            journal = json.loads(journal_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            journal = None
        if journal is not None and journal.get("fingerprint") != fingerprint:
            raise DataError(f"{work} holds an interrupted prepare of other inputs or options; re-run it with the "
                            "same arguments to resume, or add --restart to start over")
    if journal is None and work.exists():  # died before its first checkpoint: nothing to keep
        shutil.rmtree(work)
    work.mkdir(exist_ok=True)
    (work / "fault-hang").unlink(missing_ok=True)  # left by a PHIFORGE_PREPARE_FAULT test run
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(work, 0o777 & ~umask)

    if journal is not None:
        writer = DatasetWriter.restore(work, tok_info, shard_tokens, journal["writer"])
        with open(work / journal["state"], "rb") as f:
            state = pickle.load(f)
        report, deduper, val_seen = state["report"], state["deduper"], state["val_seen"]
        units_done = int(journal["units_done"])
        report.notes.append(f"resumed after {units_done} of {len(units)} input unit(s)")
    else:
        writer = DatasetWriter(work, tok_info, shard_tokens)
        (work / "tokenizer.json").write_text(tok_json, encoding="utf-8")
        report, deduper, val_seen, units_done = Report(), Deduper(exact, near, near_threshold), [], 0
    fault = _Fault(os.environ.get("PHIFORGE_PREPARE_FAULT", ""))
    dtype = writer.dtype.str
    pool = None
    if workers > 0:
        try:
            pool = _make_pool(workers, (tok_json, tok_info["eot_id"], dtype, chunk_chars, exact, near, os.getpid()))
        except BaseException:
            writer.close_files()
            raise
    bar = tqdm(total=sum(u.size for u in units), initial=sum(u.size for u in units[:units_done]), unit="B",
               unit_scale=True, desc=f"prepare {source.name}", disable=None if progress is None else not progress,
               smoothing=0.1)
    run_tokens, run_t0 = 0, time.perf_counter()
    finishing = False
    last_ckpt = time.monotonic()

    def checkpoint(done: int) -> None:
        snap = writer.snapshot()
        name = f"state-{done:09d}.pkl"
        tmp = work / (name + ".tmp")
        with open(tmp, "wb") as f:
            pickle.dump({"report": report, "deduper": deduper, "val_seen": val_seen}, f, protocol=4)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, work / name)
        write_json_atomic(journal_path, {"fingerprint": fingerprint, "units_done": done, "units": len(units),
                                         "writer": snap, "state": name})
        for old in work.glob("state-*.pkl"):
            if old.name != name:
                old.unlink()

    def handle(result: list, unit_index: int) -> None:
        nonlocal run_tokens
        for r in result:
            if r[0] == "skip":
                report.skip(r[1], r[2], r[3])
                continue
            _, doc_id, title, src, meta, tokens, chash, sig, info = r
            report.read["documents"] += 1
            if "encoding" in info:
                report.encodings[info["encoding"]] += 1
            if doc_id in val:
                val_seen.append(doc_id)
            dup = deduper.check(doc_id, chash, sig) if deduper.enabled else None
            if dup is not None:
                reason, kept, sim = dup
                report.skip(reason, f"{doc_id} ({title[:50]}) ~ {kept}" + (f" (similarity {sim})"
                                                                             if reason.startswith("near") else ""),
                            meta.get("chars", 0))
                if doc_id in val:
                    report.notes.append(f"validation document {doc_id} was removed as a {reason} of {kept}")
                continue
            report.cleaning["header_chars"] += info.get("header_chars", 0)
            report.cleaning["footer_chars"] += info.get("footer_chars", 0)
            report.cleaning["documents_with_markers"] += int(bool(info.get("markers")))
            if val_fraction is not None:
                split = "val" if _fraction(doc_id) < val_fraction else "train"
            else:
                split = "val" if doc_id in val else "train"
            entry = writer.add(split, tokens, id=doc_id, title=title, source=src, **meta)
            report.kept["documents"] += 1
            report.kept["tokens"] += len(tokens)
            report.kept["chars"] += meta.get("chars", 0)
            report.sources[src]["documents"] += 1
            report.sources[src]["tokens"] += len(tokens)
            run_tokens += len(tokens)
            if on_document:
                on_document(entry)
        fault.written(unit_index, work, writer)

    try:
        if pool is None:
            _worker_init(tok_json, tok_info["eot_id"], dtype, chunk_chars, exact, near, None)

        def submit(batch):
            return pool.apply_async(_work, (batch,)) if pool is not None else _Done(_work(batch))

        pending: deque = deque()  # (kind, unit index, future / payload) in input order
        in_flight = 0
        max_in_flight = 4 * max(workers, 1) + 2

        def drain_one() -> None:
            nonlocal in_flight, last_ckpt
            kind, ui, item = pending.popleft()
            if kind == "batch":
                in_flight -= 1
                handle(item.get(), ui)
            elif kind == "skip":
                report.skip(item.reason, item.example, item.chars)
            else:  # unit finished: everything before it is written
                report.read["units"] += 1
                report.read["bytes"] += units[ui].size
                bar.update(units[ui].size)
                dt = max(time.perf_counter() - run_t0, 1e-9)
                bar.set_postfix_str(f"docs={report.kept['documents']:,} tok/s={run_tokens / dt:,.0f}", refresh=False)
                if fault.sleep:
                    time.sleep(fault.sleep)
                if time.monotonic() - last_ckpt >= checkpoint_seconds and ui + 1 < len(units):
                    checkpoint(ui + 1)
                    last_ckpt = time.monotonic()

        for ui in range(units_done, len(units)):
            unit = units[ui]
            batch, chars = [], 0
            for raw in source.read(unit):
                if isinstance(raw, Skip):
                    pending.append(("skip", ui, raw))
                    continue
                batch.append(raw)
                chars += len(raw.text) if raw.text is not None else len(raw.data or b"")
                if chars >= batch_chars or len(batch) >= BATCH_DOCS:
                    pending.append(("batch", ui, submit(batch)))
                    in_flight += 1
                    batch, chars = [], 0
                    while in_flight > max_in_flight:
                        drain_one()
            if batch:
                pending.append(("batch", ui, submit(batch)))
                in_flight += 1
            pending.append(("unit", ui, None))
            while in_flight > max_in_flight:
                drain_one()
        while pending:
            drain_one()
        bar.close()
        if pool is not None:
            pool.close()
            pool.join()
            pool = None

        finishing = True
        missing = sorted(val - set(val_seen))
        if missing:
            raise DataError(f"validation id(s) {', '.join(missing)} were not produced by the source")
        extra = {"prepared": prepared}
        if mixture is not None:
            extra["mixture"] = {"weights": dict(mixture)}
        index = writer.finish(**extra)
        for split, info in index["splits"].items():
            if info["tokens"] == 0:
                hint = "--val-fraction" if val_fraction is not None else "--val-books/--val-ids"
                raise DataError(f"the {split} split came out empty; check {hint} and the report "
                                f"({_short_removed(report)})")
        merged = _merge_reports(source.scan_report, report)
        seconds = time.perf_counter() - t0
        rep = merged.to_json()
        rep["timing"] = {"seconds": round(seconds, 2), "tokens_this_run": run_tokens,
                         "tokens_per_second_this_run": round(run_tokens / max(time.perf_counter() - run_t0, 1e-9)),
                         "workers": workers}
        write_json_atomic(work / REPORT, rep)
        journal_path.unlink(missing_ok=True)
        for old in work.glob("state-*.pkl"):
            old.unlink()
        _swap_in(work, out_dir)
        if summary is not None:
            for line in merged.summary_lines():
                summary(line)
            summary(f"report: {out_dir / REPORT}")
    except BaseException:
        bar.close()
        if pool is not None:
            pool.terminate()
            pool.join()
        if journal_path.exists() and not finishing:
            writer.close_files()  # keep the work dir and its journal: re-running resumes from there
        else:
            writer.abort()
            shutil.rmtree(work, ignore_errors=True)
        raise
    return index


def _short_removed(report: Report) -> str:
    items = sorted(report.removed.items(), key=lambda kv: -kv[1]["count"])[:3]
    return ", ".join(f"{r['count']} x {k}" for k, r in items) or "nothing removed"


def _merge_reports(scan: Report, run: Report) -> Report:
    m = Report()
    for rep in (scan, run):
        for reason, r in rep.removed.items():
            for ex in r["examples"]:
                m.skip(reason, ex, 0, 0)
            m.removed[reason]["count"] += r["count"]
            m.removed[reason]["chars"] += r["chars"]
        m.read.update(rep.read)
        m.kept.update(rep.kept)
        m.cleaning.update(rep.cleaning)
        m.encodings.update(rep.encodings)
        for k, v in rep.sources.items():
            m.sources[k].update(v)
        m.notes.extend(rep.notes)
    return m
