"""Test and benchmark corpora (not part of the package): offline RedPajama layouts made from real text that
ships with phiforge and Python, and a source's cleaned documents read in this process.

`cleaned_documents(source)` reads a source's documents in order, decoded and cleaned as `prepare`'s workers do
(no dedup, no tokenizing): for small inputs.

`make_redpajama(out, layout="1T"|"sample"|"v2", max_bytes=...)` writes a small RedPajama-format download:

    book           the bundled Gutenberg books (cleaned), one document each          book/book.jsonl
    github         the running interpreter's standard-library sources (*.py)         github/filtered_0.jsonl
    wikipedia      pydoc's topic pages (pydoc_data.topics), one article each          wikipedia/wiki.jsonl
    arxiv          standard-library module docstrings, as "papers"                    arxiv/arxiv_0.jsonl.gz
    stackexchange  "Q: What is X? A: ..." from the pydoc topics                        stackexchange/stackexchange.jsonl
    c4             Austen paragraphs, a few per document                               c4/c4-train.00000-of-01024.jsonl
    common_crawl   Moby Dick paragraphs, zstd-compressed                               common_crawl/2019-30/en_head_0000.jsonl.zst

"sample" writes the same as 1T-Sample's flat `SOURCE_sample.jsonl` files (common crawl as
`cc_2019-30_sample.jsonl`), "v2" writes common crawl as V2 `documents/` + `quality_signals/`.

`add_duplicates(out)` adds wikipedia/wiki_dups.jsonl to such a download: an exact copy of the first book/ document
and a near copy (a few words changed) of the second, so `--dedup exact,near` has something to remove.

`split_documents(src, out, target_chars)` rewrites such a corpus as c4/ documents of about target_chars (cut
at paragraph ends): the same text in web-page-sized documents, for measuring per-document costs.

`make_bench_corpus(out, target_bytes)` repeats the books and stdlib sources with variations (paragraph order,
dropped paragraphs, a per-copy preamble) into book/ and github/ JSON-lines files of about target_bytes.
Nothing is downloaded.
"""

from __future__ import annotations

import json
import random
import sysconfig
from pathlib import Path

from phiforge.data.sources import BundledGutenberg, RawDoc, Skip, Source, clean_raw

STDLIB = Path(sysconfig.get_paths()["stdlib"])


def cleaned_documents(source: Source):
    """(id, title, cleaned text, meta) of each document a source yields that survives cleaning, in order."""
    for unit in source.units():
        for raw in source.read(unit):
            c = clean_raw(raw) if isinstance(raw, RawDoc) else raw
            if not isinstance(c, Skip):
                text, title, meta, _ = c
                yield raw.id, title, text, meta


def _books() -> list[tuple[str, str, str]]:
    """(id, title, cleaned text) of the bundled books."""
    return [(i, title, text) for i, title, text, _ in cleaned_documents(BundledGutenberg())]


def _stdlib_files(limit_bytes: int) -> list[tuple[str, str]]:
    out, total = [], 0
    for p in sorted(STDLIB.glob("*.py")) + sorted(STDLIB.glob("*/*.py")):
        if "test" in p.parts[-2:-1] or p.name.startswith("test"):
            continue
        try:
            text = p.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if not text.strip():
            continue
        out.append((p.relative_to(STDLIB).as_posix(), text))
        total += len(text)
        if total >= limit_bytes:
            break
    return out


def _topics() -> list[tuple[str, str]]:
    try:
        from pydoc_data.topics import topics
    except ImportError:  # stripped-down Pythons
        return [("python", "Python is a programming language. " * 50)]
    return sorted(topics.items())


def _docstrings(limit_bytes: int) -> list[tuple[str, str]]:
    import ast

    out, total = [], 0
    for rel, text in _stdlib_files(4 * limit_bytes + 200_000):
        try:
            doc = ast.get_docstring(ast.parse(text))
        except (SyntaxError, ValueError):
            continue
        if doc and len(doc) > 300:
            out.append((rel, doc))
            total += len(doc)
            if total >= limit_bytes:
                break
    return out


def _paragraphs(text: str) -> list[str]:
    return [p for p in text.split("\n\n") if p.strip()]


def _cap(docs: list[dict], max_bytes: int) -> list[dict]:
    out, total = [], 0
    for d in docs:
        out.append(d)
        total += len(d["text"])
        if total >= max_bytes:
            break
    return out


def _write_jsonl(path: Path, docs: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = "".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs).encode("utf-8")
    if path.name.endswith(".zst"):
        import zstandard

        data = zstandard.ZstdCompressor(level=3).compress(data)
    elif path.name.endswith(".gz"):
        import gzip

        data = gzip.compress(data, mtime=0)
    path.write_bytes(data)
    return path


def source_documents(max_bytes: int = 200_000) -> dict[str, list[dict]]:
    """{source: [{"text", "meta"}, ...]} for the seven RedPajama sources, each about max_bytes of text."""
    books = _books()
    austen = [b for b in books if b[0] != "2701"]
    moby = next(b for b in books if b[0] == "2701")
    topics = _topics()
    src: dict[str, list[dict]] = {}
    # a book is long: cut each to max_bytes / 3 so several fit
    per_book = max(2_000, max_bytes // 3)
    src["book"] = _cap([{"text": t[:per_book].rsplit("\n\n", 1)[0] + "\n", "meta": {"title": title, "pg_id": i}}
                        for i, title, t in books], max_bytes)
    src["github"] = _cap([{"text": text, "meta": {"repo_name": "python/cpython", "path": f"Lib/{rel}",
                                                   "language": "Python"}} for rel, text in _stdlib_files(max_bytes)],
                         max_bytes)
    src["wikipedia"] = _cap([{"text": f"{name}\n\n{text}", "meta": {"title": name, "language": "en"}}
                             for name, text in topics], max_bytes)
    src["arxiv"] = _cap([{"text": f"\\section{{{rel}}}\n\n{doc}", "meta": {"arxiv_id": f"2301.{k:05d}"}}
                         for k, (rel, doc) in enumerate(_docstrings(max_bytes))], max_bytes)
    src["stackexchange"] = _cap([{"text": f"Q: What is '{name}' in Python?\n\nA: {text[:3000]}",
                                  "meta": {"question_score": str(len(name))}} for name, text in reversed(topics)],
                                max_bytes)
    paras = [p for _, _, t in austen for p in _paragraphs(t)]
    src["c4"] = _cap([{"text": "\n".join(paras[k : k + 4]), "meta": {"url": f"https://example.org/{k}"}}
                      for k in range(0, len(paras), 4)], max_bytes)
    mp = _paragraphs(moby[2])
    src["common_crawl"] = _cap([{"text": "\n\n".join(mp[k : k + 6]), "meta": {"source": "cc/2019-30"}}
                                for k in range(0, len(mp), 6)], max_bytes)
    return src


ONE_T_FILES = {"arxiv": "arxiv/arxiv_0.jsonl.gz", "book": "book/book.jsonl", "c4": "c4/c4-train.00000-of-01024.jsonl",
               "common_crawl": "common_crawl/2019-30/en_head_0000.jsonl.zst", "github": "github/filtered_0.jsonl",
               "stackexchange": "stackexchange/stackexchange.jsonl", "wikipedia": "wikipedia/wiki.jsonl"}
SAMPLE_FILES = {"arxiv": "arxiv_sample.jsonl", "book": "book_sample.jsonl", "c4": "c4_sample.jsonl",
                "common_crawl": "cc_2019-30_sample.jsonl", "github": "github_sample.jsonl",
                "stackexchange": "stackexchange_sample.jsonl", "wikipedia": "wikipedia_sample.jsonl"}


def make_redpajama(out: str | Path, layout: str = "1T", max_bytes: int = 200_000,
                   sources: tuple[str, ...] | None = None) -> Path:
    """Write a RedPajama-format fixture under `out` (see the module doc); returns `out`."""
    out = Path(out)
    docs = source_documents(max_bytes)
    for name in sources or tuple(docs):
        d = docs[name]
        if layout == "sample":
            _write_jsonl(out / SAMPLE_FILES[name], d)
        elif layout == "v2" and name == "common_crawl":
            v2 = [{"raw_content": x["text"], "url": x["meta"]["source"], "language": "en"} for x in d]
            _write_jsonl(out / "documents/2023-06/0000/en_head.json.gz", v2)
            sig = []
            for k, x in enumerate(v2):
                words = x["raw_content"].split()
                sig.append({"id": f"2023-06/0000/en_head.json.gz/{k}", "quality_signals": {
                    "rps_doc_word_count": [[0, len(x["raw_content"]), float(len(words))]],
                    "rps_doc_mean_word_length": [[0, len(x["raw_content"]),
                                                  sum(map(len, words)) / max(1, len(words))]]}})
            _write_jsonl(out / "quality_signals/2023-06/0000/en_head.signals.json.gz", sig)
        elif layout in ("1T", "v2"):
            _write_jsonl(out / ONE_T_FILES[name], d)
        else:
            raise ValueError(f"layout must be 1T, sample or v2, got {layout!r}")
    return out


def add_duplicates(out: str | Path) -> Path:
    """wikipedia/wiki_dups.jsonl under a make_redpajama download (see the module doc); returns its path."""
    out = Path(out)
    books = [json.loads(line) for line in (out / ONE_T_FILES["book"]).read_text(encoding="utf-8").splitlines()]
    words = books[1]["text"].split(" ")
    for k in range(100, len(words), len(words) // 4):  # 4 words changed: ~98% of the 5-word shingles stay
        words[k] = "changed"
    docs = [{"text": books[0]["text"], "meta": {"title": "exact copy"}},
            {"text": " ".join(words), "meta": {"title": "near copy"}}]
    return _write_jsonl(out / "wikipedia" / "wiki_dups.jsonl", docs)


def make_bench_corpus(out: str | Path, target_bytes: int, file_bytes: int = 64 << 20, seed: int = 0) -> dict:
    """book/*.jsonl and github/*.jsonl of about target_bytes in all (3:1), from the bundled books and stdlib
    sources repeated with variations. Returns {"bytes", "documents", "files"}."""
    out = Path(out)
    rng = random.Random(seed)
    books = [(title, _paragraphs(t)) for _, title, t in _books()]
    code = [(rel, text.split("\n\n")) for rel, text in _stdlib_files(8 << 20)]
    stats = {"bytes": 0, "documents": 0, "files": 0}
    writers: dict[str, tuple] = {}

    def emit(source: str, rec: dict) -> None:
        line = (json.dumps(rec, ensure_ascii=False) + "\n").encode("utf-8")
        f, n, size = writers.get(source, (None, 0, 0))
        if f is None or size >= file_bytes:
            if f is not None:
                f.close()
            path = out / source / f"{source}_{n:04d}.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            f, n, size = open(path, "wb"), n + 1, 0
            stats["files"] += 1
        f.write(line)
        writers[source] = (f, n, size + len(line))
        stats["bytes"] += len(line)
        stats["documents"] += 1

    copy = 0
    while stats["bytes"] < target_bytes:
        copy += 1
        for title, paras in books:
            keep = [p for p in paras if rng.random() > 0.1]  # drop ~10% of the paragraphs
            start = rng.randrange(len(keep))
            keep = keep[start:] + keep[:start]  # rotate: another opening
            text = f"{title} (copy {copy})\n\n" + "\n\n".join(keep)
            emit("book", {"text": text, "meta": {"title": title, "copy": copy}})
        for _ in range(3):  # about a third as much code as prose
            for rel, blocks in rng.sample(code, k=min(len(code), 60)):
                b = blocks[:]
                rng.shuffle(b)
                emit("github", {"text": f"# {rel} variant {copy}\n" + "\n\n".join(b), "meta": {"path": rel}})
            if stats["bytes"] >= target_bytes:
                break
    for f, _, _ in writers.values():
        f.close()
    return stats


def split_documents(src: str | Path, out: str | Path, target_chars: int = 2500, files: int = 1) -> dict:
    """Every document of src/*/*.jsonl, cut at paragraph ends into documents of about target_chars, written to
    `files` files out/c4/c4_NNNN.jsonl in turn (see the module doc). Returns {"bytes", "documents", "files"}."""
    out = Path(out)
    (out / "c4").mkdir(parents=True, exist_ok=True)
    stats = {"bytes": 0, "documents": 0, "files": files}
    handles = [open(out / "c4" / f"c4_{k:04d}.jsonl", "wb") for k in range(files)]
    try:
        for path in sorted(Path(src).glob("*/*.jsonl")):
            for line in path.read_text(encoding="utf-8").splitlines():
                piece, size = [], 0
                for para in json.loads(line)["text"].split("\n\n") + [None]:
                    if para is not None:
                        piece.append(para)
                        size += len(para)
                    if piece and (size >= target_chars or para is None):
                        n = stats["documents"]
                        rec = {"text": "\n\n".join(piece), "meta": {"url": f"https://example.org/{n}"}}
                        data = (json.dumps(rec, ensure_ascii=False) + "\n").encode("utf-8")
                        handles[n % files].write(data)
                        stats["bytes"] += len(data)
                        stats["documents"] += 1
                        piece, size = [], 0
    finally:
        for f in handles:
            f.close()
    return stats
