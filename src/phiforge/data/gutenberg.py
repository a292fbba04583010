"""Project Gutenberg text cleaning: BOM, line endings, header/licence/footer, Unicode NFC.

Header and footer are found by their marker lines. The lists cover the modern `*** START OF THE PROJECT
GUTENBERG EBOOK` form, the older `THIS PROJECT`/`Project Gutenberg's` forms and the 1990s "small print"
variants (after the `gutenberg` PyPI package's lists). A book with no markers is kept whole.
"""

from __future__ import annotations

import gzip
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path

from phiforge.errors import DataError

_START_MARKERS = [
    r"\*+\s*START OF (THE|THIS) PROJECT GUTENBERG",
    r"\*+\s*START OF THE PROJECT GUTENBERG",
    r"\*END\*THE SMALL PRINT",
    r"\*+\s*END\*?THE SMALL PRINT",
    r"\*+\s*START\*+\s*(OF\s+)?(THE|THIS)?\s*PROJECT GUTENBERG",
    r"This etext was prepared by",
    r"E-text prepared by",
    r"Produced by .*Project Gutenberg",
    r"\*\*\*\s*START OF (THE|THIS) PROJECT GUTENBERG",
    r"START OF (THE|THIS) PROJECT GUTENBERG EBOOK",
]
_END_MARKERS = [
    r"\*+\s*END OF (THE|THIS) PROJECT GUTENBERG",
    r"End of (the )?Project Gutenberg'?s?\s",
    r"End of (The|the) Project Gutenberg E-?(Book|text)",
    r"\*+\s*END OF (THE|THIS) PROJECT GUTENBERG E-?BOOK",
    r"End of this Project Gutenberg",
    r"\*\*\*\s*END OF THE PROJECT GUTENBERG",
    r"END OF (THE|THIS) PROJECT GUTENBERG",
    r"Ende dieses Project Gutenberg",
    r"\*\*\*END OF THE PROJECT GUTENBERG",
    r"Fin de Project Gutenberg",
]
_START_RE = re.compile("|".join(f"(?:{m})" for m in _START_MARKERS), re.IGNORECASE)
_END_RE = re.compile("|".join(f"(?:{m})" for m in _END_MARKERS), re.IGNORECASE)
# Credit lines that sit just after the start marker, before the book itself.
_CREDIT_RE = re.compile(r"^(Produced by|This e-?text was produced|E-?text prepared by|Transcribed by)", re.IGNORECASE)


@dataclass
class CleanResult:
    text: str
    header_chars: int  # characters removed before the book
    footer_chars: int  # characters removed after the book
    had_markers: bool


def normalise(text: str) -> str:
    """Strip the BOM, turn CRLF/CR into LF, compose to NFC and cap runs of blank lines at two."""
    text = text.lstrip("\ufeff").replace("\r\n", "\n").replace("\r", "\n")
    text = unicodedata.normalize("NFC", text)
    return re.sub(r"\n{4,}", "\n\n\n", text)


def strip_gutenberg(text: str) -> CleanResult:
    """Remove the Project Gutenberg header, licence and footer from already normalised text."""
    lines = text.split("\n")
    start, end = 0, len(lines)
    # The start marker is in the first part of the file, the end marker in the last part; search only there so
    # a sentence inside the book that happens to match cannot cut it.
    head_limit = max(1, len(lines) // 2)
    for i in range(head_limit):
        if _START_RE.search(lines[i]):
            start = i + 1
    for i in range(len(lines) - 1, head_limit - 1, -1):
        if _END_RE.search(lines[i]):
            end = i
    # Drop a credits paragraph right after the start marker.
    j = start
    while j < end and not lines[j].strip():
        j += 1
    if j < end and start > 0 and _CREDIT_RE.match(lines[j]):
        while j < end and lines[j].strip():
            j += 1
        start = j
    body = "\n".join(lines[start:end]).strip("\n") + "\n"
    header = sum(len(x) + 1 for x in lines[:start])
    footer = sum(len(x) + 1 for x in lines[end:])
    return CleanResult(body, header, footer, had_markers=start > 0 or end < len(lines))


def decode_bytes(data: bytes, source: str) -> str:
    """UTF-8 first, then cp1252 and latin-1 (old Gutenberg files). Binary data is refused."""
    if not data.strip():
        raise DataError(f"empty file: {source}")
    if b"\x00" in data[:4096]:
        raise DataError(f"binary file, not text: {source}")
    for enc in ("utf-8", "cp1252", "latin-1"):
        try:
            return data.decode(enc)
        except UnicodeDecodeError:
            continue
    raise DataError(f"cannot decode text: {source}")  # latin-1 decodes anything; kept for clarity


def read_text_file(path: Path) -> str:
    path = Path(path)
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                data = f.read()
        else:
            data = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"file not found: {path}") from None
    except (EOFError, gzip.BadGzipFile, OSError) as e:
        raise DataError(f"cannot read {path}: {e}") from None
    return decode_bytes(data, str(path))


def clean_book(raw: str) -> CleanResult:
    return strip_gutenberg(normalise(raw))
