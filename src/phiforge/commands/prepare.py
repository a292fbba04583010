"""`phiforge prepare gutenberg --source bundled --out DIR`: books -> cleaned, tokenized, packed token shards."""

from __future__ import annotations

import time


def _positive_int(text: str) -> int:
    import argparse

    try:
        v = int(text.replace("_", ""))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {v}")
    return v


def register(sub) -> None:
    from phiforge.data.shards import DEFAULT_SHARD_TOKENS
    from phiforge.data.sources import GUTENBERG_SOURCES

    p = sub.add_parser("prepare", help="turn a corpus into packed token shards for training")
    corpora = p.add_subparsers(dest="corpus", metavar="CORPUS")
    corpora.required = True
    g = corpora.add_parser("gutenberg", help="Project Gutenberg books: clean, tokenize, hold out whole books")
    sources = "; ".join(f"{name}: {cls.help}" for name, cls in GUTENBERG_SOURCES.items())
    g.add_argument("--source", default="bundled", metavar="NAME", help=f"where the books come from ({sources})")
    g.add_argument("--out", required=True, metavar="DIR", help="output dataset directory (an existing dataset there "
                   "is replaced; any other non-empty directory is refused)")
    val = g.add_mutually_exclusive_group()
    val.add_argument("--val-books", type=_positive_int, metavar="N",
                     help="hold out N whole books for validation, chosen deterministically (default: 1, Persuasion)")
    val.add_argument("--val-ids", metavar="ID,...", help="hold out these ebook numbers for validation, e.g. 105,121")
    g.add_argument("--tokenizer-dir", metavar="DIR",
                   help="directory with a tokenizer.json (default: built-in GPT-2 BPE)")
    g.add_argument("--shard-tokens", type=_positive_int, default=DEFAULT_SHARD_TOKENS, metavar="N",
                   help=f"tokens per shard file (default {DEFAULT_SHARD_TOKENS:,})")
    g.add_argument("--progress", action="store_true", help="show the progress bar even when not on a terminal")
    g.set_defaults(func=run_gutenberg)


def run_gutenberg(args) -> int:
    from phiforge.data.prepare import prepare
    from phiforge.data.sources import GUTENBERG_SOURCES, choose_val_ids, get_source

    source = get_source(args.source, GUTENBERG_SOURCES)
    val_ids = args.val_ids.split(",") if args.val_ids is not None else None
    chosen, method = choose_val_ids(source, val_books=args.val_books, val_ids=val_ids)
    t0 = time.perf_counter()
    index = prepare(source, args.out, chosen, val_method=method, tokenizer_dir=args.tokenizer_dir,
                    shard_tokens=args.shard_tokens, progress=True if args.progress else None)
    print_summary(index, args.out, time.perf_counter() - t0)
    return 0


def print_summary(index: dict, out, seconds: float) -> None:
    docs = index["documents"]
    w = max([len(d["title"]) for d in docs] + [5])
    print(f"{'id':>6}  {'title':<{w}}  {'split':<5}  {'tokens':>10}  {'header':>7}  {'footer':>7}")
    for d in docs:
        print(f"{d['id']:>6}  {d['title']:<{w}}  {d['split']:<5}  {d['tokens']:>10,}  "
              f"{d.get('removed_header_chars', 0):>7,}  {d.get('removed_footer_chars', 0):>7,}")
    total = sum(info["tokens"] for info in index["splits"].values())
    for split, info in index["splits"].items():
        print(f"{split}: {info['documents']} book(s), {info['tokens']:,} tokens in {len(info['shards'])} shard(s)")
    print(f"wrote {out} ({index['dtype']}, {total:,} tokens) in {seconds:.1f} s; header/footer = characters "
          "of Gutenberg boilerplate removed")
