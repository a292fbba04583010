"""Duplicate removal: exact (content hash) and near-duplicate (MinHash + LSH), decided in document order.

Exact: the BLAKE2b-128 of a document's cleaned UTF-8 text. Near: a MinHash signature of the document's
word 5-gram shingles (lower-cased `\\w+` words, so re-wrapped lines and changed punctuation still match),
128 hash functions from the multiply-shift family over 64-bit shingle hashes; LSH with 16 bands of 8 rows
finds candidates (a pair with Jaccard similarity s becomes a candidate with probability 1-(1-s^8)^16:
0.9 -> ~1.0, 0.8 -> 0.94, 0.5 -> 0.06), and a candidate counts as a duplicate when the fraction of equal
signature entries (an estimate of the Jaccard similarity) is at least the threshold (default 0.8).

Signatures are computed in the tokenizer workers (`minhash_signature`); the decision runs in the main
process in document order (`Deduper.check`), so the first copy is kept and the output does not depend on
the number of workers. Two Gutenberg editions of one book (different transcriptions, a re-release with
corrections) typically share >90% of their shingles; different books share <5%.
"""

from __future__ import annotations

import hashlib
import re

import numpy as np

NUM_PERM = 128
BANDS = 16
SHINGLE = 5
_WORD = re.compile(r"\w+")
_rng = np.random.Generator(np.random.PCG64(0x5EED))
_A = (_rng.integers(1, 2**63, size=NUM_PERM, dtype=np.uint64) * np.uint64(2) + np.uint64(1))  # odd multipliers
_B = _rng.integers(0, 2**63, size=NUM_PERM, dtype=np.uint64)
_MULT = np.uint64(0x9E3779B97F4A7C15)
_CHUNK = 4096


def content_hash(text: str) -> bytes:
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()


def _word_hashes(words: list[str]) -> np.ndarray:
    table = {w: int.from_bytes(hashlib.blake2b(w.encode("utf-8"), digest_size=8).digest(), "little")
             for w in set(words)}
    return np.fromiter((table[w] for w in words), dtype=np.uint64, count=len(words))


def minhash_signature(text: str, shingle: int = SHINGLE) -> np.ndarray:
    """uint32[NUM_PERM] MinHash of the text's word shingles (deterministic across processes and runs)."""
    words = _WORD.findall(text.lower())
    if not words:
        return np.full(NUM_PERM, 0xFFFFFFFF, dtype=np.uint32)
    h = _word_hashes(words)
    k = min(shingle, len(h))
    with np.errstate(over="ignore"):
        sh = np.zeros(len(h) - k + 1, dtype=np.uint64)
        for j in range(k):  # polynomial combination of k consecutive word hashes (wrapping uint64)
            sh = sh * _MULT + h[j : len(h) - k + 1 + j]
        sh = np.unique(sh)
        sig = np.full(NUM_PERM, np.iinfo(np.uint64).max, dtype=np.uint64)
        for i in range(0, len(sh), _CHUNK):
            block = sh[i : i + _CHUNK]
            v = (_A[:, None] * block[None, :] + _B[:, None]) >> np.uint64(32)
            np.minimum(sig, v.min(axis=1), out=sig)
    return sig.astype(np.uint32)


class Deduper:
    """Remembers kept documents; `check` says whether a new one duplicates one of them (and registers it if
    not). `state()` / `restore()` save and reload what it remembers as JSON and one uint32 array (no pickle), so a
    resumed `prepare` continues with the same decisions."""

    def __init__(self, exact: bool = True, near: bool = True, threshold: float = 0.8, bands: int = BANDS):
        if not 0 < threshold <= 1:
            raise ValueError(f"near-duplicate threshold must be in (0, 1], got {threshold}")
        if NUM_PERM % bands:
            raise ValueError(f"bands must divide {NUM_PERM}")
        self.exact, self.near, self.threshold, self.bands = exact, near, threshold, bands
        self.rows = NUM_PERM // bands
        self.hashes: dict[bytes, str] = {}
        self.buckets: list[dict[bytes, list[int]]] = [{} for _ in range(bands)]
        self.ids: list[str] = []
        self.sigs: list[np.ndarray] = []

    @property
    def enabled(self) -> bool:
        return self.exact or self.near

    def check(self, doc_id: str, chash: bytes | None, sig: np.ndarray | None):
        """None if the document is new (and now remembered), else (reason, kept_id, similarity)."""
        if self.exact and chash is not None:
            if chash in self.hashes:
                return "exact duplicate", self.hashes[chash], 1.0
        if self.near and sig is not None:
            best, best_sim = None, 0.0
            seen = set()
            for b in range(self.bands):
                key = sig[b * self.rows : (b + 1) * self.rows].tobytes()
                for j in self.buckets[b].get(key, ()):
                    if j in seen:
                        continue
                    seen.add(j)
                    sim = float(np.mean(self.sigs[j] == sig))
                    if sim > best_sim:
                        best, best_sim = j, sim
            if best is not None and best_sim >= self.threshold:
                return "near duplicate", self.ids[best], round(best_sim, 3)
        self._remember(doc_id, chash, sig)
        return None

    def _remember(self, doc_id: str, chash: bytes | None, sig: np.ndarray | None) -> None:
        if self.exact and chash is not None:
            self.hashes[chash] = doc_id
        if self.near and sig is not None:
            j = len(self.ids)
            self.ids.append(doc_id)
            self.sigs.append(np.asarray(sig, dtype=np.uint32))
            for b in range(self.bands):
                self.buckets[b].setdefault(sig[b * self.rows : (b + 1) * self.rows].tobytes(), []).append(j)

    def state(self) -> tuple[dict, np.ndarray]:
        """What it remembers: content hashes and ids as JSON, and the near-dedup signatures as uint32[N, 128]."""
        sigs = np.stack(self.sigs) if self.sigs else np.empty((0, NUM_PERM), dtype=np.uint32)
        return {"hashes": [[h.hex(), i] for h, i in self.hashes.items()], "ids": list(self.ids)}, sigs

    def restore(self, state: dict, sigs: np.ndarray) -> None:
        """Remember what `state()` saved (the LSH buckets are rebuilt in the same order, so the decisions that
        follow are those of an uninterrupted run)."""
        if len(state["ids"]) != len(sigs):
            raise ValueError(f"{len(state['ids'])} ids but {len(sigs)} signatures")
        self.hashes = {bytes.fromhex(h): str(i) for h, i in state["hashes"]}
        for doc_id, sig in zip(state["ids"], sigs):
            self._remember(str(doc_id), None, sig)
