"""`phiforge data inspect DIR`: what a prepared dataset holds."""

from __future__ import annotations

from collections import Counter


def register(sub) -> None:
    p = sub.add_parser("data", help="inspect prepared datasets")
    cmds = p.add_subparsers(dest="data_command", metavar="COMMAND")
    cmds.required = True
    i = cmds.add_parser("inspect", help="documents, tokens per split, source shares and a decoded sample")
    i.add_argument("dir")
    i.add_argument("--verify", action="store_true", help="also check every shard's sha256")
    i.add_argument("--sample-tokens", type=int, default=60)
    i.set_defaults(func=run_inspect)


def run_inspect(args) -> int:
    from phiforge.data.loader import TokenStream
    from phiforge.data.shards import open_token_dataset
    from phiforge.tokenizer import load_tokenizer

    ds = open_token_dataset(args.dir)
    if args.verify:
        ds.verify()
    docs = ds.index["documents"]
    print(f"dataset {ds.dir}: {len(docs)} documents, dtype {ds.index['dtype']}, "
          f"tokenizer vocab {ds.vocab_size}")
    for split in ds.splits():
        info = ds.index["splits"][split]
        print(f"  {split:<6} {info['documents']:>6} docs {info['tokens']:>14,} tokens in {len(info['shards'])} shard(s)")
    by_source = Counter()
    for d in docs:
        by_source[d["source"]] += d["tokens"]
    total = sum(by_source.values()) or 1
    for src, n in by_source.most_common():
        print(f"  source {src:<14} {n:>14,} tokens ({100 * n / total:.1f}%)")
    split = "train" if "train" in ds.splits() else ds.splits()[0]
    stream = TokenStream(ds, split)
    n = min(args.sample_tokens, stream.total)
    text = load_tokenizer(ds.dir).decode(stream.read(0, n).tolist())
    print(f"  sample ({split}, first {n} tokens): {text!r}")
    if args.verify:
        print("  checksums: ok")
    return 0
