"""Packed token shards: headerless little-endian uint16 (uint32 for vocabularies >= 65536) plus `index.json`.

    DIR/index.json          {"format": "phiforge-tokens", "version": 1, "dtype", "tokenizer": {...},
                             "splits": {split: {"shards": [{"file", "tokens", "documents", "sha256"}], "tokens",
                             "documents"}}, "documents": [{"id", "title", "source", "split", "tokens"}]}
    DIR/train-00000.bin     documents back to back, each followed by <|endoftext|>
    DIR/tokenizer.json      the tokenizer that made the tokens

Shard files are written as NAME.tmp and renamed when complete; index.json is written last, so a directory
with an index never points at a half-written shard.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from phiforge.errors import DataError

FORMAT = "phiforge-tokens"
VERSION = 1
INDEX = "index.json"


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype("<u2") if vocab_size < 2**16 else np.dtype("<u4")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class ShardWriter:
    """Appends documents' tokens to `{split}-NNNNN.bin` files, rolling over at `shard_tokens`."""

    def __init__(self, out_dir: Path, split: str, dtype: np.dtype, shard_tokens: int = 50_000_000):
        self.out_dir, self.split, self.dtype, self.shard_tokens = Path(out_dir), split, dtype, shard_tokens
        self.shards: list[dict] = []
        self._file = None
        self._tokens = self._docs = 0

    def _open(self) -> None:
        name = f"{self.split}-{len(self.shards):05d}.bin"
        self._name = name
        self._file = open(self.out_dir / (name + ".tmp"), "wb")
        self._hash = hashlib.sha256()
        self._tokens = self._docs = 0

    def _close(self) -> None:
        self._file.close()
        os.replace(self.out_dir / (self._name + ".tmp"), self.out_dir / self._name)
        self.shards.append({"file": self._name, "tokens": self._tokens, "documents": self._docs,
                            "sha256": self._hash.hexdigest()})
        self._file = None

    def add(self, tokens: np.ndarray) -> None:
        """Write one document's tokens (already ending in EOT). A document may span two shards."""
        data = np.ascontiguousarray(tokens, dtype=self.dtype)
        if self._file is None:
            self._open()
        self._docs += 1
        while len(data):
            room = self.shard_tokens - self._tokens
            piece, data = data[:room], data[room:]
            b = piece.tobytes()
            self._file.write(b)
            self._hash.update(b)
            self._tokens += len(piece)
            if self._tokens >= self.shard_tokens:
                self._close()
                if len(data):
                    self._open()

    def finish(self) -> dict:
        if self._file is not None and self._tokens:
            self._close()
        elif self._file is not None:
            self._file.close()
            os.remove(self.out_dir / (self._name + ".tmp"))
        return {"shards": self.shards, "tokens": sum(s["tokens"] for s in self.shards),
                "documents": sum(s["documents"] for s in self.shards)}


def write_index(out_dir: Path, index: dict) -> None:
    tmp = Path(out_dir) / (INDEX + ".tmp")
    tmp.write_text(json.dumps(index, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, Path(out_dir) / INDEX)


@dataclass
class TokenDataset:
    dir: Path
    index: dict

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.index["dtype"]).newbyteorder("<")

    @property
    def vocab_size(self) -> int:
        return int(self.index["tokenizer"]["vocab_size"])

    @property
    def eot_id(self) -> int:
        return int(self.index["tokenizer"]["eot_id"])

    def splits(self) -> list[str]:
        return list(self.index["splits"])

    def split_tokens(self, split: str) -> int:
        return int(self._split(split)["tokens"])

    def _split(self, split: str) -> dict:
        if split not in self.index["splits"]:
            raise DataError(f"dataset {self.dir} has no '{split}' split (has: {', '.join(self.splits())})")
        return self.index["splits"][split]

    def arrays(self, split: str) -> list[np.ndarray]:
        """Memory-mapped token arrays of a split's shards, in order."""
        out = []
        for s in self._split(split)["shards"]:
            path = self.dir / s["file"]
            if s["tokens"] == 0:
                continue
            out.append(np.memmap(path, dtype=self.dtype, mode="r", shape=(s["tokens"],)))
        return out

    def verify(self) -> None:
        """Check every shard's sha256 against the index."""
        for split in self.splits():
            for s in self._split(split)["shards"]:
                path = self.dir / s["file"]
                if sha256_file(path) != s["sha256"]:
                    raise DataError(f"checksum mismatch in shard {path}: the file changed since it was written")


def open_token_dataset(data_dir: str | Path) -> TokenDataset:
    """Open and sanity-check a dataset directory; problems raise DataError naming the path."""
    d = Path(data_dir)
    if not d.is_dir():
        raise DataError(f"data directory not found: {d}")
    idx_path = d / INDEX
    if not idx_path.exists():
        raise DataError(f"no {INDEX} in {d}; run `phiforge prepare gutenberg --out {d}` first")
    try:
        index = json.loads(idx_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"corrupt dataset index {idx_path}: {e}") from None
    if not isinstance(index, dict) or index.get("format") != FORMAT or "splits" not in index:
        raise DataError(f"{idx_path} is not a phiforge token dataset index")
    ds = TokenDataset(d, index)
    for split, info in index["splits"].items():
        for s in info["shards"]:
            path = d / s["file"]
            if not path.exists():
                raise DataError(f"shard listed in {idx_path} is missing: {path}")
            expected = s["tokens"] * ds.dtype.itemsize
            if path.stat().st_size != expected:
                raise DataError(f"shard {path} has {path.stat().st_size} bytes, index says {expected}: "
                                "truncated or overwritten; re-run `phiforge prepare`")
    return ds
