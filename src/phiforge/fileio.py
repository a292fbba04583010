"""Crash-safe small-file writes: write a temporary file, fsync it, rename it over the target, fsync the folder.

A reader then sees either the old file or the new one, never a half-written one, even after a power cut."""

from __future__ import annotations

import json
import os
from pathlib import Path


def fsync_dir(d: Path) -> None:
    """Make a rename inside `d` durable (a no-op where the platform or filesystem cannot open folders)."""
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_text_atomic(path: Path, text: str) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def write_json_atomic(path: Path, obj, indent: int = 2) -> None:
    write_text_atomic(path, json.dumps(obj, indent=indent, ensure_ascii=False) + "\n")
