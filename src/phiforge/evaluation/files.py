"""Reading evaluation inputs: rows of JSONL or parquet files, with one-line errors naming the file and row."""

from __future__ import annotations

from pathlib import Path

from phiforge.errors import DataError

ROW_SUFFIXES = (".jsonl", ".json", ".parquet")


def read_bytes(path: Path) -> bytes:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise DataError(f"file not found: {path}") from None
    except IsADirectoryError:
        raise DataError(f"{path} is a directory, not a file") from None
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror or e}") from None


def utf8(raw: bytes, path: Path) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DataError(f"{path} line {line} is not UTF-8 text (byte {e.start}: {e.reason})") from None


def read_rows(path: str | Path) -> list[tuple[int, dict]]:
    """(row number, row) of each row of a JSONL file (.jsonl/.json, one JSON object per line; numbers are line
    numbers, blank lines skipped) or a parquet file (numbers from 1). DataError for a missing, unreadable or empty
    file, a line that is not a JSON object, another suffix."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in ROW_SUFFIXES:
        raise DataError(f"{path}: unknown file type '{suffix}' (expected {', '.join(ROW_SUFFIXES)})")
    rows = _parquet_rows(path) if suffix == ".parquet" else _jsonl_rows(path)
    if not rows:
        raise DataError(f"{path} is empty: no rows")
    return rows


def _jsonl_rows(path: Path) -> list[tuple[int, dict]]:
    from phiforge.data.readers import BadRecord, iter_jsonl

    if path.is_dir():
        raise DataError(f"{path} is a directory, not a file")
    rows = []
    for row in iter_jsonl(path):
        if isinstance(row, BadRecord):  # a task is small and exact: one bad line is an error, not a skip
            raise DataError(row.error(path))
        rows.append(row)
    return rows


def _parquet_rows(path: Path) -> list[tuple[int, dict]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"reading {path} needs pyarrow: pip install 'phiforge[data]'") from None
    if not path.is_file():
        raise DataError(f"file not found: {path}" if not path.exists() else f"{path} is a directory, not a file")
    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises ArrowInvalid, OSError, ...: all mean an unreadable file
        raise DataError(f"{path} is not a readable parquet file ({str(e).splitlines()[0][:200]})") from None
    return list(enumerate(table.to_pylist(), 1))
