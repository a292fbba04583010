"""Project Gutenberg at scale: a local mirror tree, parquet dumps, and downloads from a mirror URL.

`--source mirror --mirror DIR [--catalog pg_catalog.csv] [--language en] [--type Text] [--ids 1-5000,2701]`
    A tree as gutenberg.org's rsync gives it. Book N is found as any of (first one wins, UTF-8 first):
        N/N-0.txt  N/N-0.zip  cache/epub/N/pgN.txt.utf8  cache/epub/N/pgN.txt  N/N-8.txt  N/N-8.zip  N/N.txt  N/N.zip
    at any depth (flat `N/` or the digit-nested `1/2/3/4/12345/`); the file's folder must be named N. When a
    book has several copies one is used, the others are counted in the report ("other copy of the same
    book"). With a catalog, only books in it that pass the filters are used.

`--source parquet --parquet PATH...`
    Parquet files (or folders of them) in the layout of one of the public HF datasets, recognised by columns:
        manu/project_gutenberg    id, text
        sedthh/gutenberg_english  TEXT, SOURCE, METADATA (JSON: text_id, title, authors, language, ...)
        PG-19                     short_book_title, publication_date, url, text
    Read with pyarrow one row group at a time (a row group is the resume unit), a few rows per batch.

`--source download (--ids 1342,2701 | --catalog-filter) --mirror-url URL --cache DIR`
    Fetches `{mirror}/cache/epub/N/pgN.txt` (`--url-template`) into `CACHE/cache/epub/N/pgN.txt` with the
    retries, backoff, rate limit and HTTP Range resume of `phiforge.data.download`, then reads the cache as a
    mirror. Books already in the cache are not fetched again; a book the mirror does not have (404) is
    counted in the report. With --catalog-filter the catalog (--catalog, else `{mirror}/cache/epub/feeds/
    pg_catalog.csv`, cached) picks the books.

pg_catalog.csv columns: Text#, Type, Issued, Title, Language, Authors, Subjects, LoCC, Bookshelves. A row
without Text# (a number), Type or Language is skipped and counted ("catalog row with missing fields").
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from phiforge.data.gutenberg import read_bytes
from phiforge.data.report import Report
from phiforge.data.sources import RawDoc, Skip, Source, Unit
from phiforge.errors import DataError

CATALOG_COLUMNS = ("Text#", "Type", "Issued", "Title", "Language", "Authors", "Subjects", "LoCC", "Bookshelves")
CATALOG_REQUIRED = ("Text#", "Type", "Language")

# (pattern on the file name, preference rank, folder the file must sit in: "N" or "epub/N")
_CANDIDATES = [
    (re.compile(r"^(\d+)-0\.txt$"), 0), (re.compile(r"^(\d+)-0\.zip$"), 1),
    (re.compile(r"^pg(\d+)\.txt\.utf8$"), 2), (re.compile(r"^pg(\d+)\.txt$"), 3),
    (re.compile(r"^(\d+)-8\.txt$"), 4), (re.compile(r"^(\d+)-8\.zip$"), 5),
    (re.compile(r"^(\d+)\.txt$"), 6), (re.compile(r"^(\d+)\.zip$"), 7),
]


# ---------------------------------------------------------------------------------------------- catalog


@dataclass
class CatalogEntry:
    id: str
    type: str
    title: str
    languages: tuple[str, ...]
    authors: str
    issued: str


def parse_id_ranges(text: str | None) -> list[tuple[int, int]] | None:
    """"1-100,2701,5000-" -> [(1, 100), (2701, 2701), (5000, inf)]."""
    if text is None or not str(text).strip():
        return None
    out = []
    for part in str(text).split(","):
        part = part.strip()
        if not part:
            continue
        m = re.fullmatch(r"(\d+)?\s*-\s*(\d+)?|(\d+)", part)
        if not m or (m.group(3) is None and m.group(1) is None and m.group(2) is None):
            raise DataError(f"--ids: cannot read {part!r} (use e.g. 1-1000,2701,5000-)")
        if m.group(3) is not None:
            lo = hi = int(m.group(3))
        else:
            lo = int(m.group(1)) if m.group(1) else 0
            hi = int(m.group(2)) if m.group(2) else 10**12
        if lo > hi:
            raise DataError(f"--ids: empty range {part!r}")
        out.append((lo, hi))
    return out


@dataclass
class CatalogFilter:
    languages: tuple[str, ...] | None = None  # e.g. ("en",); a book matches if any of its languages is listed
    types: tuple[str, ...] | None = ("Text",)
    ids: list[tuple[int, int]] | None = None

    def id_ok(self, book_id: str) -> bool:
        return self.ids is None or any(lo <= int(book_id) <= hi for lo, hi in self.ids)

    def matches(self, e: CatalogEntry) -> bool:
        if self.types is not None and e.type not in self.types:
            return False
        if self.languages is not None and not set(e.languages) & set(self.languages):
            return False
        return self.id_ok(e.id)

    def describe(self) -> dict:
        return {"languages": list(self.languages) if self.languages else None,
                "types": list(self.types) if self.types else None, "ids": self.ids}


def read_catalog(path: str | Path, report: Report) -> dict[str, CatalogEntry]:
    """pg_catalog.csv -> {id: entry}. A missing required column is an error naming the file; a row with a
    missing field is skipped and counted."""
    path = Path(path)
    try:
        raw = read_bytes(path)
    except DataError:
        raise
    if not raw.strip():
        raise DataError(f"empty catalog file: {path}")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise DataError(f"catalog {path} is not UTF-8 text") from None
    reader = csv.DictReader(io.StringIO(text, newline=""))
    missing = [c for c in CATALOG_REQUIRED if c not in (reader.fieldnames or [])]
    if missing:
        raise DataError(f"catalog {path} lacks column(s) {', '.join(missing)} (pg_catalog.csv has "
                        f"{', '.join(CATALOG_COLUMNS)})")
    out: dict[str, CatalogEntry] = {}
    for row in reader:
        line = reader.line_num
        bad = [c for c in CATALOG_REQUIRED if not (row.get(c) or "").strip()]
        if not bad and not row["Text#"].strip().isdigit():
            bad = ["Text# (not a number)"]
        if bad:
            report.skip("catalog row with missing fields", f"{path.name}:{line}: no {', '.join(bad)}")
            continue
        book_id = str(int(row["Text#"]))
        out[book_id] = CatalogEntry(
            id=book_id, type=row["Type"].strip(), title=(row.get("Title") or "").strip().replace("\n", " "),
            languages=tuple(x.strip() for x in row["Language"].split(";") if x.strip()),
            authors=(row.get("Authors") or "").strip(), issued=(row.get("Issued") or "").strip())
    return out


# ---------------------------------------------------------------------------------------------- mirror tree


def scan_mirror(root: Path) -> dict[str, list[tuple[int, str]]]:
    """{book id: [(rank, relative path), ...]} for every candidate file under root, best first."""
    found: dict[str, list[tuple[int, str]]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        parent = os.path.basename(dirpath)
        for name in filenames:
            for pat, rank in _CANDIDATES:
                m = pat.match(name)
                if m and m.group(1) == parent and m.group(1) == str(int(m.group(1))):
                    rel = os.path.relpath(os.path.join(dirpath, name), root)
                    found.setdefault(m.group(1), []).append((rank, rel.replace(os.sep, "/")))
                    break
    for v in found.values():
        v.sort()
    return found


class MirrorGutenberg(Source):
    name = "mirror"
    help = "a local gutenberg.org rsync mirror tree (--mirror DIR), filtered by pg_catalog.csv (--catalog)"
    corpus = "gutenberg"

    def __init__(self, mirror: str | Path | None = None, catalog: str | Path | None = None,
                 filter: CatalogFilter | None = None, only_ids: set[str] | None = None,
                 catalog_entries: dict[str, CatalogEntry] | None = None):
        super().__init__()
        if mirror is None:
            raise DataError("--source mirror needs --mirror DIR (a gutenberg.org rsync tree)")
        self.root = Path(mirror)
        if not self.root.is_dir():
            raise DataError(f"--mirror {self.root} is not a directory")
        self.catalog_path = Path(catalog) if catalog else None
        self.filter = filter or CatalogFilter(types=None)
        self.only_ids = only_ids
        self._books: list[tuple[str, str, int]] | None = None  # (id, relpath, size)
        self._by_id: dict[str, Unit] | None = None
        self._catalog: dict[str, CatalogEntry] = catalog_entries or {}
        self._use_catalog = catalog_entries is not None or self.catalog_path is not None
        if catalog_entries is not None:
            self.catalog_path = None

    def _scan(self) -> list[tuple[str, str, int]]:
        if self._books is not None:
            return self._books
        rep = self.scan_report
        if self.catalog_path is not None:
            self._catalog = read_catalog(self.catalog_path, rep)
        found = scan_mirror(self.root)
        books = []
        for book_id in sorted(found, key=int):
            cands = found[book_id]
            if self.only_ids is not None and book_id not in self.only_ids:
                continue
            if self._use_catalog:
                entry = self._catalog.get(book_id)
                if entry is None:
                    rep.skip("not in catalog", f"{cands[0][1]}")
                    continue
                if not self.filter.matches(entry):
                    rep.skip("filtered out by catalog (language/type/ids)", f"{book_id}: {entry.title[:60]} "
                             f"[{entry.type}, {';'.join(entry.languages)}]")
                    continue
            elif not self.filter.id_ok(book_id):
                continue
            for _, other in cands[1:]:
                rep.skip("other copy of the same book", f"{other} (kept {cands[0][1]})")
            rel = cands[0][1]
            books.append((book_id, rel, (self.root / rel).stat().st_size))
        self._books = books
        return books

    def ids(self) -> list[str]:
        return [b[0] for b in self._scan()]

    def describe(self) -> dict:
        return {"source": self.name, "mirror": str(self.root.resolve()),
                "catalog": str(self.catalog_path.resolve()) if self.catalog_path else None,
                "filter": self.filter.describe()}

    def units(self) -> list[Unit]:
        return [Unit(key=rel, source=self.corpus, size=size, ref=(book_id, rel)) for book_id, rel, size
                in self._scan()]

    def unit_of(self, doc_id: str) -> Unit | None:
        if self._by_id is None:
            self._by_id = {u.ref[0]: u for u in self.units()}
        return self._by_id.get(doc_id)

    def read(self, unit: Unit) -> Iterator[RawDoc | Skip]:
        book_id, rel = unit.ref
        path = self.root / rel
        try:
            data = _read_book(path)
        except DataError as e:
            yield Skip("unreadable file", f"{rel}: {e}", document=False)
            return
        entry = self._catalog.get(book_id)
        meta = {"file": rel}
        if entry is not None:
            meta.update(author=entry.authors, language=";".join(entry.languages))
        else:
            meta["title_from_header"] = True  # the worker reads "Title: ..." from the Gutenberg header
        yield RawDoc(id=book_id, title=entry.title if entry else f"PG {book_id}", source=self.corpus, data=data,
                     origin=rel, clean="gutenberg", meta=meta)


def _read_book(path: Path) -> bytes:
    if path.suffix == ".zip":
        try:
            with zipfile.ZipFile(path) as z:
                names = [n for n in z.namelist() if n.lower().endswith(".txt")]
                if not names:
                    raise DataError(f"no .txt inside {path}")
                return z.read(sorted(names, key=len)[0])
        except (zipfile.BadZipFile, OSError, EOFError) as e:
            raise DataError(f"corrupt zip {path}: {e}") from None
    return read_bytes(path)


# ---------------------------------------------------------------------------------------------- parquet

LAYOUTS = {
    "manu/project_gutenberg": {"id", "text"},
    "sedthh/gutenberg_english": {"TEXT", "SOURCE", "METADATA"},
    "pg19": {"short_book_title", "publication_date", "url", "text"},
}


TEXT_COLUMN = {"manu/project_gutenberg": "text", "sedthh/gutenberg_english": "TEXT", "pg19": "text"}


def _is_text(t) -> bool:
    import pyarrow as pa

    if pa.types.is_dictionary(t):
        t = t.value_type
    view = getattr(pa.types, "is_string_view", lambda _: False)
    return pa.types.is_string(t) or pa.types.is_large_string(t) or view(t) or pa.types.is_null(t)


def _pyarrow():
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError("reading parquet needs pyarrow: pip install 'phiforge[data]' (or pip install pyarrow)") \
            from None
    return pq


def _layout(names: set[str], path: Path) -> str:
    for name, cols in LAYOUTS.items():
        if cols <= names:
            return name
    raise DataError(f"{path}: unknown parquet layout (columns {', '.join(sorted(names))}); expected one of "
                    + "; ".join(f"{k}: {', '.join(sorted(v))}" for k, v in LAYOUTS.items()))


def _pg19_id(url: str) -> str:
    m = re.search(r"(\d+)/?$", url or "")
    return m.group(1) if m else ""


class ParquetGutenberg(Source):
    name = "parquet"
    help = "parquet dumps (--parquet PATH...): manu/project_gutenberg, sedthh/gutenberg_english or PG-19"
    corpus = "gutenberg"

    def __init__(self, parquet: list[str | Path] | None = None, batch_rows: int = 16, filter=None):
        super().__init__()
        if not parquet:
            raise DataError("--source parquet needs --parquet FILE_OR_DIR ...")
        self.files: list[Path] = []
        for p in map(Path, parquet):
            if p.is_dir():
                self.files.extend(sorted(p.rglob("*.parquet")))
            elif p.is_file():
                self.files.append(p)
            else:
                raise DataError(f"--parquet {p}: no such file or directory")
        if not self.files:
            raise DataError(f"no .parquet files in {', '.join(map(str, parquet))}")
        self.batch_rows = batch_rows
        self.filter = filter
        self._meta: dict[Path, tuple[str, int]] = {}

    def _open(self, path: Path):
        pq = _pyarrow()
        try:
            return pq.ParquetFile(path)
        except Exception as e:  # pyarrow raises ArrowInvalid / OSError for a bad file
            raise DataError(f"cannot read parquet file {path}: {str(e).splitlines()[0]}") from None

    def _info(self, path: Path) -> tuple[str, int]:
        if path not in self._meta:
            pf = self._open(path)
            layout = _layout(set(pf.schema_arrow.names), path)
            col = TEXT_COLUMN[layout]
            kind = pf.schema_arrow.field(col).type
            if not _is_text(kind):
                raise DataError(f"{path}: column '{col}' holds {kind}, not text (the {layout} layout keeps the "
                                "book text there)")
            self._meta[path] = (layout, pf.metadata.num_row_groups)
        return self._meta[path]

    def _rows(self, path: Path, row_groups=None, with_text=True) -> Iterator[tuple[str, str, str | None, dict]]:
        """(id, title, text, meta) per row, streamed a few rows at a time."""
        layout, _ = self._info(path)
        cols = {"manu/project_gutenberg": ["id", "text"], "sedthh/gutenberg_english": ["METADATA", "TEXT"],
                "pg19": ["url", "short_book_title", "publication_date", "text"]}[layout]
        if not with_text:
            cols = cols[:-1]
        pf = self._open(path)
        try:
            for batch in pf.iter_batches(batch_size=self.batch_rows, row_groups=row_groups, columns=cols):
                d = batch.to_pydict()
                for i in range(batch.num_rows):
                    text = d[cols[-1]][i] if with_text else None
                    if layout == "manu/project_gutenberg":
                        yield str(d["id"][i]), "", text, {}
                    elif layout == "sedthh/gutenberg_english":
                        try:
                            m = json.loads(d["METADATA"][i] or "{}")
                        except ValueError:
                            m = {}
                        yield (str(m.get("text_id", "")), str(m.get("title", "")), text,
                               {k: str(m[k]) for k in ("authors", "language") if k in m})
                    else:
                        yield (_pg19_id(d["url"][i]), str(d["short_book_title"][i] or ""), text,
                               {"publication_date": d["publication_date"][i]})
        except DataError:
            raise
        except Exception as e:
            raise DataError(f"cannot read parquet file {path}: {str(e).splitlines()[0]}") from None

    def ids(self) -> list[str]:
        out = []
        for f in self.files:
            for i, (book_id, *_rest) in enumerate(self._rows(f, with_text=False)):
                out.append(book_id or f"{f.stem}#{i}")
        return out

    def describe(self) -> dict:
        return {"source": self.name, "files": [str(f.resolve()) for f in self.files],
                "sizes": [f.stat().st_size for f in self.files]}

    def units(self) -> list[Unit]:
        units = []
        for f in self.files:
            layout, groups = self._info(f)
            size = f.stat().st_size
            for g in range(groups):
                units.append(Unit(key=f"{f.name}#rg{g}", source=self.corpus, size=size // max(groups, 1),
                                  ref=(f, g)))
        return units

    def read(self, unit: Unit) -> Iterator[RawDoc | Skip]:
        f, g = unit.ref
        first = sum(self._open(f).metadata.row_group(k).num_rows for k in range(g))
        for i, (book_id, title, text, meta) in enumerate(self._rows(f, row_groups=[g]), first):
            book_id = book_id or f"{f.stem}#{i}"
            if not text or not str(text).strip():
                yield Skip("empty document", f"{f.name} row {i} (id {book_id})")
                continue
            yield RawDoc(id=book_id, title=title or f"PG {book_id}", source=self.corpus, text=text,
                         origin=f"{f.name}:{i}", clean="gutenberg", meta=meta)


# ---------------------------------------------------------------------------------------------- download

DEFAULT_MIRROR = "https://www.gutenberg.org"
DEFAULT_TEMPLATE = "{mirror}/cache/epub/{id}/pg{id}.txt"
CATALOG_URL = "{mirror}/cache/epub/feeds/pg_catalog.csv"


class DownloadGutenberg(Source):
    name = "download"
    help = ("fetch books from a mirror URL (--ids 1342,2701 or --catalog-filter) into a cache, with retries, "
            "rate limit and resume")
    corpus = "gutenberg"

    def __init__(self, ids: str | None = None, catalog_filter: bool = False, catalog: str | Path | None = None,
                 filter: CatalogFilter | None = None, mirror_url: str = DEFAULT_MIRROR,
                 url_template: str = DEFAULT_TEMPLATE, cache: str | Path | None = None, fetcher=None,
                 progress: bool | None = None):
        super().__init__()
        from phiforge.data.download import Fetcher

        if not ids and not catalog_filter:
            raise DataError("--source download needs --ids ID,... or --catalog-filter (with --language/--type/...)")
        self.mirror_url = mirror_url.rstrip("/")
        self.template = url_template
        self.cache = Path(cache) if cache else Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) \
            / "phiforge" / "gutenberg"
        self.filter = filter or CatalogFilter()
        self.id_ranges = parse_id_ranges(ids) if ids else None
        self.catalog_filter = catalog_filter
        self.catalog = Path(catalog) if catalog else None
        self.fetcher = fetcher or Fetcher()
        self.progress = progress
        self._mirror: MirrorGutenberg | None = None
        self._entries: dict[str, CatalogEntry] | None = None
        self.fetched: dict[str, str] = {}

    def _wanted(self) -> list[str]:
        if self.catalog_filter:
            cat_path = self.catalog
            if cat_path is None:
                cat_path = self.cache / "pg_catalog.csv"
                r = self.fetcher.fetch(CATALOG_URL.format(mirror=self.mirror_url), cat_path)
                if r.status == "missing":
                    raise DataError(f"the mirror has no catalog at {r.url}; give --catalog FILE")
            entries = read_catalog(cat_path, self.scan_report)
            self._entries = entries
            flt = CatalogFilter(self.filter.languages, self.filter.types, self.id_ranges or self.filter.ids)
            return [k for k, e in sorted(entries.items(), key=lambda kv: int(kv[0])) if flt.matches(e)]
        ids = []
        for lo, hi in self.id_ranges:
            if hi - lo > 100_000:
                raise DataError("--ids with --source download takes explicit ids or closed ranges; "
                                "use --catalog-filter for open ranges")
            ids.extend(str(i) for i in range(lo, hi + 1))
        return list(dict.fromkeys(ids))

    def fetch(self) -> None:
        """Download what is not in the cache yet (before any document is read)."""
        if self._mirror is not None:
            return
        from tqdm import tqdm

        wanted = self._wanted()
        for book_id in tqdm(wanted, desc="download", unit="book", disable=None if self.progress is None
                            else not self.progress):
            dest = self.cache / "cache" / "epub" / book_id / f"pg{book_id}.txt"
            r = self.fetcher.fetch(self.template.format(mirror=self.mirror_url, id=book_id), dest)
            if r.status == "missing":
                self.scan_report.skip("not on the mirror (HTTP 404)", r.url)
            else:
                self.fetched[book_id] = r.status
        self._mirror = MirrorGutenberg(self.cache, filter=CatalogFilter(types=None), only_ids=set(self.fetched),
                                       catalog_entries=self._entries)
        self._mirror.scan_report = self.scan_report

    def _m(self) -> MirrorGutenberg:
        self.fetch()
        return self._mirror

    def ids(self) -> list[str]:
        return self._m().ids()

    def units(self) -> list[Unit]:
        return self._m().units()

    def read(self, unit: Unit):
        return self._m().read(unit)

    def unit_of(self, doc_id: str) -> Unit | None:
        return self._m().unit_of(doc_id)

    def describe(self) -> dict:
        return {"source": self.name, "mirror_url": self.mirror_url, "url_template": self.template,
                "ids": sorted(self.fetched, key=int), "filter": self.filter.describe() if self.catalog_filter
                else None}

