"""Documents -> tokens -> packed shards + index, with whole documents held out for validation.

`prepare(source, out_dir, ...)` streams: one document at a time is tokenized and appended to its split's
shards, so memory does not grow with the corpus (only the per-document list in the index does). Each
document is encoded in pieces with `encode_batch` (split at whitespace after a non-space character, where
GPT-2's pre-tokenizer always has a boundary, so the ids equal those of encoding the whole text at once).

The output directory is built as a hidden temporary sibling and swapped in at the end, so an existing
dataset is either fully replaced or left untouched; a directory that is not a phiforge dataset is refused.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from tqdm import tqdm

from phiforge import __version__
from phiforge.data.gutenberg import CLEANER_VERSION
from phiforge.data.shards import DEFAULT_SHARD_TOKENS, FORMAT, INDEX, DatasetWriter
from phiforge.data.sources import Document, Source
from phiforge.errors import DataError
from phiforge.tokenizer import EOT, eot_id, load_tokenizer

CHUNK_CHARS = 32_768
_PARA_CUT = re.compile(r"(?<=\S)(?=\n\n)")  # end of a paragraph
_WORD_CUT = re.compile(r"(?<=\S)(?=[ \n])")  # end of any word
_DATASET_FILE = re.compile(r"^(index\.json|tokenizer\.json|[A-Za-z0-9_]+-\d{5}\.bin)(\.tmp)?$|^index\.json\.tmp$")


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


def tokenize_document(tok, text: str, eot: int, chunk_chars: int = CHUNK_CHARS) -> np.ndarray:
    """A document's token ids followed by EOT, as int64.

    A literal "<|endoftext|>" inside the text is encoded as ordinary text, never as the EOT token, so
    document boundaries in the shards come only from here.
    """
    parts = text.split(EOT)
    pieces, owner = [], []
    for i, part in enumerate(parts):
        for c in text_chunks(part, chunk_chars) if part else []:
            pieces.append(c)
            owner.append(i)
    encoded = _encode_many(tok, pieces) if pieces else []
    literal = [i for p in _encode_many(tok, [EOT[:2], EOT[2:]]) for i in p] if len(parts) > 1 else []
    ids: list[int] = []
    k = 0
    for i in range(len(parts)):
        if i:
            ids.extend(literal)
        while k < len(pieces) and owner[k] == i:
            ids.extend(encoded[k])
            k += 1
    ids.append(eot)
    return np.asarray(ids, dtype=np.int64)


def _check_out_dir(out_dir: Path) -> None:
    """Refuse an output path that holds anything but a phiforge dataset."""
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise DataError(f"--out {out_dir} is a file, not a directory")
    entries = [p.name for p in out_dir.iterdir()]
    if not entries:
        return
    try:
        index = json.loads((out_dir / INDEX).read_text(encoding="utf-8"))
        ours = isinstance(index, dict) and index.get("format") == FORMAT
    except (OSError, ValueError):
        ours = False
    if not ours:
        raise DataError(f"{out_dir} is not empty and is not a phiforge dataset; choose another --out "
                        "(or empty it yourself)")
    foreign = sorted(e for e in entries if not _DATASET_FILE.match(e))
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


def prepare(source: Source, out_dir: str | Path, val_ids: list[str], *, val_method: str = "val-ids",
            tokenizer_dir: str | Path | None = None, shard_tokens: int = DEFAULT_SHARD_TOKENS,
            chunk_chars: int = CHUNK_CHARS, progress: bool | None = None,
            on_document: Callable[[dict], None] | None = None) -> dict:
    """Tokenize a source's documents into a dataset directory; returns the index written.

    progress: True shows a tqdm bar over documents, None shows it only on a terminal.
    """
    out_dir = Path(out_dir)
    if shard_tokens < 1:
        raise DataError(f"--shard-tokens must be at least 1, got {shard_tokens}")
    _check_out_dir(out_dir)
    tok = load_tokenizer(Path(tokenizer_dir) if tokenizer_dir else None)
    if tokenizer_dir and not (Path(tokenizer_dir) / "tokenizer.json").is_file():
        raise DataError(f"no tokenizer.json in --tokenizer-dir {tokenizer_dir}")
    tok_json = tok.to_str()
    tok_info = {"name": "gpt2-bpe (builtin)" if not tokenizer_dir else str(Path(tokenizer_dir).resolve()),
                "vocab_size": tok.get_vocab_size(), "eot_id": eot_id(tok),
                "sha256": hashlib.sha256(tok_json.encode()).hexdigest(), "file": "tokenizer.json"}
    val = set(val_ids)
    ids = source.ids()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the dataset gets the usual permissions
    writer = DatasetWriter(tmp, tok_info, shard_tokens)
    t0 = time.perf_counter()
    try:
        (tmp / "tokenizer.json").write_text(tok_json, encoding="utf-8")
        seen = []
        bar = tqdm(source.documents(), total=len(ids), desc="prepare", unit="book",
                   disable=None if progress is None else not progress)
        for doc in bar:
            doc: Document
            bar.set_postfix_str(doc.title[:30], refresh=False)
            tokens = tokenize_document(tok, doc.text, tok_info["eot_id"], chunk_chars)
            entry = writer.add("val" if doc.id in val else "train", tokens, id=doc.id, title=doc.title,
                               source=doc.source, **doc.meta)
            seen.append(doc.id)
            if on_document:
                on_document(entry)
        bar.close()
        missing = val - set(seen)
        if missing:
            raise DataError(f"validation id(s) {', '.join(sorted(missing))} were not produced by the source")
        index = writer.finish(prepared={
            "corpus": source.corpus, "source": source.name, "val": {"method": val_method, "ids": list(val_ids)},
            "cleaner_version": CLEANER_VERSION, "shard_tokens": shard_tokens, "phiforge_version": __version__,
            "seconds": round(time.perf_counter() - t0, 2)})
        for split, info in index["splits"].items():
            if info["tokens"] == 0:
                raise DataError(f"the {split} split came out empty; check --val-books/--val-ids")
        _swap_in(tmp, out_dir)
    except BaseException:
        writer.abort()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return index
