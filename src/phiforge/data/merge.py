"""`phiforge data merge PARTS... --out DIR`: the parts of `prepare --task-count N` (phiforge.data.tasks) joined into
the dataset one `prepare` run over the whole input writes: the same documents in the same order, the same token
stream per split and per source, the same validation documents (documents.jsonl is byte-identical; only where the
shard files begin and end differs).

    merge_parts(["parts/"], "data/redpajama")            # a folder stands for every part-*-of-* in it

1. The parts are found and checked before anything is written: complete (a part still in progress, or one that
   is missing, is named), one task count, each task once, the same inputs, options and tokenizer.
2. Duplicates (when the parts were prepared with --dedup): every document's content hash and MinHash signature,
   from the parts' dedup.bin, goes through one Deduper in input order, which is exactly what a single run
   decides: near duplicates are removed across parts, and the earliest input unit keeps its copy. The splits are
   then checked (a val or train split that comes out empty is refused, as `prepare` refuses it; merge does not
   hold out a document in its place).
3. DIR is written in a hidden sibling and renamed into place (an earlier dataset there is replaced only then):
   each part shard that keeps all its tokens becomes a hard link to that shard (no copy; copied where the parts
   are on another filesystem), a shard that lost a duplicate is rewritten without it, documents.jsonl gets
   offsets into the merged streams, index.json is written last, and prepare-report.json adds up the parts'.

DIR holds ordinary files only, so it can be moved, copied to another machine or archived like any dataset, and
the parts can be deleted afterwards (a hard-linked shard's data stays until its last name is gone; `du` counts
it once per filesystem walk).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from phiforge.data.dedup import Deduper
from phiforge.data.output import check_out_dir, dataset_lock
from phiforge.data.prepare import REPORT, recorded_mixture
from phiforge.data.report import Report
from phiforge.data.shards import DOCUMENTS, FORMAT, INDEX, VERSION, TokenDataset, open_token_dataset, sha256_file
from phiforge.data.tasks import DEDUP_FILE, PART, read_dedup_records
from phiforge.errors import DataError
from phiforge.fileio import fsync_dir, output_dir, write_json_atomic


@dataclass
class Part:
    dir: Path
    ds: TokenDataset
    gone: dict[int, dict] = field(default_factory=dict)  # documents.jsonl line -> record, removed as duplicates

    @property
    def index(self) -> dict:
        return self.ds.index

    @property
    def task(self) -> dict:
        return self.ds.index["task"]

    @property
    def name(self) -> str:
        return f"part-{self.task['index']:05d}-of-{self.task['count']:05d}"


def merge_parts(args: list[str | Path], out: str | Path, summary=print, workers: int | None = None) -> dict:
    """Merge the parts the arguments name (part directories, or folders of them) into the dataset `out`; returns
    its index. summary(line) gets the report (None: silence). workers: processes that rewrite the parts' document
    records, one part at a time each (None: all cores). Bad parts raise DataError before `out` is touched."""
    t0 = time.perf_counter()
    if workers is not None and workers < 1:
        raise DataError(f"--workers must be at least 1, got {workers}")
    paths = find_parts(args)
    parts = check_parts([open_part(p) for p in paths])
    out = Path(out)
    check_out_dir(out)
    with dataset_lock(out):
        report = decide_duplicates(parts)
        check_merged_splits(parts)
        with output_dir(out, "dataset", inputs=paths) as tmp:
            index = write_merged(parts, tmp, report, t0, workers or os.cpu_count() or 1)
    if summary is not None:
        for line in report.summary_lines():
            summary(line)
        summary(f"report: {out / REPORT}")
    return index


class MergeParts:
    """`merge_parts(parts, out)` as a datatrove pipeline step, to run after the prepare tasks (PrepareTasks) with
    `depends=` (examples/slurm/prepare_redpajama_datatrove.py)."""

    def __init__(self, parts: list[str], out: str):
        self.parts, self.out = [str(p) for p in parts], str(out)

    def __call__(self, data, rank: int = 0, world_size: int = 1):
        merge_parts(self.parts, self.out)
        return data


# ---------------------------------------------------------------------------------------------- the parts


def find_parts(args: list[str | Path]) -> list[Path]:
    """The part directories the arguments name; a folder that is not a part stands for the parts in it."""
    if not args:
        raise DataError("give the parts to merge: part directories, or the --out folder of the tasks")
    found = []
    for arg in map(Path, args):
        if (arg / INDEX).is_file():
            found.append(arg)
            continue
        _refuse_in_progress(arg.parent, [arg.name])
        if not arg.is_dir():
            raise DataError(f"part {arg} not found")
        names = sorted(p.name for p in arg.iterdir() if PART.fullmatch(p.name) and p.is_dir())
        _refuse_in_progress(arg, [p.name[1:-len(".partial")] for p in arg.iterdir() if p.name.endswith(".partial")])
        if not names:
            raise DataError(f"{arg} is neither a part (no {INDEX}) nor a folder of parts (no part-*-of-* in it)")
        found.extend(arg / n for n in names)
    for p in found:
        _refuse_in_progress(p.parent, [p.name])
    return found


def _refuse_in_progress(folder: Path, names: list[str]) -> None:
    for name in names:
        if PART.fullmatch(name) and (folder / f".{name}.partial").exists():
            raise DataError(f"part {folder / name} is still being prepared, or its task was interrupted "
                            f"({folder / ('.' + name + '.partial')} exists): run that task to the end, then merge")


def open_part(path: Path) -> Part:
    ds = open_token_dataset(path)
    task = ds.index.get("task")
    if not isinstance(task, dict) or not all(isinstance(task.get(k), int) for k in ("index", "count")):
        raise DataError(f"{path} is a dataset, not a part of `prepare --task-count N` (its {INDEX} has no task)")
    return Part(path, ds)


def check_parts(parts: list[Part]) -> list[Part]:
    """The parts in task order, once each, all of one run; DataError naming the first problem."""
    first = parts[0]
    by_index: dict[int, Part] = {}
    for p in parts:
        if p.index["tokenizer"].get("sha256") != first.index["tokenizer"].get("sha256"):
            raise DataError(f"part {p.dir} was prepared with another tokenizer than part {first.dir} (tokenizer "
                            f"sha256 {str(p.index['tokenizer'].get('sha256'))[:12]} vs "
                            f"{str(first.index['tokenizer'].get('sha256'))[:12]}); prepare every part with the same "
                            "--tokenizer-dir")
        if p.task["count"] != first.task["count"]:
            raise DataError(f"part {p.dir} is one of {p.task['count']} tasks, part {first.dir} one of "
                            f"{first.task['count']}: merge the parts of one --task-count")
        same = by_index.get(p.task["index"])
        if same is not None:
            raise DataError(f"{p.name} is given twice ({same.dir} and {p.dir}); give each part once")
        if (p.index.get("prepared"), p.task.get("units_sha256")) != \
                (first.index.get("prepared"), first.task.get("units_sha256")):
            raise DataError(f"part {p.dir} was prepared from other inputs or options than part {first.dir}; "
                            "merge the parts of one run")
        by_index[p.task["index"]] = p
    count = first.task["count"]
    missing = [f"part-{i:05d}-of-{count:05d}" for i in range(count) if i not in by_index]
    if missing:
        raise DataError(f"missing {len(missing)} of the {count} parts ({', '.join(missing[:4])}"
                        f"{', ...' if len(missing) > 4 else ''}): run their tasks (or name them) first")
    return [by_index[i] for i in range(count)]


# ---------------------------------------------------------------------------------------------- decisions


def decide_duplicates(parts: list[Part]) -> Report:
    """Mark each part's duplicate documents (Part.gone), deciding in input order as one prepare run; returns the
    merged report: the parts' reports added up, less the duplicates."""
    report = Report()
    for p in parts:
        report.add_json(_part_report(p), note_prefix=f"{p.name}: ")
    dedup = parts[0].index["prepared"].get("dedup", {})
    if not (dedup.get("exact") or dedup.get("near")):
        return report
    deduper = Deduper(bool(dedup.get("exact")), bool(dedup.get("near")), float(dedup.get("threshold", 0.8)))
    val_ids = set(parts[0].index["prepared"]["val"].get("ids") or ())
    for p in parts:
        info = p.task.get("dedup")
        if not isinstance(info, dict):
            raise DataError(f"part {p.dir} has no dedup record in its {INDEX}; run its task again")
        records = read_dedup_records(p.dir / DEDUP_FILE, info, p.ds.n_documents)
        for n, (doc, (chash, sig)) in enumerate(zip(p.ds.iter_documents(), records)):
            dup = deduper.check(doc["id"], chash, sig)
            if dup is None:
                continue
            p.gone[n] = doc
            report.duplicate(dup, doc["id"], doc.get("title", ""), doc.get("chars", 0), doc["id"] in val_ids)
            _uncount(report, doc)
    return report


def _part_report(p: Part) -> dict:
    try:
        return json.loads((p.dir / REPORT).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise DataError(f"part {p.dir} has no readable {REPORT}; run its task again") from None


def _uncount(report: Report, doc: dict) -> None:
    """Take a removed document out of the kept counts (the tasks kept every document)."""
    report.kept["documents"] -= 1
    report.kept["tokens"] -= doc["tokens"]
    report.kept["chars"] -= doc.get("chars", 0)
    src = report.sources[doc.get("source")]
    src["documents"] -= 1
    src["tokens"] -= doc["tokens"]


def check_merged_splits(parts: list[Part]) -> None:
    """The checks a single run makes at its end: every validation id seen, neither split empty."""
    prepared = parts[0].index["prepared"]
    ids = prepared["val"].get("ids")
    if ids is not None:
        seen = set().union(*(p.task.get("val_ids_seen", []) for p in parts))
        missing = sorted(set(ids) - seen)
        if missing:
            raise DataError(f"validation id(s) {', '.join(missing)} were not produced by the source")
    kept = Counter()
    for p in parts:
        for split in ("train", "val"):
            kept[split] += p.ds.split_documents(split)
        kept.subtract(d["split"] for d in p.gone.values())
    for split in ("val", "train"):
        if kept[split] <= 0:
            how = ("a larger --val-fraction (a single prepare run would hold out one document; merge does not)"
                   if split == "val" else "fewer validation documents")
            raise DataError(f"the {split} split of the {len(parts)} parts comes out empty ({kept['train']:,} train, "
                            f"{kept['val']:,} val document(s) kept); prepare them again with {how}")


# ---------------------------------------------------------------------------------------------- writing


def write_merged(parts: list[Part], out: Path, report: Report, t0: float, workers: int = 1) -> dict:
    """The merged dataset in directory `out` (documents.jsonl, shards, tokenizer.json, report, index.json last)."""
    splits = {s: {"shards": [], **_kept_totals(parts, s)} for s in ("train", "val")}
    stats = Counter(linked=0, copied=0, rewritten=0)
    shutil.copyfile(parts[0].dir / "tokenizer.json", out / "tokenizer.json")
    _write_documents(parts, out, workers)
    for p in parts:
        for split, entry in splits.items():
            cuts = sorted((int(d["offset"]), int(d["offset"]) + int(d["tokens"]))
                          for d in p.gone.values() if d["split"] == split)
            _place_shards(p, split, cuts, out, entry["shards"], stats)
    for split, entry in splits.items():
        if sum(s["tokens"] for s in entry["shards"]) != entry["tokens"]:
            raise DataError(f"the parts' {split} shards do not hold the tokens their indexes say: a part is damaged; "
                            "run its task again")
    first = parts[0].index
    count = sum(p.ds.n_documents - len(p.gone) for p in parts)
    index = {"format": FORMAT, "version": VERSION, "dtype": first["dtype"], "tokenizer": first["tokenizer"],
             "splits": splits, "documents": {"file": DOCUMENTS, "count": count,
                                             "sha256": sha256_file(out / DOCUMENTS)},
             "prepared": first["prepared"]}
    mixture, notes = recorded_mixture(parts[0].task.get("weights"), splits["train"].get("sources", {}))
    report.notes.extend(notes)
    if mixture is not None:
        index["mixture"] = {"weights": mixture}
    index["merged"] = {"parts": [p.name for p in parts], "task_count": len(parts), "shards": dict(stats)}
    report.notes.append(f"merged {len(parts)} part(s): {stats['linked']} shard(s) linked, {stats['copied']} "
                        f"copied (another filesystem), {stats['rewritten']} rewritten without duplicates")
    write_json_atomic(out / REPORT, {**report.to_json(), "timing": {"seconds": round(time.perf_counter() - t0, 3)},
                                     "workers": workers})
    fsync_dir(out)
    write_json_atomic(out / INDEX, index)
    return index


def _kept_totals(parts: list[Part], split: str) -> dict:
    """A split's "tokens", "documents" and "sources" over all parts, less the duplicates."""
    tokens, documents, sources = 0, 0, defaultdict(Counter)
    for p in parts:
        info = p.index["splits"][split]
        tokens, documents = tokens + info["tokens"], documents + info["documents"]
        for src, agg in info.get("sources", {}).items():
            sources[src].update(agg)
        for d in p.gone.values():
            if d["split"] == split:
                tokens, documents = tokens - d["tokens"], documents - 1
                sources[d.get("source")].subtract(tokens=d["tokens"], documents=1)
    entry = {"tokens": tokens, "documents": documents}
    if any(v["documents"] for v in sources.values()):
        entry["sources"] = {k: {"tokens": v["tokens"], "documents": v["documents"]}
                            for k, v in sorted(sources.items()) if v["documents"]}
    return entry


# the end of every record `DatasetWriter` writes: its split, token count and offset in the split's stream
_TAIL = re.compile(rb',"split":"(\w+)","tokens":(\d+),"offset":(\d+)}\n?$')


def _write_documents(parts: list[Part], out: Path, workers: int) -> None:
    """documents.jsonl: each part's kept records with their offsets moved into the merged split streams, rewritten
    by `workers` processes (a part each) into temporary files that are then joined in part order."""
    jobs, base = [], Counter(train=0, val=0)
    for k, p in enumerate(parts):
        removed = {n: (d["split"], int(d["tokens"])) for n, d in p.gone.items()}
        jobs.append((p.dir / DOCUMENTS, p.index["documents"].get("sha256"), removed, dict(base),
                     out / f".documents-{k:05d}.tmp"))
        for split in base:
            base[split] += p.index["splits"][split]["tokens"] - sum(t for s, t in removed.values() if s == split)
    if workers > 1 and len(jobs) > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        ctx = multiprocessing.get_context("fork" if sys.platform == "linux" else "spawn")
        with ProcessPoolExecutor(min(workers, len(jobs)), mp_context=ctx) as pool:
            list(pool.map(_rewrite_records, jobs))
    else:
        for job in jobs:
            _rewrite_records(job)
    with open(out / DOCUMENTS, "wb") as f:
        for *_, chunk in jobs:
            with open(chunk, "rb") as c:
                shutil.copyfileobj(c, f, 1 << 24)
            chunk.unlink()
        f.flush()
        os.fsync(f.fileno())


def _rewrite_records(job: tuple) -> None:
    """One part's documents.jsonl without the removed lines, offsets moved by `base` less the tokens removed
    before each record; the part's file is checked against its sha256 on the way."""
    path, sha, removed, base, dst = job
    cut, h = Counter(), hashlib.sha256()
    with open(path, "rb") as f, open(dst, "wb") as out:
        for n, line in enumerate(f):
            h.update(line)
            if n in removed:
                cut[removed[n][0]] += removed[n][1]
                continue
            m = _TAIL.search(line)
            if m is None or m[1].decode() not in base:
                raise DataError(f"{path} line {n + 1} is not a record that prepare wrote; run the part's task again")
            split = m[1].decode()
            out.write(line[: m.start(3)] + b"%d}\n" % (base[split] + int(m[3]) - cut[split]))
    if h.hexdigest() != sha:
        raise DataError(f"checksum mismatch in {path}: it changed after the part was written; run its task again")


def _place_shards(p: Part, split: str, cuts: list[tuple[int, int]], out: Path, shards: list[dict],
                  stats: Counter) -> None:
    """A part's shards of a split as the next shards of the merged split: linked, or rewritten without `cuts`."""
    pos = 0
    for s in p.index["splits"][split]["shards"]:
        lo, hi = pos, pos + s["tokens"]
        pos = hi
        mine = [(max(a, lo) - lo, min(b, hi) - lo) for a, b in cuts if a < hi and b > lo]
        name = f"{split}-{len(shards):05d}.bin"
        if not mine:
            _link_or_copy(p.dir / s["file"], out / name, stats)
            shards.append({**s, "file": name})
            continue
        tokens = np.memmap(p.dir / s["file"], dtype=p.ds.dtype, mode="r", shape=(s["tokens"],))
        entry = _rewrite(tokens, mine, out / name)
        stats["rewritten"] += 1
        if entry["tokens"]:
            starts = sum(lo <= a < hi for a, _ in cuts)  # removed documents that began in this shard
            shards.append({"file": name, "tokens": entry["tokens"], "documents": s["documents"] - starts,
                           "sha256": entry["sha256"], **({"source": s["source"]} if "source" in s else {})})
        else:
            (out / name).unlink()


def _rewrite(tokens: np.ndarray, cuts: list[tuple[int, int]], path: Path) -> dict:
    h, kept, pos = hashlib.sha256(), 0, 0
    with open(path, "wb") as f:
        for a, b in sorted(cuts) + [(len(tokens), len(tokens))]:
            piece = np.ascontiguousarray(tokens[pos:a]).tobytes()
            f.write(piece)
            h.update(piece)
            kept += max(0, a - pos)
            pos = max(pos, b)
        f.flush()
        os.fsync(f.fileno())
    return {"tokens": kept, "sha256": h.hexdigest()}


def _link_or_copy(src: Path, dst: Path, stats: Counter) -> None:
    try:
        os.link(src, dst)
        stats["linked"] += 1
    except OSError:  # another filesystem (or one without hard links)
        shutil.copyfile(src, dst)
        stats["copied"] += 1
