"""`phiforge prepare gutenberg|redpajama ... --out DIR`: corpus -> cleaned, deduplicated, tokenized, packed shards.

    phiforge prepare gutenberg --source bundled --out data/gutenberg
    phiforge prepare gutenberg --source mirror --mirror /srv/gutenberg --catalog pg_catalog.csv --language en --out D
    phiforge prepare gutenberg --source parquet --parquet data/pg19/ --out D
    phiforge prepare gutenberg --download 1342,2701 --mirror-url URL --cache DIR --out D
    phiforge prepare redpajama --input /data/RedPajama-Data-1T-Sample --out D [--weights common_crawl=67,...]

An interrupted run resumes when re-run with the same arguments (see docs/data.md).
"""

from __future__ import annotations

import json
import time
from pathlib import Path


def positive_int(text: str) -> int:
    import argparse

    try:
        v = int(text.replace("_", ""))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {v}")
    return v


def _nonneg_int(text: str) -> int:
    import argparse

    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be at least 0, got {v}")
    return v


def _common(p) -> None:
    from phiforge.data.shards import DEFAULT_SHARD_TOKENS

    p.add_argument("--out", required=True, metavar="DIR", help="output dataset directory (an existing dataset there "
                   "is replaced at the end; any other non-empty directory is refused)")
    p.add_argument("--tokenizer-dir", metavar="DIR",
                   help="directory with a tokenizer.json (default: built-in GPT-2 BPE)")
    p.add_argument("--shard-tokens", type=positive_int, default=DEFAULT_SHARD_TOKENS, metavar="N",
                   help=f"tokens per shard file (default {DEFAULT_SHARD_TOKENS:,})")
    p.add_argument("--workers", type=_nonneg_int, default=None, metavar="N",
                   help="worker processes for cleaning and tokenizing (default: all cores; 0: in this process)")
    p.add_argument("--near-dup-threshold", type=float, default=0.8, metavar="J",
                   help="estimated Jaccard similarity above which a document is a near duplicate (default 0.8)")
    p.add_argument("--checkpoint-seconds", type=float, default=60.0, metavar="S",
                   help="journal progress for resume at most every S seconds (default 60; 0: after every unit)")
    p.add_argument("--restart", action="store_true",
                   help="discard an interrupted run of this --out instead of resuming it")
    p.add_argument("--progress", action="store_true", help="show the progress bar even when not on a terminal")


def register(sub) -> None:
    from phiforge.data.redpajama import SOURCES as RP_SOURCES
    from phiforge.data.sources import GUTENBERG_SOURCES

    p = sub.add_parser("prepare", help="turn a corpus into packed token shards for training")
    corpora = p.add_subparsers(dest="corpus", metavar="CORPUS")
    corpora.required = True
    g = corpora.add_parser("gutenberg", help="Project Gutenberg books: clean, dedup, tokenize, hold out whole books")
    sources = "; ".join(f"{name}: {cls.help}" for name, cls in GUTENBERG_SOURCES.items())
    g.add_argument("--source", default=None, metavar="NAME",
                   help=f"where the books come from (default bundled; {sources})")
    _common(g)
    val = g.add_mutually_exclusive_group()
    val.add_argument("--val-books", type=positive_int, metavar="N",
                     help="hold out N whole books for validation, chosen deterministically (default: Persuasion for "
                          "bundled, else 0.5%% of the books, at least 1)")
    val.add_argument("--val-ids", metavar="ID,...", help="hold out these ebook numbers for validation, e.g. 105,121")
    g.add_argument("--dedup", default=None, metavar="MODES",
                   help="exact, near, exact,near (default) or none: drop repeated books and other editions")
    m = g.add_argument_group("mirror / download selection")
    m.add_argument("--mirror", metavar="DIR", help="--source mirror: the rsync tree")
    m.add_argument("--catalog", metavar="CSV", help="pg_catalog.csv (Text#, Type, Issued, Title, Language, ...)")
    m.add_argument("--language", metavar="CODES", help="keep books in these catalog languages, e.g. en or en,fr")
    m.add_argument("--type", default=None, metavar="TYPES", help="keep these catalog types (default Text)")
    m.add_argument("--ids", metavar="RANGES", help="book ids, e.g. 1-1000,2701 (mirror: a filter; download: what "
                   "to fetch)")
    m.add_argument("--parquet", nargs="+", metavar="PATH", help="--source parquet: files or folders of .parquet")
    m.add_argument("--download", metavar="IDS", help="shorthand for --source download --ids IDS")
    m.add_argument("--catalog-filter", action="store_true",
                   help="--source download: fetch the catalog's books that pass --language/--type/--ids")
    m.add_argument("--mirror-url", default="https://www.gutenberg.org", metavar="URL",
                   help="--source download: the mirror to fetch from (default https://www.gutenberg.org)")
    m.add_argument("--url-template", default="{mirror}/cache/epub/{id}/pg{id}.txt", metavar="T",
                   help="book URL, with {mirror} and {id} (default {mirror}/cache/epub/{id}/pg{id}.txt)")
    m.add_argument("--cache", metavar="DIR", help="download cache (default ~/.cache/phiforge/gutenberg)")
    m.add_argument("--rate-limit", type=float, default=0.5, metavar="R",
                   help="at most R requests per second (default 0.5)")
    m.add_argument("--retries", type=_nonneg_int, default=5, metavar="N", help="retries per file (default 5)")
    g.set_defaults(func=run_gutenberg)

    r = corpora.add_parser("redpajama", help="RedPajama-Data-1T / 1T-Sample / V2 JSON lines: tokenize per source; "
                                             "mixture weights are applied by the loader when sampling")
    r.add_argument("--input", required=True, metavar="DIR", help="the download: per-source folders "
                   f"({', '.join(RP_SOURCES)}), 1T-Sample *_sample.jsonl files, or V2 documents/")
    _common(r)
    r.add_argument("--sources", metavar="NAMES", help="only these sources, e.g. book,github")
    r.add_argument("--weights", metavar="SPEC", help="mixture weights recorded for the loader (default lit-gpt's: "
                   "common_crawl=67,c4=15,github=4.5,wikipedia=4.5,book=4.5,arxiv=2.5,stackexchange=2)")
    r.add_argument("--val-fraction", type=float, default=0.001, metavar="F",
                   help="hold out this fraction of documents (by a hash of their id) for validation (default 0.001)")
    r.add_argument("--quality-filter", metavar="NAME", help="rpv2-basic or module:function (see docs/data.md)")
    r.add_argument("--dedup", default=None, metavar="MODES", help="exact, near, exact,near or none (default none: "
                   "RedPajama is deduplicated upstream)")
    r.set_defaults(func=run_redpajama)


def _gutenberg_source(args):
    from phiforge.data.download import Fetcher
    from phiforge.data.mirror import CatalogFilter, parse_id_ranges
    from phiforge.data.sources import GUTENBERG_SOURCES, get_source
    from phiforge.errors import DataError

    name = args.source or ("download" if args.download or args.catalog_filter else "bundled")
    if args.download:
        if args.source not in (None, "download"):
            raise DataError(f"--download goes with --source download, not --source {args.source}")
        if args.ids:
            raise DataError("give --download IDS or --ids IDS, not both")
        args.ids = args.download
    if name not in GUTENBERG_SOURCES:
        return get_source(name)  # the one-line "unknown --source" error
    langs = tuple(x.strip() for x in args.language.split(",") if x.strip()) if args.language else None
    types = tuple(x.strip() for x in args.type.split(",") if x.strip()) if args.type else ("Text",)
    if name == "bundled":
        for opt in ("mirror", "catalog", "language", "ids", "parquet"):
            if getattr(args, opt):
                raise DataError(f"--{opt} does not apply to --source bundled")
        return get_source("bundled")
    if name == "mirror":
        if (langs or args.type) and not args.catalog:
            raise DataError("--language/--type filter by the catalog: give --catalog pg_catalog.csv")
        flt = CatalogFilter(langs, types if args.catalog else None, parse_id_ranges(args.ids))
        return get_source("mirror", mirror=args.mirror, catalog=args.catalog, filter=flt)
    if name == "parquet":
        return get_source("parquet", parquet=args.parquet)
    fetcher = Fetcher(retries=args.retries, rate=args.rate_limit)
    src = get_source("download", ids=args.ids, catalog_filter=args.catalog_filter, catalog=args.catalog,
                     filter=CatalogFilter(langs, types, None), mirror_url=args.mirror_url,
                     url_template=args.url_template, cache=args.cache, fetcher=fetcher,
                     progress=True if args.progress else None)
    src.fetch()
    return src


def run_gutenberg(args) -> int:
    from phiforge.data.prepare import prepare
    from phiforge.data.sources import choose_val_ids

    source = _gutenberg_source(args)
    val_ids = args.val_ids.split(",") if args.val_ids is not None else None
    chosen, method = choose_val_ids(source, val_books=args.val_books, val_ids=val_ids)
    t0 = time.perf_counter()
    index = prepare(source, args.out, chosen, val_method=method, tokenizer_dir=args.tokenizer_dir,
                    shard_tokens=args.shard_tokens, progress=True if args.progress else None,
                    workers=args.workers, dedup=args.dedup, near_threshold=args.near_dup_threshold,
                    checkpoint_seconds=args.checkpoint_seconds, restart=args.restart, summary=print)
    print_summary(index, args.out, time.perf_counter() - t0)
    return 0


def run_redpajama(args) -> int:
    from phiforge.data.prepare import prepare
    from phiforge.data.redpajama import RedPajamaSource, parse_weights

    sources = [s.strip() for s in args.sources.split(",") if s.strip()] if args.sources else None
    weights = parse_weights(args.weights)
    source = RedPajamaSource(args.input, sources=sources, quality_filter=args.quality_filter)
    t0 = time.perf_counter()
    index = prepare(source, args.out, None, val_fraction=args.val_fraction, tokenizer_dir=args.tokenizer_dir,
                    shard_tokens=args.shard_tokens, progress=True if args.progress else None,
                    workers=args.workers, dedup=args.dedup, near_threshold=args.near_dup_threshold,
                    mixture=weights, checkpoint_seconds=args.checkpoint_seconds, restart=args.restart,
                    summary=print)
    print_summary(index, args.out, time.perf_counter() - t0)
    return 0


def print_summary(index: dict, out, seconds: float, max_docs: int = 40) -> None:
    docs = index["documents"]
    if isinstance(docs, dict):  # version 2: documents.jsonl beside the index
        n_docs = docs["count"]
        docs = []
        if n_docs <= max_docs:
            with open(Path(out) / index["documents"]["file"], encoding="utf-8") as f:
                docs = [json.loads(line) for line in f]
    if docs and len(docs) <= max_docs:
        w = min(50, max([len(d.get("title", "")) for d in docs] + [5]))
        print(f"{'id':>6}  {'title':<{w}}  {'split':<5}  {'tokens':>10}  {'header':>7}  {'footer':>7}")
        for d in docs:
            print(f"{d['id']:>6}  {d.get('title', '')[:w]:<{w}}  {d['split']:<5}  {d['tokens']:>10,}  "
                  f"{d.get('removed_header_chars', 0):>7,}  {d.get('removed_footer_chars', 0):>7,}")
    total = sum(info["tokens"] for info in index["splits"].values())
    unit = "book(s)" if index.get("prepared", {}).get("corpus") == "gutenberg" else "document(s)"
    for split, info in index["splits"].items():
        srcs = info.get("sources", {})
        by = (" [" + ", ".join(f"{k} {v['tokens']:,}" for k, v in srcs.items()) + "]") if len(srcs) > 1 else ""
        print(f"{split}: {info['documents']} {unit}, {info['tokens']:,} tokens in {len(info['shards'])} shard(s){by}")
    print(f"wrote {out} ({index['dtype']}, {total:,} tokens) in {seconds:.1f} s"
          + ("; header/footer = characters of Gutenberg boilerplate removed" if docs else ""))
