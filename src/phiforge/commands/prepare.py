"""`phiforge prepare gutenberg ...`: raw books -> cleaned, tokenized, packed shards."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("prepare", help="turn a corpus into packed token shards")
    corpora = p.add_subparsers(dest="corpus", metavar="CORPUS")
    corpora.required = True
    g = corpora.add_parser("gutenberg", help="Project Gutenberg books")
    g.add_argument("--source", default="bundled", help="where the books come from: bundled (the sample shipped "
                   "with phiforge)")
    g.add_argument("--out", required=True, help="output dataset directory")
    g.add_argument("--val-ids", default="105", help="comma-separated ebook numbers held out for validation")
    g.add_argument("--tokenizer-dir", default=None, help="directory with a tokenizer.json (default: GPT-2 BPE)")
    g.add_argument("--shard-tokens", type=int, default=50_000_000, help="tokens per shard file")
    g.set_defaults(func=run_gutenberg)


def run_gutenberg(args) -> int:
    from phiforge.data.prepare import SOURCES, prepare
    from phiforge.errors import DataError

    if args.source not in SOURCES:
        raise DataError(f"unknown --source '{args.source}' (choose from: {', '.join(SOURCES)})")
    val_ids = [v.strip() for v in args.val_ids.split(",") if v.strip()]
    index = prepare(SOURCES[args.source](), args.out, val_ids=val_ids, tokenizer_dir=args.tokenizer_dir,
                    shard_tokens=args.shard_tokens)
    print_summary(index, args.out)
    return 0


def print_summary(index: dict, out) -> None:
    print(f"{'split':<6} {'docs':>5} {'tokens':>12}  titles")
    for split, info in index["splits"].items():
        titles = ", ".join(d["title"] for d in index["documents"] if d["split"] == split)
        print(f"{split:<6} {info['documents']:>5} {info['tokens']:>12,}  {titles}")
    print(f"wrote {out}")
