"""Reading input files as streams: plain, .gz and .zst, line by line, with bounded memory.

Every problem with a whole file (missing, unreadable, truncated .gz or .zst, binary data where text was
expected) raises `DataError` with one line that names the file. Problems with single records (a malformed
JSON line, invalid UTF-8 inside a line) are the caller's to count: `iter_jsonl` yields them as `BadRecord`.
"""

from __future__ import annotations

import gzip
import io
import json
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from phiforge.errors import DataError

BLOCK = 1 << 20


class _ZstdRaw(io.RawIOBase):
    """A .zst file as a readable stream that raises DataError when the last frame is incomplete (zstandard's
    own stream_reader returns the readable part of a truncated file without complaint)."""

    def __init__(self, path: Path):
        try:
            import zstandard
        except ImportError:
            raise DataError(f"cannot read {path}: the 'zstandard' package is not installed "
                            "(pip install zstandard)") from None
        self._z = zstandard
        self.path = path
        self._f = open(path, "rb")
        self._d = zstandard.ZstdDecompressor().decompressobj()
        self._buf = b""
        self._fed = False  # the current frame has been given data
        self._eof = False

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        while not self._buf and not self._eof:
            chunk = self._f.read(BLOCK)
            if not chunk:
                self._eof = True
                if self._fed and not self._d.eof:
                    raise DataError(f"truncated .zst file (its last frame is incomplete): {self.path}")
                break
            try:
                out = self._d.decompress(chunk)
                self._fed = True
                while self._d.eof and self._d.unused_data:  # several frames back to back
                    rest = self._d.unused_data
                    self._d = self._z.ZstdDecompressor().decompressobj()
                    out += self._d.decompress(rest)
            except self._z.ZstdError as e:
                raise DataError(f"corrupt .zst file {self.path}: {e}") from None
            self._buf = out
        n = min(len(b), len(self._buf))
        b[:n] = self._buf[:n]
        self._buf = self._buf[n:]
        return n

    def close(self) -> None:
        self._f.close()
        super().close()


class _GzipGuard(io.RawIOBase):
    """gzip.open with errors turned into DataError naming the file."""

    def __init__(self, path: Path):
        self.path = path
        self._g = gzip.open(path, "rb")

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        try:
            return self._g.readinto(b)
        except EOFError:
            raise DataError(f"truncated .gz file (it ends before the end of its compressed stream): {self.path}") \
                from None
        except (gzip.BadGzipFile, zlib.error, OSError) as e:
            raise DataError(f"corrupt .gz file {self.path}: {e}") from None

    def close(self) -> None:
        self._g.close()
        super().close()


def open_binary(path: str | Path) -> io.BufferedReader:
    """A buffered binary stream of a file's (decompressed) bytes; .gz and .zst by suffix."""
    path = Path(path)
    try:
        if path.name.endswith(".zst"):
            raw = _ZstdRaw(path)
        elif path.name.endswith(".gz"):
            raw = _GzipGuard(path)
        else:
            return open(path, "rb", buffering=BLOCK)
    except FileNotFoundError:
        raise DataError(f"file not found: {path}") from None
    except OSError as e:
        raise DataError(f"cannot read {path}: {e}") from None
    return io.BufferedReader(raw, buffer_size=BLOCK)


@dataclass
class BadRecord:
    line: int  # 1-based
    reason: str  # "malformed json line", "invalid utf-8", ...
    detail: str  # "NAME:LINE: what is wrong", as a report's example

    def error(self, path: str | Path) -> str:
        """One line for a reader that stops at the first bad line."""
        what = self.detail.split(": ", 1)[-1]
        return f"{path} line {self.line}: {self.reason} ({what})"


def iter_lines(path: str | Path) -> Iterator[tuple[int, bytes]]:
    """(line number, raw bytes) for each non-blank line of a .jsonl(.gz|.zst) file.

    A file whose first bytes contain NUL is not JSON text: DataError. An empty file yields nothing.
    """
    path = Path(path)
    with open_binary(path) as f:
        head = f.peek(4096)[:4096]
        if b"\x00" in head:
            raise DataError(f"binary file, not JSON lines: {path}")
        for n, raw in enumerate(f, 1):
            if raw.strip():
                yield n, raw


def parse_json_line(name: str, n: int, raw: bytes) -> dict | BadRecord:
    """A JSON-lines record (a JSON object), or the BadRecord saying why line n of file `name` is not one."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return BadRecord(n, "invalid utf-8", f"{name}:{n}: {e.reason} at byte {e.start}")
    try:
        rec = json.loads(text)
    except ValueError as e:
        return BadRecord(n, "malformed json line", f"{name}:{n}: {e}")
    if not isinstance(rec, dict):
        return BadRecord(n, "malformed json line", f"{name}:{n}: not a JSON object")
    return rec


def iter_jsonl(path: str | Path) -> Iterator[tuple[int, dict] | BadRecord]:
    """(line number, record) for each non-blank line of a .jsonl(.gz|.zst) file; bad lines as BadRecord.

    A file whose first bytes contain NUL is not JSON text: DataError. An empty file yields nothing.
    """
    name = Path(path).name
    for n, raw in iter_lines(path):
        rec = parse_json_line(name, n, raw)
        yield rec if isinstance(rec, BadRecord) else (n, rec)
