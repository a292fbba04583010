"""Documents -> cleaned text -> tokens -> packed shards + index, with whole books held out for validation."""

from __future__ import annotations

import csv
import re
import shutil
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from phiforge.data.gutenberg import clean_book, read_text_file
from phiforge.data.shards import FORMAT, INDEX, VERSION, ShardWriter, token_dtype, write_index
from phiforge.errors import DataError
from phiforge.tokenizer import eot_id, load_tokenizer

BUNDLED_DIR = Path(__file__).resolve().parent.parent / "assets" / "gutenberg"
DEFAULT_VAL_IDS = ("105",)  # Persuasion: a mid-sized Austen novel
# Split only after a blank line followed by a non-space character: GPT-2's pre-tokenizer yields the same
# pieces there whether or not the text is split, so chunked encoding equals whole-text encoding.
_CHUNK_BOUNDARY = re.compile(r"(?<=\n\n)(?=\S)")


@dataclass
class Document:
    id: str
    title: str
    source: str
    text: str
    removed_header: int = 0
    removed_footer: int = 0


def bundled_books() -> Iterator[Document]:
    """The sample corpus shipped in the package (see assets/gutenberg/MANIFEST.tsv)."""
    with open(BUNDLED_DIR / "MANIFEST.tsv", encoding="utf-8") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    for row in rows:
        clean = clean_book(read_text_file(BUNDLED_DIR / row["file"]))
        yield Document(id=row["pg_ebook"], title=row["title"], source="gutenberg", text=clean.text,
                       removed_header=clean.header_chars, removed_footer=clean.footer_chars)


SOURCES = {"bundled": bundled_books}


def text_chunks(text: str, target_chars: int = 200_000) -> list[str]:
    pieces = _CHUNK_BOUNDARY.split(text)
    chunks, cur, size = [], [], 0
    for p in pieces:
        cur.append(p)
        size += len(p)
        if size >= target_chars:
            chunks.append("".join(cur))
            cur, size = [], 0
    if cur:
        chunks.append("".join(cur))
    return chunks


def tokenize_document(tok, text: str, eot: int) -> np.ndarray:
    encodings = tok.encode_batch(text_chunks(text))
    ids = [i for e in encodings for i in e.ids]
    ids.append(eot)
    return np.asarray(ids, dtype=np.int64)


def prepare(docs: Iterable[Document], out_dir: Path, val_ids: Iterable[str] = DEFAULT_VAL_IDS,
            tokenizer_dir: Path | None = None, shard_tokens: int = 50_000_000, total: int | None = None) -> dict:
    """Write a dataset directory. Builds OUT.tmp and swaps it in, so an existing dataset is never half-replaced."""
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not (out_dir / INDEX).exists():
        raise DataError(f"{out_dir} exists, is not empty and is not a phiforge dataset; choose another --out")
    tok = load_tokenizer(tokenizer_dir)
    eot = eot_id(tok)
    vocab = tok.get_vocab_size()
    dtype = token_dtype(vocab)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    val_ids = {str(v) for v in val_ids}
    writers = {s: ShardWriter(tmp, s, dtype, shard_tokens) for s in ("train", "val")}
    documents = []
    for doc in tqdm(docs, total=total, desc="prepare", unit="doc"):
        ids = tokenize_document(tok, doc.text, eot)
        split = "val" if doc.id in val_ids else "train"
        writers[split].add(ids)
        documents.append({"id": doc.id, "title": doc.title, "source": doc.source, "split": split,
                          "tokens": int(len(ids)), "removed_header_chars": doc.removed_header,
                          "removed_footer_chars": doc.removed_footer})
    splits = {s: w.finish() for s, w in writers.items()}
    missing = val_ids - {d["id"] for d in documents}
    if missing:
        shutil.rmtree(tmp, ignore_errors=True)
        raise DataError(f"validation book id(s) not in the corpus: {', '.join(sorted(missing))}")
    for s, info in splits.items():
        if info["tokens"] == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            raise DataError(f"the {s} split would be empty; adjust --val-ids")
    (tmp / "tokenizer.json").write_text(tok.to_str(), encoding="utf-8")
    index = {"format": FORMAT, "version": VERSION, "dtype": dtype.name,
             "tokenizer": {"name": "gpt2-bpe" if tokenizer_dir is None else str(tokenizer_dir),
                           "vocab_size": vocab, "eot_id": eot},
             "splits": splits, "documents": documents}
    write_index(tmp, index)
    if out_dir.exists():
        old = out_dir.with_name(out_dir.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        out_dir.rename(old)
        tmp.rename(out_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(out_dir)
    return index
