"""Where documents come from. Each source yields cleaned `Document`s; `prepare` does the rest.

A source is a class registered in `GUTENBERG_SOURCES` under its `--source` name. It lists its document ids
cheaply (`ids()`, used to choose validation books before any text is read) and yields documents in a fixed
order (`documents()`). Today there is `bundled` (the seven books shipped in the package); a local mirror,
a parquet dump or a download plug in as more classes here.
"""

from __future__ import annotations

import csv
import hashlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from phiforge.data.gutenberg import clean_book, decode_bytes, read_bytes
from phiforge.errors import DataError

BUNDLED_DIR = Path(__file__).resolve().parent.parent / "assets" / "gutenberg"


@dataclass
class Document:
    id: str
    title: str
    source: str  # the corpus it belongs to, e.g. "gutenberg"; per-source shares are reported by this
    text: str  # cleaned
    meta: dict = field(default_factory=dict)  # more JSON-able facts for the index (author, removed chars, ...)


class Source:
    name = ""
    help = ""
    corpus = ""
    default_val_ids: tuple[str, ...] = ()  # held out when neither --val-books nor --val-ids is given
    val_preference: tuple[str, ...] = ()  # --val-books N takes the first N of these, then others by hash

    def ids(self) -> list[str]:
        raise NotImplementedError

    def documents(self) -> Iterator[Document]:
        raise NotImplementedError

    def describe(self) -> str:
        return self.name


class BundledGutenberg(Source):
    """The sample corpus shipped in the package (assets/gutenberg/MANIFEST.tsv), checked against its sha256s."""

    name = "bundled"
    help = "the seven public-domain books shipped with phiforge (6 Austen novels, Moby Dick)"
    corpus = "gutenberg"
    default_val_ids = ("105",)  # Persuasion: a mid-sized Austen novel
    val_preference = ("105", "121", "161", "1342", "158", "141", "2701")

    def __init__(self, root: Path = BUNDLED_DIR):
        self.root = Path(root)
        manifest = self.root / "MANIFEST.tsv"
        try:
            with open(manifest, encoding="utf-8", newline="") as f:
                self.rows = list(csv.DictReader(f, delimiter="\t"))
        except FileNotFoundError:
            raise DataError(f"bundled corpus manifest missing: {manifest} (broken install?)") from None
        need = {"file", "pg_ebook", "title", "sha256_uncompressed"}
        if not self.rows or not need <= set(self.rows[0]):
            have = set(self.rows[0]) if self.rows else set()
            raise DataError(f"{manifest} lacks columns: {', '.join(sorted(need - have))}")

    def ids(self) -> list[str]:
        return [r["pg_ebook"] for r in self.rows]

    def documents(self) -> Iterator[Document]:
        for row in self.rows:
            path = self.root / row["file"]
            data = read_bytes(path)
            if hashlib.sha256(data).hexdigest() != row["sha256_uncompressed"]:
                raise DataError(f"{path} does not match the sha256 in {self.root / 'MANIFEST.tsv'}")
            clean = clean_book(decode_bytes(data, str(path)))
            meta = {"author": row.get("author", ""), "file": row["file"], "chars": len(clean.text),
                    "removed_header_chars": clean.header_chars, "removed_footer_chars": clean.footer_chars}
            yield Document(id=row["pg_ebook"], title=row["title"], source=self.corpus, text=clean.text, meta=meta)


GUTENBERG_SOURCES: dict[str, type[Source]] = {"bundled": BundledGutenberg}


def get_source(name: str, registry: dict[str, type[Source]] = GUTENBERG_SOURCES) -> Source:
    if name not in registry:
        raise DataError(f"unknown --source '{name}' (choose from: {', '.join(registry)})")
    return registry[name]()


def choose_val_ids(source: Source, val_books: int | None = None,
                   val_ids: list[str] | None = None) -> tuple[list[str], str]:
    """Validation document ids and how they were chosen ("default", "val-books" or "val-ids").

    Whole documents are held out. --val-books N takes the source's preference order, then the remaining ids
    ordered by sha256 (deterministic, independent of listing order).
    """
    ids = source.ids()
    if val_books is not None and val_ids is not None:
        raise DataError("give --val-books or --val-ids, not both")
    if val_ids is not None:
        chosen = list(dict.fromkeys(str(v).strip() for v in val_ids if str(v).strip()))
        unknown = [v for v in chosen if v not in ids]
        if unknown:
            raise DataError(f"--val-ids {','.join(unknown)} not in source '{source.name}' (ids: {', '.join(ids)})")
        method = "val-ids"
    elif val_books is not None:
        known = set(ids)
        order = [v for v in source.val_preference if v in known]
        order += sorted((v for v in ids if v not in set(order)), key=lambda v: hashlib.sha256(v.encode()).hexdigest())
        chosen, method = order[:val_books], "val-books"
    else:
        chosen, method = [v for v in source.default_val_ids if v in ids], "default"
    if not chosen:
        raise DataError("--val-books must be at least 1" if method == "val-books" else
                        f"source '{source.name}' has no default validation books; give --val-books or --val-ids")
    if len(chosen) >= len(ids):
        raise DataError(f"holding out {len(chosen)} of {len(ids)} books leaves no training data; "
                        f"use --val-books below {len(ids)}")
    return chosen, method
