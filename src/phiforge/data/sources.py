"""Where documents come from. A source lists its input *units* (files, books, parquet row groups) cheaply and
in a fixed order, and reads each unit as a stream of raw documents; `prepare` does the rest (cleaning and
tokenizing in worker processes, dedup, shards, resume).

    Unit        one resumable piece of input: `prepare` journals the units it has completed, and a re-run
                after a crash continues after the last completed one
    RawDoc      a document as read: raw bytes to decode (`data`) or text; `clean="gutenberg"` asks the worker
                for the Gutenberg cleaning (markers, BOM, CRLF, encoding fallback, NFC)
    Skip        a record that could not be used (malformed line, empty file, ...): counted in the report

The Gutenberg sources are `bundled` (the seven books shipped in the package) here, `mirror`, `parquet` and
`download` in `phiforge.data.mirror`; `phiforge.data.corpora.GUTENBERG_SOURCES` names them by `--source`.
RedPajama lives in `phiforge.data.redpajama`. A source also lists its document ids (`ids()`, used to choose
validation books before any text is read), and a source with one book per unit finds a book's unit
(`unit_of`), so the chosen validation books are checked before the long pass (`choose_val_ids(check=True)`).

`clean_raw(raw)` is the first half of a worker's job (decode, Gutenberg cleaning), shared with that check.
"""

from __future__ import annotations

import csv
import hashlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from phiforge.data.gutenberg import clean_book, decode_with_encoding, header_title, read_bytes
from phiforge.data.report import Report
from phiforge.errors import DataError

BUNDLED_DIR = Path(__file__).resolve().parent.parent / "assets" / "gutenberg"


@dataclass
class Unit:
    key: str  # stable name (relative path, "pg2701", "file.parquet#rg3"); journaled, shown in errors
    source: str  # the source its documents belong to
    size: int = 0  # input bytes, for the progress bar's ETA
    ref: object = None  # whatever `read` needs (a path, a row group, ...)


@dataclass
class RawDoc:
    id: str
    title: str
    source: str
    text: str | None = None
    data: bytes | None = None  # raw bytes, decoded in the worker (UTF-8, then cp1252, then latin-1)
    origin: str = ""  # where it came from (file, file:line), for reports
    clean: str = "plain"  # "gutenberg": markers/BOM/CRLF/NFC cleaning; "plain": used as is
    # parse(raw) -> (text, title) or Skip: `data` is a record to parse in the worker (redpajama.parse_record's
    # JSON line), not text to decode; a module-level function, so that it pickles
    parse: Callable[["RawDoc"], "tuple[str, str] | Skip"] | None = None
    meta: dict = field(default_factory=dict)


@dataclass
class Skip:
    reason: str
    example: str
    chars: int = 0
    document: bool = True  # a document was read and dropped (False: a whole file, e.g. an empty one)


def clean_raw(raw: RawDoc) -> tuple[str, str, dict, dict] | Skip:
    """A raw document's (text, title, meta, info) after decoding and cleaning, or the Skip saying why there is
    none. info: facts for the report (encoding fallback, characters of boilerplate removed)."""
    info: dict = {}
    title, meta, text = raw.title, dict(raw.meta), raw.text
    if raw.parse is not None:  # a record, parsed here (in a worker) rather than by the reader
        parsed = raw.parse(raw)
        if isinstance(parsed, Skip):
            return parsed
        (text, title), meta = parsed, {}
    elif text is None:
        try:
            text, enc = decode_with_encoding(raw.data, raw.origin)
        except DataError as e:
            reason = "empty file" if str(e).startswith("empty") else "binary file"
            return Skip(reason, raw.origin, len(raw.data or b""))
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
        return Skip("empty after cleaning", raw.origin, 0)
    meta["chars"] = len(text)
    return text, title, meta, info


class Source:
    name = ""
    help = ""
    corpus = ""
    default_val_ids: tuple[str, ...] = ()  # held out when neither --val-books nor --val-ids is given
    val_preference: tuple[str, ...] = ()  # --val-books N takes the first N of these, then others by hash

    default_dedup = "exact,near"  # --dedup when not given
    default_val_fraction = 0.005  # --val-books default (at least 1) when there are no default_val_ids

    def __init__(self):
        self.scan_report = Report()  # what listing the input skipped (recomputed identically on every run)

    def ids(self) -> list[str]:
        raise NotImplementedError

    def units(self) -> list[Unit]:
        raise NotImplementedError

    def read(self, unit: Unit) -> Iterator[RawDoc | Skip]:
        raise NotImplementedError

    def describe(self) -> dict:
        """JSON-able facts that identify the input (recorded in the index, part of the resume fingerprint)."""
        return {"source": self.name}

    def unit_of(self, doc_id: str) -> Unit | None:
        """The unit that holds only this document, when the source has one book per unit (else None)."""
        return None

    def unreadable(self, doc_id: str) -> str | None:
        """Why a document would not come out of `prepare` (unreadable, empty after cleaning), or None; reads
        only its own unit. None also when the source cannot tell without reading everything."""
        unit = self.unit_of(doc_id)
        if unit is None:
            return None
        for raw in self.read(unit):  # the unit holds this document only
            if isinstance(raw, Skip):
                return f"{raw.reason}: {raw.example}"
            if raw.id == doc_id:
                c = clean_raw(raw)
                return f"{c.reason}: {c.example}" if isinstance(c, Skip) else None
        return "not produced by the source"


class BundledGutenberg(Source):
    """The sample corpus shipped in the package (assets/gutenberg/MANIFEST.tsv), checked against its sha256s."""

    name = "bundled"
    help = "the seven public-domain books shipped with phiforge (6 Austen novels, Moby Dick)"
    corpus = "gutenberg"
    default_val_ids = ("105",)  # Persuasion: a mid-sized Austen novel
    val_preference = ("105", "121", "161", "1342", "158", "141", "2701")

    def __init__(self, root: Path = BUNDLED_DIR):
        super().__init__()
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

    def describe(self) -> dict:
        return {"source": self.name, "books": [r["sha256_uncompressed"] for r in self.rows]}

    def unit_of(self, doc_id: str) -> Unit | None:
        return next((u for u in self.units() if u.ref["pg_ebook"] == doc_id), None)

    def units(self) -> list[Unit]:
        return [Unit(key=f"pg{r['pg_ebook']}", source=self.corpus, size=(self.root / r["file"]).stat().st_size
                     if (self.root / r["file"]).exists() else 0, ref=r) for r in self.rows]

    def read(self, unit: Unit) -> Iterator[RawDoc]:
        row = unit.ref
        path = self.root / row["file"]
        data = read_bytes(path)
        if hashlib.sha256(data).hexdigest() != row["sha256_uncompressed"]:
            raise DataError(f"{path} does not match the sha256 in {self.root / 'MANIFEST.tsv'}")
        yield RawDoc(id=row["pg_ebook"], title=row["title"], source=self.corpus, data=data, origin=row["file"],
                     clean="gutenberg", meta={"author": row.get("author", ""), "file": row["file"]})


def choose_val_ids(source: Source, val_books: int | None = None, val_ids: list[str] | None = None,
                   check: bool = False) -> tuple[list[str], str]:
    """Validation document ids and how they were chosen ("default", "val-books" or "val-ids").

    Whole documents are held out. --val-books N takes the source's preference order, then the remaining ids
    ordered by sha256 (deterministic, independent of listing order). With `check`, each pick is read first
    (`Source.unreadable`): an unreadable pick is passed over for the next one (noted in the report), and an
    unreadable --val-ids book is an error, before the long pass rather than after it.
    """
    ids = source.ids()
    if not ids:
        raise DataError(f"source '{source.name}' has no books to prepare ({source.describe()}); see the "
                        f"skipped inputs: {', '.join(source.scan_report.removed) or 'none'}")
    if val_books is not None and val_ids is not None:
        raise DataError("give --val-books or --val-ids, not both")
    if val_ids is not None:
        chosen = list(dict.fromkeys(str(v).strip() for v in val_ids if str(v).strip()))
        unknown = [v for v in chosen if v not in ids]
        if unknown:
            shown = ", ".join(ids[:20]) + (f", ... ({len(ids)} in all)" if len(ids) > 20 else "")
            raise DataError(f"--val-ids {','.join(unknown)} not in source '{source.name}' (ids: {shown})")
        for v in chosen if check else ():
            why = source.unreadable(v)
            if why:
                raise DataError(f"--val-ids {v}: this book cannot be used for validation ({why}); choose another")
        return chosen, "val-ids"
    if val_books is not None:
        known = set(ids)
        order = [v for v in source.val_preference if v in known]
        first = set(order)
        order += sorted((v for v in ids if v not in first), key=lambda v: hashlib.sha256(v.encode()).hexdigest())
        want, method = val_books, "val-books"
    elif source.default_val_ids:
        order, method = [v for v in source.default_val_ids if v in ids], "default"
        want = len(order)
    else:  # a fraction of the books (at least one), by sha256 order
        order = sorted(ids, key=lambda v: hashlib.sha256(v.encode()).hexdigest())
        want, method = max(1, round(len(ids) * source.default_val_fraction)), "default"
    if want >= len(ids):
        raise DataError(f"holding out {want} of {len(ids)} books leaves no training data; "
                        f"use --val-books below {len(ids)}")
    chosen = _first_usable(source, order, want) if check else order[:want]
    if not chosen:
        raise DataError("--val-books must be at least 1" if method == "val-books" else
                        f"source '{source.name}' has no default validation books; give --val-books or --val-ids")
    return chosen, method


def _first_usable(source: Source, order: list[str], want: int) -> list[str]:
    """The first `want` ids of `order` that `source` can produce, noting each one passed over."""
    chosen, passed = [], []
    for v in order:
        if len(chosen) == want:
            break
        why = source.unreadable(v)
        if why:
            passed.append(v)
            source.scan_report.notes.append(f"validation: book {v} passed over, it cannot be used ({why})")
        else:
            chosen.append(v)
    if passed and len(chosen) < want:
        raise DataError(f"only {len(chosen)} of the {want} validation book(s) can be read (unreadable: "
                        f"{', '.join(passed[:10])}); use fewer --val-books")
    return chosen
