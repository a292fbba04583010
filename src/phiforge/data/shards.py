"""Packed token shards: headerless little-endian uint16 (uint32 for vocabularies >= 65536) plus `index.json`.

A dataset directory:

    DIR/index.json          the only entry point; written last (see below)
    DIR/train-00000.bin     a split's documents back to back, each followed by the EOT token
    DIR/train-00001.bin     ... the next shard once one holds `shard_tokens` tokens
    DIR/val-00000.bin
    DIR/tokenizer.json      the tokenizer that made the tokens (optional; needed to decode)

index.json (format "phiforge-tokens", version 2):

    {"format": "phiforge-tokens", "version": 2, "dtype": "uint16",
     "tokenizer": {"name", "vocab_size", "eot_id", ...},
     "splits": {"train": {"shards": [{"file", "tokens", "documents", "sha256", "source"}], "tokens", "documents",
                          "sources": {SOURCE: {"tokens", "documents"}}},
                "val": {...}},
     "documents": {"file": "documents.jsonl", "count": N, "sha256": ...},
     "mixture": {"weights": {SOURCE: weight}},       (optional: written by `prepare redpajama`)
     ...extra keys (provenance) that readers ignore}

    DIR/documents.jsonl     one JSON object per document, in the order written:
                            {"id", "title", "source", ..., "chars", "bytes", "split", "tokens", "offset"}
                            (`prepare` writes "chars" and "bytes": the cleaned text's length in characters
                            and in UTF-8 bytes, the denominator of bits per byte; "tokens" counts the
                            document's tokens including its closing EOT)

Version 1 (still read) kept the per-document records inline as a list under "documents" and had no
per-shard "source"; at corpus scale (10^9 documents) that list does not fit in memory, hence the sidecar.

A split's token stream is its shards concatenated in index order. A document may run over into the next
shard; a shard's "documents" counts the documents that *start* in it. A document's "offset" is where it
starts in its split's stream. Every shard holds documents of one source only ("source"; a new shard is
started when the source changes), so a source's token stream is its shards concatenated, which is what
the loader's per-source mixture samples from. `TokenDataset.iter_document_tokens(split)` gives each document
of a split with its tokens, one at a time. Readers must ignore keys they do not know; an incompatible
change bumps "version", and readers refuse versions newer than theirs.

Writing is crash-safe: each shard is written as NAME.tmp and renamed when complete, and index.json is
written (tmp + rename) only after every shard is in place, so a directory with an index never points at a
half-written shard. `DatasetWriter.snapshot()` / `DatasetWriter.restore()` let `prepare` resume an
interrupted run: the snapshot records the finished shards and how far the open shard and documents.jsonl
had got, and restoring truncates both back to that point.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import numpy as np

from phiforge.errors import DataError
from phiforge.fileio import fsync_dir, plain_name, sha256_file, write_json_atomic

FORMAT = "phiforge-tokens"
VERSION = 2
INDEX = "index.json"
DOCUMENTS = "documents.jsonl"
DTYPES = {"uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}
DEFAULT_SHARD_TOKENS = 100_000_000  # 200 MB of uint16 per shard file


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 for vocabularies below 65536 tokens, else uint32."""
    return DTYPES["uint16"] if vocab_size < 2**16 else DTYPES["uint32"]


def dtype_name(dtype: np.dtype) -> str:
    return {v: k for k, v in DTYPES.items()}[np.dtype(dtype).newbyteorder("<")]


def scan_shard(path: Path, dtype: np.dtype, vocab_size: int) -> tuple[str, tuple[int, int] | None]:
    """(sha256 of the shard file, (position, id) of its first token id >= vocab_size or None), in one read."""
    h, position, bad = hashlib.sha256(), 0, None
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):  # 4 MiB: a whole number of uint16 / uint32 tokens
            h.update(block)
            ids = np.frombuffer(block, dtype=dtype)
            if bad is None and len(ids) and int(ids.max()) >= vocab_size:
                i = int(np.flatnonzero(ids >= vocab_size)[0])
                bad = (position + i, int(ids[i]))
            position += len(ids)
    return h.hexdigest(), bad


class ShardWriter:
    """Appends one split's documents to `{split}-NNNNN.bin`, rolling over to a new shard at `shard_tokens` and
    whenever the documents' source changes (a shard holds one source)."""

    def __init__(self, out_dir: Path, split: str, dtype: np.dtype, shard_tokens: int = DEFAULT_SHARD_TOKENS):
        if shard_tokens < 1:
            raise DataError(f"shard size must be at least 1 token, got {shard_tokens}")
        if not split or not split.replace("_", "").isalnum():
            raise DataError(f"split names are letters, digits and '_': {split!r}")
        self.out_dir, self.split, self.shard_tokens = Path(out_dir), split, shard_tokens
        self.dtype = np.dtype(dtype).newbyteorder("<")
        dtype_name(self.dtype)  # uint16 or uint32 only
        self.shards: list[dict] = []
        self.tokens = self.documents = 0  # totals so far
        self.sources: dict[str, dict] = {}  # source -> {"tokens", "documents"}
        self._file = None
        self._name = ""
        self._hash = hashlib.sha256()
        self._shard_tokens = self._shard_docs = 0
        self._source: str | None = None  # source of the open shard

    def _open(self) -> None:
        self._name = f"{self.split}-{len(self.shards):05d}.bin"
        self._file = open(self.out_dir / (self._name + ".tmp"), "wb")
        self._hash = hashlib.sha256()
        self._shard_tokens = self._shard_docs = 0

    def _close(self) -> None:
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        self._file = None
        os.replace(self.out_dir / (self._name + ".tmp"), self.out_dir / self._name)
        entry = {"file": self._name, "tokens": self._shard_tokens, "documents": self._shard_docs,
                 "sha256": self._hash.hexdigest()}
        if self._source is not None:
            entry["source"] = self._source
        self.shards.append(entry)

    def add(self, tokens, source: str | None = None) -> int:
        """Append one document's tokens (the caller includes its trailing EOT). Returns the document's offset
        in the split's token stream."""
        data = np.asarray(tokens)
        if data.ndim != 1:
            raise ValueError("a document's tokens must be a 1-d array")
        if len(data) and data.dtype != self.dtype and (int(data.min()) < 0
                                                        or int(data.max()) > np.iinfo(self.dtype).max):
            raise DataError(f"token ids out of range for {dtype_name(self.dtype)}: "
                            f"{int(data.min())}..{int(data.max())}")
        data = np.ascontiguousarray(data, dtype=self.dtype)
        offset = self.tokens
        if not len(data):
            return offset
        if self._file is not None and source != self._source:
            self._close()  # one source per shard
        if self._file is None:
            self._open()
        self._source = source
        self._shard_docs += 1
        self.documents += 1
        if source is not None:
            agg = self.sources.setdefault(source, {"tokens": 0, "documents": 0})
            agg["tokens"] += len(data)
            agg["documents"] += 1
        while len(data):
            room = self.shard_tokens - self._shard_tokens
            piece, data = data[:room], data[room:]
            b = piece.tobytes()
            self._file.write(b)
            self._hash.update(b)
            self._shard_tokens += len(piece)
            self.tokens += len(piece)
            if self._shard_tokens >= self.shard_tokens:
                self._close()
                if len(data):
                    self._open()
        return offset

    def finish(self) -> dict:
        """Close the last shard; returns the split's index entry."""
        if self._file is not None:
            self._close()
        entry = {"shards": self.shards, "tokens": self.tokens, "documents": self.documents}
        if self.sources:
            entry["sources"] = {k: dict(v) for k, v in sorted(self.sources.items())}
        return entry

    def abort(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
            (self.out_dir / (self._name + ".tmp")).unlink(missing_ok=True)

    def flush(self) -> None:
        """Hand the open shard's buffered bytes to the OS (no fsync)."""
        if self._file is not None:
            self._file.flush()

    def close_file(self) -> None:
        """Close the open shard's .tmp file, keeping it (for a later resume)."""
        if self._file is not None:
            self._file.close()
            self._file = None

    def snapshot(self) -> dict:
        """Where this writer is, with the open shard flushed to disk (see DatasetWriter.snapshot)."""
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())
        return {"shards": [dict(s) for s in self.shards], "tokens": self.tokens, "documents": self.documents,
                "sources": {k: dict(v) for k, v in self.sources.items()},
                "open": None if self._file is None else {"name": self._name, "tokens": self._shard_tokens,
                                                         "documents": self._shard_docs, "source": self._source}}

    def restore(self, snap: dict) -> None:
        """Continue from a snapshot: finished shards must be in place with their sizes, the open shard's
        .tmp file is cut back to its recorded length and re-hashed."""
        self.abort()
        op = snap.get("open")
        for name in [s.get("file") for s in snap["shards"]] + ([op.get("name")] if op else []):
            if not isinstance(name, str) or not re.fullmatch(rf"{re.escape(self.split)}-\d{{5}}\.bin", name):
                raise DataError(f"cannot resume: the journal names {name!r}, which is not a {self.split} shard of "
                                f"{self.out_dir}; delete that directory or re-run with --restart")
        self.shards = [dict(s) for s in snap["shards"]]
        self.tokens, self.documents = int(snap["tokens"]), int(snap["documents"])
        self.sources = {k: dict(v) for k, v in snap.get("sources", {}).items()}
        for s in self.shards:
            path = self.out_dir / s["file"]
            if not path.is_file() or path.stat().st_size != s["tokens"] * self.dtype.itemsize:
                raise DataError(f"cannot resume: shard {path} is missing or has the wrong size; "
                                "re-run with --restart")
        keep = {op["name"], op["name"] + ".tmp"} if op else set()
        for f in self.out_dir.glob(f"{self.split}-*.bin*"):  # shards begun after the snapshot: written again
            m = re.fullmatch(rf"{re.escape(self.split)}-(\d{{5}})\.bin(\.tmp)?", f.name)
            if m and int(m.group(1)) >= len(self.shards) and f.name not in keep:
                f.unlink()
        if op is None:
            return
        self._name, self._source = op["name"], op["source"]
        self._shard_tokens, self._shard_docs = int(op["tokens"]), int(op["documents"])
        path = self.out_dir / (self._name + ".tmp")
        if not path.exists() and (self.out_dir / self._name).is_file():  # it was completed after the snapshot
            os.replace(self.out_dir / self._name, path)
        size = self._shard_tokens * self.dtype.itemsize
        if not path.is_file() or path.stat().st_size < size:
            raise DataError(f"cannot resume: {path} is shorter than the journal says; re-run with --restart")
        self._file = open(path, "r+b")
        self._file.truncate(size)
        self._hash = hashlib.sha256()
        for block in iter(lambda: self._file.read(1 << 22), b""):
            self._hash.update(block)
        self._file.seek(size)


def record_head(meta: dict) -> bytes:
    """A documents.jsonl record's JSON up to its own fields, which follow: `{"id":...,...` without the closing brace
    (meta holds at least "id")."""
    return json.dumps(meta, ensure_ascii=False, separators=(",", ":")).encode("utf-8")[:-1]


class DatasetWriter:
    """Writes a whole dataset directory: one ShardWriter per split, documents.jsonl, then index.json."""

    def __init__(self, out_dir: Path, tokenizer: dict, shard_tokens: int = DEFAULT_SHARD_TOKENS,
                 splits: tuple[str, ...] = ("train", "val")):
        for key in ("name", "vocab_size", "eot_id"):
            if key not in tokenizer:
                raise ValueError(f"tokenizer info needs {key!r}")
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.tokenizer = dict(tokenizer)
        self.dtype = token_dtype(int(tokenizer["vocab_size"]))
        self.writers = {s: ShardWriter(self.out_dir, s, self.dtype, shard_tokens) for s in splits}
        self.n_documents = 0
        self._docs = open(self.out_dir / DOCUMENTS, "wb")

    def add(self, split: str, tokens, **meta) -> dict:
        """Append a document (tokens end with EOT) to a split; `meta` (id, title, source, ...) goes to
        documents.jsonl. A document's "source" also decides its shard (one source per shard)."""
        offset = self.add_encoded(split, tokens, meta.get("source"), record_head(meta))
        return {**meta, "split": split, "tokens": int(len(tokens)), "offset": offset}

    def add_encoded(self, split: str, tokens, source: str | None, head: bytes) -> int:
        """`add` with the record's fields already encoded (`record_head(meta)`, as `prepare`'s workers do);
        returns the document's offset in its split."""
        if split not in self.writers:
            raise DataError(f"unknown split {split!r} (this dataset has: {', '.join(self.writers)})")
        offset = self.writers[split].add(tokens, source)
        self._docs.write(b'%s,"split":"%s","tokens":%d,"offset":%d}\n' % (head, split.encode(), len(tokens), offset))
        self.n_documents += 1
        return offset

    def finish(self, **extra) -> dict:
        """Close every shard and documents.jsonl, then write index.json (last, atomically). `extra` keys go
        into the index."""
        splits = {s: w.finish() for s, w in self.writers.items()}
        self._docs.flush()
        os.fsync(self._docs.fileno())
        self._docs.close()
        docs = {"file": DOCUMENTS, "count": self.n_documents, "sha256": sha256_file(self.out_dir / DOCUMENTS)}
        index = {"format": FORMAT, "version": VERSION, "dtype": dtype_name(self.dtype),
                 "tokenizer": self.tokenizer, "splits": splits, "documents": docs, **extra}
        fsync_dir(self.out_dir)
        write_json_atomic(self.out_dir / INDEX, index)
        return index

    def abort(self) -> None:
        for w in self.writers.values():
            w.abort()
        if not self._docs.closed:
            self._docs.close()

    def flush(self) -> None:
        """Hand buffered bytes to the OS (no fsync)."""
        for w in self.writers.values():
            w.flush()
        self._docs.flush()

    def close_files(self) -> None:
        """Close every open file, deleting nothing (an interrupted prepare resumes from them)."""
        for w in self.writers.values():
            w.close_file()
        if not self._docs.closed:
            self._docs.close()

    def snapshot(self) -> dict:
        """A JSON-able record of everything written so far (all files flushed and fsynced first)."""
        self._docs.flush()
        os.fsync(self._docs.fileno())
        return {"splits": {s: w.snapshot() for s, w in self.writers.items()},
                "documents": self.n_documents, "documents_bytes": self._docs.tell()}

    @classmethod
    def restore(cls, out_dir: Path, tokenizer: dict, shard_tokens: int, snap: dict,
                splits: tuple[str, ...] = ("train", "val")) -> "DatasetWriter":
        """A writer that continues from `snapshot()`: later output is byte-identical to an uninterrupted run."""
        w = cls.__new__(cls)
        w.out_dir = Path(out_dir)
        w.tokenizer = dict(tokenizer)
        w.dtype = token_dtype(int(tokenizer["vocab_size"]))
        w.writers = {s: ShardWriter(w.out_dir, s, w.dtype, shard_tokens) for s in splits}
        for s, ws in w.writers.items():
            ws.restore(snap["splits"][s])
        w.n_documents = int(snap["documents"])
        path = w.out_dir / DOCUMENTS
        if not path.is_file() or path.stat().st_size < int(snap["documents_bytes"]):
            raise DataError(f"cannot resume: {path} is shorter than the journal says; re-run with --restart")
        w._docs = open(path, "r+b")
        w._docs.truncate(int(snap["documents_bytes"]))
        w._docs.seek(int(snap["documents_bytes"]))
        return w


def _check_index(index, idx_path: Path) -> None:
    """Structure and types of an index; raises DataError naming the file and the first problem."""

    def bad(why: str):
        raise DataError(f"corrupt dataset index {idx_path}: {why}")

    if not isinstance(index, dict) or index.get("format") != FORMAT:
        raise DataError(f"{idx_path} is not a phiforge token dataset index (no \"format\": \"{FORMAT}\")")
    version = index.get("version")
    if not isinstance(version, int):
        bad("no integer 'version'")
    if version > VERSION:
        raise DataError(f"{idx_path} has format version {version}; this phiforge reads up to {VERSION}: upgrade it")
    if index.get("dtype") not in DTYPES:
        bad(f"'dtype' must be one of {', '.join(DTYPES)}, got {index.get('dtype')!r}")
    tok = index.get("tokenizer")
    if not isinstance(tok, dict) or not all(isinstance(tok.get(k), int) for k in ("vocab_size", "eot_id")):
        bad("'tokenizer' needs integer 'vocab_size' and 'eot_id'")
    if not 1 <= tok["vocab_size"] <= 2**32:
        bad(f"'tokenizer.vocab_size' must be from 1 to 2**32 (what uint32 token ids hold), got {tok['vocab_size']}")
    if not 0 <= tok["eot_id"] < tok["vocab_size"]:
        bad(f"'tokenizer.eot_id' must be a token id below vocab_size {tok['vocab_size']}, got {tok['eot_id']}")
    if DTYPES[index["dtype"]].itemsize < token_dtype(tok["vocab_size"]).itemsize:
        bad(f"dtype {index['dtype']} cannot hold a vocabulary of {tok['vocab_size']}")
    splits = index.get("splits")
    if not isinstance(splits, dict) or not splits:
        bad("no 'splits'")
    for name, info in splits.items():
        if not isinstance(info, dict) or not isinstance(info.get("shards"), list):
            bad(f"split {name!r} has no 'shards' list")
        total = 0
        for s in info["shards"]:
            if not (isinstance(s, dict) and isinstance(s.get("file"), str) and isinstance(s.get("tokens"), int)
                    and s["tokens"] >= 0 and isinstance(s.get("sha256"), str)):
                bad(f"split {name!r} has a shard entry without file/tokens/sha256: {s!r:.120}")
            if not plain_name(s["file"]):
                bad(f"shard file names must be plain names in the dataset directory: {s['file']!r}")
            total += s["tokens"]
        if info.get("tokens", total) != total:
            bad(f"split {name!r} says {info.get('tokens')} tokens, its shards add up to {total}")
    docs = index.get("documents", [])
    if version < 2:
        if not isinstance(docs, list):
            bad("'documents' must be a list")
    elif not (isinstance(docs, dict) and plain_name(docs.get("file")) and isinstance(docs.get("count"), int)):
        bad("'documents' must be {\"file\": NAME, \"count\": N, ...}")


class TokenStream:
    """Random access to a split's token stream (its memory-mapped shards, concatenated)."""

    def __init__(self, arrays: list[np.ndarray], files: list[Path] | None = None):
        keep = [i for i, a in enumerate(arrays) if len(a)]
        self.arrays = [arrays[i] for i in keep]
        self.files = [files[i] for i in keep] if files is not None else None  # for messages naming a shard
        self.offsets = np.cumsum([0] + [len(a) for a in self.arrays]).astype(np.int64)
        self.total = int(self.offsets[-1])

    def file_at(self, position: int) -> str:
        """The shard that holds token `position` of the stream (for messages)."""
        i = int(np.searchsorted(self.offsets, position, side="right") - 1)
        return str(self.files[i]) if self.files is not None else f"shard {i} of the stream"

    def __len__(self) -> int:
        return self.total

    def read(self, start: int, length: int) -> np.ndarray:
        """tokens[start : start+length] as int64; the range must lie inside the stream."""
        if start < 0 or length < 0 or start + length > self.total:
            raise IndexError(f"tokens [{start}, {start + length}) outside a stream of {self.total}")
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


class TokenDataset:
    """An opened, checked dataset directory. Shards are memory-mapped on first use."""

    def __init__(self, data_dir: Path, index: dict):
        self.dir = Path(data_dir)
        self.index = index
        self._streams: dict[str, TokenStream] = {}

    def __repr__(self) -> str:
        return f"TokenDataset({str(self.dir)!r}, splits={self.splits()})"

    @property
    def dtype(self) -> np.dtype:
        return DTYPES[self.index["dtype"]]

    @property
    def vocab_size(self) -> int:
        return int(self.index["tokenizer"]["vocab_size"])

    @property
    def eot_id(self) -> int:
        return int(self.index["tokenizer"]["eot_id"])

    @property
    def version(self) -> int:
        return int(self.index["version"])

    @property
    def n_documents(self) -> int:
        docs = self.index.get("documents", [])
        return len(docs) if isinstance(docs, list) else int(docs["count"])

    def iter_documents(self):
        """Per-document records in the order written (version 1: the inline list; 2: documents.jsonl, streamed)."""
        docs = self.index.get("documents", [])
        if isinstance(docs, list):
            yield from docs
            return
        path = self.dir / docs["file"]
        try:
            with open(path, encoding="utf-8") as f:
                for n, line in enumerate(f, 1):
                    try:
                        yield json.loads(line)
                    except ValueError:
                        raise DataError(f"corrupt document record {path}:{n}") from None
        except FileNotFoundError:
            raise DataError(f"{path} listed in {self.dir / INDEX} is missing; re-run `phiforge prepare`") from None

    def iter_document_tokens(self, split: str):
        """(record, tokens) for each document of a split, in stream order: its documents.jsonl record and its
        token ids (int64, ending with EOT), read one document at a time (per-document evaluation: bits per
        byte are the document's summed loss in bits over its record's "bytes")."""
        stream = self.stream(split)
        for doc in self.iter_documents():
            if doc.get("split") != split:
                continue
            try:
                yield doc, stream.read(int(doc["offset"]), int(doc["tokens"]))
            except (KeyError, TypeError, ValueError, IndexError):
                raise DataError(f"document record {doc.get('id')!r} in {self.dir} has no valid offset/tokens "
                                f"within split '{split}' ({stream.total} tokens); re-run `phiforge prepare`") from None

    @property
    def documents(self) -> list[dict]:
        """All per-document records as a list (loads documents.jsonl whole: use iter_documents at scale)."""
        return list(self.iter_documents())

    def sources(self, split: str) -> dict[str, list[dict]]:
        """A split's shards grouped by source, in index order (shards without a source count as "")."""
        out: dict[str, list[dict]] = {}
        for s in self._split(split)["shards"]:
            out.setdefault(s.get("source", ""), []).append(s)
        return out

    def source_tokens(self, split: str) -> dict[str, int]:
        return {src: sum(s["tokens"] for s in shards) for src, shards in self.sources(split).items()}

    def source_stream(self, split: str, source: str) -> "TokenStream":
        """The token stream of one source in a split: its shards, concatenated in index order."""
        shards = self.sources(split).get(source)
        if shards is None:
            raise DataError(f"dataset {self.dir} has no source '{source}' in split '{split}' "
                            f"(it has: {', '.join(self.sources(split))})")
        return self._stream_of(shards)

    def _memmap(self, s: dict) -> np.ndarray:
        return np.memmap(self.dir / s["file"], dtype=self.dtype, mode="r", shape=(s["tokens"],))

    def splits(self) -> list[str]:
        return list(self.index["splits"])

    def _split(self, split: str) -> dict:
        if split not in self.index["splits"]:
            raise DataError(f"dataset {self.dir} has no '{split}' split (it has: {', '.join(self.splits())})")
        return self.index["splits"][split]

    def split_tokens(self, split: str) -> int:
        return int(sum(s["tokens"] for s in self._split(split)["shards"]))

    def split_documents(self, split: str) -> int:
        info = self._split(split)
        return int(info.get("documents", sum(s.get("documents", 0) for s in info["shards"])))

    def arrays(self, split: str) -> list[np.ndarray]:
        """Memory-mapped token arrays of a split's shards, in order (empty shards skipped)."""
        return [self._memmap(s) for s in self._split(split)["shards"] if s["tokens"]]

    def stream(self, split: str) -> TokenStream:
        if split not in self._streams:
            self._streams[split] = self._stream_of(self._split(split)["shards"])
        return self._streams[split]

    def _stream_of(self, shards: list[dict]) -> TokenStream:
        shards = [s for s in shards if s["tokens"]]
        return TokenStream([self._memmap(s) for s in shards], [self.dir / s["file"] for s in shards])

    def tokenizer_sha256(self, allow: bool = False) -> str | None:
        """The identity of the tokenizer that made the tokens (phiforge.tokenizer.tokenizer_identity of
        DIR/tokenizer.json), checked against the sha256 index.json records. A missing file (no tokenizer is
        assumed in its place) or another tokenizer than the recorded one is a DataError, or with `allow` a
        warning and None (unknown)."""
        from phiforge.tokenizer import refuse_tokenizer_mismatch, tokenizer_identity

        found = tokenizer_identity(self.dir)
        recorded = self.index["tokenizer"].get("sha256")
        if found is None:
            problem = f"dataset {self.dir} has no tokenizer.json, so the tokenizer that made its tokens is unknown"
        elif recorded is not None and found != recorded:
            problem = (f"{self.dir / 'tokenizer.json'} is not the tokenizer that made the tokens of {self.dir} (its "
                       f"sha256 is {found[:12]}, {INDEX} records {str(recorded)[:12]})")
        else:
            return found
        refuse_tokenizer_mismatch(problem, "put the tokenizer.json it was prepared with there, or re-run "
                                           "`phiforge prepare`", allow)
        return None

    def verify(self) -> None:
        """Check every shard's sha256 against the index and its token ids against the vocabulary (one pass over
        all shards), documents.jsonl's sha256, and tokenizer.json against the tokenizer sha256 the index records."""
        for split in self.splits():
            for s in self._split(split)["shards"]:
                path = self.dir / s["file"]
                digest, bad = scan_shard(path, self.dtype, self.vocab_size)
                if digest != s["sha256"]:
                    raise DataError(f"checksum mismatch in shard {path}: it changed after it was written; "
                                    "re-run `phiforge prepare`")
                if bad is not None:
                    raise DataError(f"shard {path} holds token id {bad[1]} (token {bad[0]:,} of the shard), at or "
                                    f"above the vocabulary of {self.vocab_size} in {INDEX}: it cannot be trained on; "
                                    "re-run `phiforge prepare`")
        docs = self.index.get("documents")
        if isinstance(docs, dict) and "sha256" in docs:
            path = self.dir / docs["file"]
            if not path.is_file() or sha256_file(path) != docs["sha256"]:
                raise DataError(f"checksum mismatch in {path}: it changed after it was written; "
                                "re-run `phiforge prepare`")
        if "sha256" in self.index["tokenizer"]:
            self.tokenizer_sha256()


def read_index(data_dir: str | Path) -> dict:
    """index.json of a dataset directory, checked; DataError naming the path otherwise."""
    d = Path(data_dir)
    if not d.exists():
        raise DataError(f"data directory not found: {d}")
    if not d.is_dir():
        raise DataError(f"not a directory: {d}")
    idx_path = d / INDEX
    if not idx_path.is_file():
        raise DataError(f"no {INDEX} in {d}; run `phiforge prepare gutenberg --source bundled --out {d}` first")
    try:
        index = json.loads(idx_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"corrupt dataset index {idx_path}: {e}") from None
    except OSError as e:
        raise DataError(f"cannot read {idx_path}: {e}") from None
    _check_index(index, idx_path)
    return index


def open_token_dataset(data_dir: str | Path) -> TokenDataset:
    """Open a dataset directory and check that every shard is present with the size the index says.

    Problems raise DataError with one line naming the path. Checksums are checked by `verify()`.
    """
    d = Path(data_dir)
    index = read_index(d)
    ds = TokenDataset(d, index)
    for split, info in index["splits"].items():
        for s in info["shards"]:
            path = d / s["file"]
            if not path.is_file():
                raise DataError(f"shard {path} listed in {d / INDEX} is missing; re-run `phiforge prepare`")
            expected = s["tokens"] * ds.dtype.itemsize
            size = path.stat().st_size
            if size != expected:
                raise DataError(f"shard {path} has {size} bytes, the index says {s['tokens']} tokens = {expected} "
                                "bytes: truncated or overwritten; re-run `phiforge prepare`")
    docs = index.get("documents")
    if isinstance(docs, dict) and not (d / docs["file"]).is_file():
        raise DataError(f"{d / docs['file']} listed in {d / INDEX} is missing; re-run `phiforge prepare`")
    return ds
