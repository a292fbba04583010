"""RedPajama-Data-1T, its 1T-Sample, and RedPajama-V2 documents as a `prepare` source.

`phiforge prepare redpajama --input DIR` accepts, under DIR:

    1T          arxiv/ book/ c4/ common_crawl/ github/ stackexchange/ wikipedia/   (any depth below each)
    1T-Sample   arxiv_sample.jsonl book_sample.jsonl c4_sample.jsonl cc_2019-30_sample.jsonl ...
                github_sample.jsonl stackexchange_sample.jsonl wikipedia_sample.jsonl (the source from the name)
    V2          documents/SNAPSHOT/SHARD/LANG_PART.json.gz with `raw_content`; quality signals, when present, in
                quality_signals/SNAPSHOT/SHARD/LANG_PART.signals.json.gz (same order, line by line)

Files are JSON lines: plain, .gz or .zst. A record is {"text": ..., "meta": {...}} (1T) or {"raw_content":
...} (V2). Each file is one input unit (resume granularity); units run source by source (arxiv, book, c4,
common_crawl, github, stackexchange, wikipedia, then others by name), files in path order, so the shards
are grouped by source and every shard holds one source.

The reader hands each line to the workers as bytes: parsing the JSON, taking the text and running the quality
filter happen there (the documents' `parse` is `parse_record`, which `clean_raw` calls), not in `prepare`'s
main process.

Quality filters (`--quality-filter NAME|module:function`) see each record and its quality signals (V2; None
for 1T) and return None to keep it or a short reason to drop it; drops are counted in the report as
"quality filter: REASON". Built in: `rpv2-basic` (Gopher-style rules on word count, mean word length,
symbol ratio, ellipsis lines, words without letters; computed from the text when there are no signals).

Per-source mixture weights are not applied here: they are recorded in the index ("mixture") and applied by
the loader when sampling (`PackedLoader(..., mixture="index")`), so changing them needs no new shards.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable, Iterator
from pathlib import Path

from phiforge.data.readers import BadRecord, iter_lines, parse_json_line
from phiforge.data.sources import RawDoc, Skip, Source, Unit
from phiforge.errors import DataError

SOURCES = ("arxiv", "book", "c4", "common_crawl", "github", "stackexchange", "wikipedia")
# lit-gpt's RedPajama mixture (percent of sampled tokens)
DEFAULT_WEIGHTS = {"common_crawl": 67.0, "c4": 15.0, "github": 4.5, "wikipedia": 4.5, "book": 4.5, "arxiv": 2.5,
                   "stackexchange": 2.0}
SUFFIXES = (".jsonl", ".jsonl.zst", ".jsonl.gz", ".json.gz", ".json.zst")
_NAME_PREFIXES = [("arxiv", "arxiv"), ("book", "book"), ("c4", "c4"), ("cc_", "common_crawl"),
                  ("common_crawl", "common_crawl"), ("github", "github"), ("stackexchange", "stackexchange"),
                  ("wikipedia", "wikipedia"), ("wiki", "wikipedia")]

QualityFilter = Callable[[dict, "dict | None"], "str | None"]


def parse_weights(text: str | None) -> dict[str, float]:
    """"common_crawl=67,c4=15,..." -> dict (default: DEFAULT_WEIGHTS)."""
    if text is None:
        return dict(DEFAULT_WEIGHTS)
    out = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, value = part.partition("=")
        try:
            w = float(value)
        except ValueError:
            w = -1.0
        if not sep or not name.strip() or w < 0:
            raise DataError(f"--weights: cannot read {part!r} (use e.g. common_crawl=67,c4=15,github=4.5)")
        out[name.strip()] = w
    if not out or sum(out.values()) <= 0:
        raise DataError("--weights: at least one source needs a positive weight")
    return out


def _signal(signals: dict | None, name: str):
    try:
        return float(signals["quality_signals"][name][0][2])
    except (KeyError, IndexError, TypeError, ValueError):
        return None


def rpv2_basic(record: dict, signals: dict | None) -> str | None:
    """Gopher-style document rules on RedPajama-V2 quality signals (from the text when there are none)."""
    text = record.get("raw_content", record.get("text", "")) or ""
    words = None

    def get(name, compute):
        nonlocal words
        v = _signal(signals, name)
        if v is None:
            if words is None:
                words = text.split()
            v = compute(words)
        return v

    wc = get("rps_doc_word_count", len)
    if not 50 <= wc <= 100_000:
        return "word count"
    mwl = get("rps_doc_mean_word_length", lambda w: sum(map(len, w)) / max(1, len(w)))
    if not 3 <= mwl <= 10:
        return "mean word length"
    sym = get("rps_doc_symbol_to_word_ratio",
              lambda w: (text.count("#") + text.count("...") + text.count("\u2026")) / max(1, len(w)))
    if sym > 0.1:
        return "symbol ratio"
    lines = None

    def ellipsis(_):
        nonlocal lines
        lines = [l for l in text.splitlines() if l.strip()]
        return sum(l.rstrip().endswith(("...", "\u2026")) for l in lines) / max(1, len(lines))

    if get("rps_doc_frac_lines_end_with_ellipsis", ellipsis) > 0.3:
        return "ellipsis lines"
    if get("rps_doc_frac_no_alph_words", lambda w: sum(not re.search(r"[^\W\d_]", x) for x in w) / max(1, len(w))) \
            > 0.2:
        return "words without letters"
    return None


QUALITY_FILTERS: dict[str, QualityFilter] = {"rpv2-basic": rpv2_basic}


def load_quality_filter(spec: str | None) -> QualityFilter | None:
    if not spec or spec == "none":
        return None
    if spec in QUALITY_FILTERS:
        return QUALITY_FILTERS[spec]
    mod, sep, fn = spec.partition(":")
    if not sep:
        raise DataError(f"--quality-filter {spec!r}: use one of {', '.join(QUALITY_FILTERS)} or module:function")
    try:
        f = getattr(importlib.import_module(mod), fn)
    except (ImportError, AttributeError) as e:
        raise DataError(f"--quality-filter {spec}: cannot load it ({e})") from None
    if not callable(f):
        raise DataError(f"--quality-filter {spec} is not callable")
    return f


def classify(rel: Path) -> tuple[str, bool]:
    """(source, is_v2) for a data file's path relative to the input dir; DataError if it cannot be told."""
    parts = rel.parts
    if parts[0] in SOURCES and len(parts) > 1:
        return parts[0], False
    if parts[0] == "documents" and len(parts) > 1:
        return "common_crawl", True
    name = rel.name.lower()
    for prefix, source in _NAME_PREFIXES:
        if name.startswith(prefix):
            return source, False
    raise DataError(f"cannot tell which RedPajama source {rel} belongs to: put it under one of "
                    f"{', '.join(s + '/' for s in SOURCES)} or name it SOURCE_*.jsonl")


def _signals_path(root: Path, rel: Path) -> Path | None:
    if rel.parts[0] != "documents":
        return None
    name = rel.name
    for suf in (".json.gz", ".json.zst", ".jsonl.gz", ".jsonl.zst", ".jsonl"):
        if name.endswith(suf):
            name = name[: -len(suf)] + ".signals" + suf
            break
    p = root / "quality_signals" / Path(*rel.parts[1:-1]) / name
    return p if p.is_file() else None


class RedPajamaSource(Source):
    name = "redpajama"
    help = "RedPajama-Data-1T / 1T-Sample / V2 JSON lines under --input DIR"
    corpus = "redpajama"
    default_dedup = "none"  # RedPajama is deduplicated upstream

    def __init__(self, input_dir: str | Path, sources: list[str] | None = None, quality_filter: str | None = None):
        super().__init__()
        self.root = Path(input_dir)
        if not self.root.is_dir():
            raise DataError(f"--input {self.root} is not a directory")
        self.only = set(sources) if sources else None
        self.filter_spec = quality_filter
        self.quality_filter = load_quality_filter(quality_filter)
        self._units: list[Unit] | None = None

    def units(self) -> list[Unit]:
        if self._units is not None:
            return self._units
        found = []
        for path in sorted(self.root.rglob("*")):
            rel = path.relative_to(self.root)
            if not path.is_file() or not path.name.endswith(SUFFIXES) or rel.parts[0] == "quality_signals" \
                    or ".signals." in path.name or any(p.startswith(".") for p in rel.parts):
                continue
            source, v2 = classify(rel)
            if self.only is not None and source not in self.only:
                continue
            found.append(Unit(key=rel.as_posix(), source=source, size=path.stat().st_size, ref=(path, v2)))
        if not found:
            raise DataError(f"no RedPajama files (*.jsonl, *.jsonl.zst, *.jsonl.gz, V2 *.json.gz) under {self.root}"
                            + (f" for sources {', '.join(sorted(self.only))}" if self.only else ""))
        order = {s: i for i, s in enumerate(SOURCES)}
        found.sort(key=lambda u: (order.get(u.source, len(order)), u.source, u.key))
        self._units = found
        return found

    def ids(self) -> list[str]:
        raise DataError("RedPajama documents are held out by --val-fraction, not by id")

    def describe(self) -> dict:
        return {"source": self.name, "input": str(self.root.resolve()),
                "sources": sorted(self.only) if self.only else None, "quality_filter": self.filter_spec,
                "files": len(self.units())}

    def read(self, unit: Unit) -> Iterator[RawDoc | Skip]:
        """Each line of the file as raw bytes (with its quality-signals line, V2), parsed by `parse_record`."""
        path, v2 = unit.ref
        sig_path = _signals_path(self.root, Path(unit.key)) if v2 else None
        signals = iter_lines(sig_path) if sig_path is not None else None
        records = 0
        for n, line in iter_lines(path):
            records += 1
            sig = next(signals, None) if signals is not None else None
            yield RawDoc(id=f"{unit.key}:{n}", title="", source=unit.source, data=line, origin=f"{unit.key}:{n}",
                         parse=parse_record, meta={"filter": self.filter_spec, "signals": sig and sig[1]})
        if records == 0:
            yield Skip("empty file", unit.key, document=False)


def parse_record(raw: RawDoc) -> tuple[str, str] | Skip:
    """(text, title) of a line that `RedPajamaSource.read` gave, or the Skip that says why it has none (a bad
    line, no text, an empty text, dropped by the quality filter)."""
    rec = parse_json_line(raw.origin, 0, raw.data)
    if isinstance(rec, BadRecord):
        return Skip(rec.reason, f"{raw.origin}: {rec.detail.split(': ', 1)[-1]}")
    text = rec.get("text") if "text" in rec else rec.get("raw_content")
    if not isinstance(text, str):
        return Skip("record without text", raw.origin)
    if not text.strip():
        return Skip("empty document", raw.origin)
    quality_filter = load_quality_filter(raw.meta.get("filter"))  # a dict lookup, or an import done before
    if quality_filter is not None:
        sig = raw.meta.get("signals")
        sig = parse_json_line(raw.origin, 0, sig) if sig is not None else None
        why = quality_filter(rec, None if isinstance(sig, BadRecord) else sig)
        if why:
            return Skip(f"quality filter: {why}", raw.origin, len(text))
    meta = rec.get("meta") if isinstance(rec.get("meta"), dict) else {}
    return text, str(meta.get("title") or rec.get("title") or "")[:200]
