"""Project Gutenberg text cleaning: BOM, line endings, header/licence/footer, Unicode NFC, blank lines.

`clean_book(raw)` is the whole pipeline for one book:

1. `normalise`: drop U+FEFF (the BOM), CRLF/CR -> LF, Unicode NFC, strip trailing spaces/tabs from lines,
   cap runs of blank lines at two, trim leading/trailing blank lines.
2. `strip_gutenberg`: cut the Gutenberg header (title block, licence preamble, 1990s "small print") and
   footer (licence, donation pages) at their marker lines, and drop a credits paragraph ("Produced by ...")
   right after the start marker.

Marker lines are matched case-insensitively at the start of a line (leading blanks and asterisks allowed).
The lists follow the markers of the `gutenberg` PyPI package and the forms PG used from the 1990s to now:
`*** START OF THE/THIS PROJECT GUTENBERG EBOOK ...`, `*END*THE SMALL PRINT! FOR PUBLIC DOMAIN ETEXTS*...`,
`*** END OF THE/THIS PROJECT GUTENBERG EBOOK ...`, `End of the Project Gutenberg EBook of ...`,
`End of Project Gutenberg's ...`, `*** START: FULL LICENSE ***`, and German/French variants. Only strong
markers are used: phrases that do not occur inside books, so a text without markers is kept whole.

The book is the longest stretch that runs from a start marker (or the top of the file) to the next marker,
when that one is an end marker (or the end of the file). This handles files with both `*** START OF THIS
...` and a later `*END*THE SMALL PRINT`, files with the small print at the bottom, and files with only one
kind of marker. Character counts of what was cut are returned for reports.
"""

from __future__ import annotations

import gzip
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path

from phiforge.errors import DataError

CLEANER_VERSION = 1  # bump when the output of clean_book changes; recorded in dataset indexes

_LEAD = r"^[\s*]*"  # markers may be preceded by blanks and asterisks: "***START", " *** START", "**The"
_PG = r"PROJEC?T\s+GUTENBERG"  # "Project Gutenberg", also the "Projet"/"Projekt" spellings below

START_MARKERS = [
    rf"START\s+OF\s+(THE|THIS)\s+{_PG}",  # *** START OF THE PROJECT GUTENBERG EBOOK X ***  (1990s..now)
    rf"START\s+OF\s+THE\s+COPYRIGHTED\s+{_PG}",
    rf"BEGINNING\s+OF\s+(THE|THIS)\s+{_PG}",
    r"END\s*\*?\s*THE\s+SMALL\s+PRINT",  # *END*THE SMALL PRINT! FOR PUBLIC DOMAIN ETEXTS*Ver.04.29.93*END*
    r"END\s+OF\s+THE\s+SMALL\s+PRINT",
    r"ANFANG\s+DIESES\s+PROJEKT\s+GUTENBERG",
]
END_MARKERS = [
    rf"END\s+OF\s+(THE\s+|THIS\s+)?{_PG}",  # *** END OF THE ... / End of the Project Gutenberg EBook of X
    r"END\s+OF\s+(THE\s+|THIS\s+)?PROJEKT\s+GUTENBERG",
    rf"END\s+OF\s+THE\s+COPYRIGHTED\s+{_PG}",
    r"END\s+OF\s+THIS\s+IS\s+COPYRIGHTED",
    rf"THIS\s+IS\s+A\s+COPYRIGHTED\s+{_PG}\s+ETEXT,\s+DETAILS\s+ABOVE",
    r"START:?\s+FULL\s+LICEN[CS]E",  # *** START: FULL LICENSE ***
    r"ENDE\s+(DIESES|DIESE)\s+(PROJECT|PROJEKT)\s+GUTENBERG",
    r"ENDE\s+DIESES\s+ETEXTES",
    r"FIN\s+(DE\s+|DU\s+)?(L'|LE\s+)?(PROJECT|PROJET)\s+GUTENBERG",
    r"CE\s+DOCUMENT\s+FUT\s+PR[EÉ]SENT[EÉ]\s+EN\s+LECTURE",
]
# A credits paragraph right after the start marker is Gutenberg's, not the book's.
CREDIT_MARKERS = [
    r"PRODUCED\s+BY",
    r"PREPARED\s+BY",
    r"THIS\s+(E-?TEXT|E-?BOOK|ETEXT)\s+WAS\s+(PREPARED|PRODUCED|CREATED|DONE|SCANNED)\s+BY",
    rf"THIS\s+{_PG}\s+(E-?TEXT|E-?BOOK)\s+WAS\s+PREPARED",
    r"E-?TEXT\s+PREPARED\s+BY",
    r"TRANSCRIBED\s+(FROM|BY)",
    r"(SCANNED|DIGITI[SZ]ED|PROOFREAD)\s+BY",
    r"(THE\s+)?(PROJECT\s+GUTENBERG\s+)?ONLINE\s+DISTRIBUTED\s+PROOFREADING",
    r"(PROJECT\s+)?GUTENBERG\s+DISTRIBUTED\s+PROOFREADERS",
]


def _compile(markers: list[str]) -> re.Pattern:
    return re.compile(_LEAD + "(?:" + "|".join(f"(?:{m})" for m in markers) + ")", re.IGNORECASE)


_START_RE, _END_RE, _CREDIT_RE = _compile(START_MARKERS), _compile(END_MARKERS), _compile(CREDIT_MARKERS)
_TRAILING_WS = re.compile(r"[ \t]+$", re.MULTILINE)
_BLANK_RUNS = re.compile(r"\n{4,}")  # 4+ newlines = 3+ blank lines


@dataclass
class CleanResult:
    text: str  # the book, normalised, ending in one "\n"
    header_chars: int  # characters of the normalised text removed before the book (header, licence, credits)
    footer_chars: int  # characters removed after the book (footer, licence)
    start_marker: str | None = None  # the marker lines used, for reports
    end_marker: str | None = None

    @property
    def had_markers(self) -> bool:
        return self.start_marker is not None or self.end_marker is not None


def normalise(text: str) -> str:
    """BOM out, LF line ends, NFC, no trailing blanks on lines, at most two blank lines in a row."""
    text = text.replace("\ufeff", "").replace("\r\n", "\n").replace("\r", "\n")
    text = unicodedata.normalize("NFC", text)
    text = _TRAILING_WS.sub("", text)
    text = _BLANK_RUNS.sub("\n\n\n", text)
    return text.strip("\n") + "\n" if text.strip() else ""


def strip_gutenberg(text: str) -> CleanResult:
    """Remove the Project Gutenberg header, licence and footer from normalised text (see the module doc)."""
    lines = text.split("\n")
    markers = [(-1, "start")]  # (line, kind); the top of the file counts as a start, the bottom as an end
    for i, line in enumerate(lines):
        if _END_RE.match(line):
            markers.append((i, "end"))
        elif _START_RE.match(line):
            markers.append((i, "start"))
    markers.append((len(lines), "end"))
    spans = [(a, b) for (a, ka), (b, kb) in zip(markers, markers[1:]) if ka == "start" and kb == "end"]
    start_line, end = max(spans, key=lambda s: (sum(len(x) + 1 for x in lines[s[0] + 1 : s[1]]), -s[0]))
    start = start_line + 1
    start_marker = lines[start_line].strip() if start_line >= 0 else None
    end_marker = lines[end].strip() if end < len(lines) else None
    if start_marker is not None:  # credits paragraphs ("Produced by ...") right after the marker
        for _ in range(3):
            j = start
            while j < end and not lines[j].strip():
                j += 1
            if j >= end or not _CREDIT_RE.match(lines[j]):
                break
            while j < end and lines[j].strip():
                j += 1
            start = j
    body = "\n".join(lines[start:end]).strip("\n")
    body = body + "\n" if body.strip() else ""
    header = sum(len(x) + 1 for x in lines[:start])
    footer = max(0, len(text) - header - len(body))
    return CleanResult(body, header, footer, start_marker, end_marker)


def clean_book(raw: str) -> CleanResult:
    """normalise + strip_gutenberg: raw Gutenberg text -> the book."""
    return strip_gutenberg(normalise(raw))


def decode_bytes(data: bytes, source: str) -> str:
    """UTF-8 (with or without BOM), else cp1252, else latin-1 (old Gutenberg files). Binary data is refused."""
    return decode_with_encoding(data, source)[0]


def decode_with_encoding(data: bytes, source: str) -> tuple[str, str]:
    """(text, encoding used): see decode_bytes."""
    if not data.strip():
        raise DataError(f"empty file: {source}")
    if b"\x00" in data[:4096]:
        raise DataError(f"binary file, not text: {source}")
    try:
        return data.decode("utf-8"), "utf-8"
    except UnicodeDecodeError:
        pass
    try:
        return data.decode("cp1252"), "cp1252"
    except UnicodeDecodeError:  # cp1252 leaves five bytes undefined; latin-1 decodes anything
        return data.decode("latin-1"), "latin-1"


_TITLE = re.compile(r"^Title:[ \t]*(\S.*)$", re.MULTILINE)


def header_title(text: str) -> str | None:
    """The "Title: ..." line of a Gutenberg header (first 10,000 characters), if there is one."""
    m = _TITLE.search(text[:10_000])
    return m.group(1).strip()[:200] if m else None


def read_bytes(path: Path) -> bytes:
    """A file's bytes, gunzipped if it ends in .gz; unreadable files raise DataError naming the path."""
    path = Path(path)
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"file not found: {path}") from None
    except (EOFError, gzip.BadGzipFile, OSError) as e:
        raise DataError(f"cannot read {path}: {e}") from None


def read_text_file(path: Path) -> str:
    return decode_bytes(read_bytes(path), str(path))
