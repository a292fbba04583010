"""`phiforge data inspect DIR`: what a prepared token dataset holds. `phiforge data merge PARTS... --out DIR`: the
parts of `prepare --task-count N` as one dataset (phiforge.data.merge)."""

from __future__ import annotations

from collections import defaultdict


def register(sub) -> None:
    p = sub.add_parser("data", help="inspect prepared token datasets")
    cmds = p.add_subparsers(dest="data_command", metavar="COMMAND")
    cmds.required = True
    i = cmds.add_parser("inspect", help="documents, tokens per split, per-source shares and a decoded sample")
    i.add_argument("dir", metavar="DIR")
    i.add_argument("--verify", action="store_true",
                   help="also check every shard's sha256 and token ids, and tokenizer.json (reads all shards)")
    i.add_argument("--sample-tokens", type=int, default=60, metavar="N", help="tokens to decode (default 60)")
    i.add_argument("--split", help="split to sample from (default: train)")
    i.set_defaults(func=run_inspect)
    m = cmds.add_parser("merge", help="join the parts of `prepare ... --task-count N` into one dataset")
    m.add_argument("parts", nargs="+", metavar="PART", help="part directories, or the folder holding them (the "
                   "tasks' --out)")
    m.add_argument("--out", required=True, metavar="DIR", help="the merged dataset (an earlier dataset there is "
                   "replaced at the end; any other non-empty directory is refused)")
    m.add_argument("--workers", type=int, default=None, metavar="N", help="processes that rewrite the parts' "
                   "document records (default: all cores)")
    m.set_defaults(func=run_merge)


def run_merge(args) -> int:
    import time

    from phiforge.data.corpora import dataset_summary
    from phiforge.data.merge import merge_parts

    t0 = time.perf_counter()
    index = merge_parts(args.parts, args.out, summary=print, workers=args.workers)
    for line in dataset_summary(index, args.out, time.perf_counter() - t0):
        print(line)
    return 0


def run_inspect(args) -> int:
    from phiforge.config import check_range
    from phiforge.data.shards import open_token_dataset

    check_range("--sample-tokens", args.sample_tokens, 0, note=" (0 decodes none)")
    ds = open_token_dataset(args.dir)
    if args.verify:
        ds.verify()
    _print_header(ds)
    total = sum(ds.split_tokens(s) for s in ds.splits()) or 1
    print(f"{'split':<6} {'docs':>10} {'tokens':>16} {'share':>6} {'shards':>6}")
    for split in ds.splits():
        n = ds.split_tokens(split)
        print(f"{split:<6} {ds.split_documents(split):>10,} {n:>16,} {100 * n / total:>5.1f}% "
              f"{len(ds.index['splits'][split]['shards']):>6}")
    _print_sources(ds, total)
    print(f"documents: {ds.n_documents:,}")
    for i, d in enumerate(ds.iter_documents()):
        if i == 20:
            print(f"  ... {ds.n_documents - 20:,} more")
            break
        print(f"  {d.get('id', '?'):>8}  {d.get('split', '?'):<5} {d.get('tokens', 0):>12,}  {d.get('title', '')}")
    _print_sample(ds, args.split or ("train" if "train" in ds.splits() else ds.splits()[0]), args.sample_tokens)
    if args.verify:
        print("checksums: ok (token ids within the vocabulary, tokenizer.json as recorded)")
    return 0


def _print_header(ds) -> None:
    """The format, the tokenizer, and what the dataset was prepared from."""
    tok = ds.index["tokenizer"]
    print(f"dataset {ds.dir}: format {ds.index['format']} v{ds.index['version']}, {ds.index['dtype']}, "
          f"tokenizer {tok.get('name', '?')} (vocab {tok['vocab_size']:,}, eot {tok['eot_id']})")
    prep = ds.index.get("prepared", {})
    if prep:
        val = prep.get("val", {})
        how = (f"{val.get('fraction')} of the documents" if val.get("method") == "fraction"
               else ", ".join(val.get("ids", [])))
        if val.get("held_out"):
            how += f" (and {', '.join(val['held_out'])}, so that the split is not empty)"
        print(f"prepared from {prep.get('corpus', '?')}/{prep.get('source', '?')}; "
              f"validation by {val.get('method', '?')}: {how}")


def _print_sources(ds, total: int) -> None:
    """Documents and tokens per source, with the share the recorded mixture samples."""
    by_source: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    if ds.version >= 2:  # per-split source totals are in the index: documents.jsonl need not be read
        for split in ds.splits():
            for src, agg in ds.index["splits"][split].get("sources", {}).items():
                by_source[src][0] += agg.get("documents", 0)
                by_source[src][1] += agg.get("tokens", 0)
    else:
        for d in ds.iter_documents():
            by_source[d.get("source", "?")][0] += 1
            by_source[d.get("source", "?")][1] += d.get("tokens", 0)
    weights = ds.index.get("mixture", {}).get("weights", {})
    if not by_source:
        return
    wsum = sum(w for k, w in weights.items() if k in by_source) or 1
    print(f"{'source':<14} {'docs':>10} {'tokens':>16} {'share':>6}" + ("  sampled" if weights else ""))
    for src, (n_docs, n_tok) in sorted(by_source.items(), key=lambda kv: -kv[1][1]):
        mix = f"  {100 * weights.get(src, 0) / wsum:>6.1f}%" if weights else ""
        print(f"{src:<14} {n_docs:>10,} {n_tok:>16,} {100 * n_tok / total:>5.1f}%{mix}")
    if weights:
        print("sampled: share of training samples under the recorded mixture weights "
              "(PackedLoader(..., mixture='index'))")


def _print_sample(ds, split: str, sample_tokens: int) -> None:
    """The first tokens of a split, decoded with the dataset's own tokenizer.json (never another)."""
    from phiforge.errors import DataError
    from phiforge.tokenizer import load_tokenizer

    stream = ds.stream(split) if split in ds.splits() else None
    if stream is None:
        raise DataError(f"dataset {ds.dir} has no '{split}' split (it has: {', '.join(ds.splits())})")
    n = max(0, min(sample_tokens, stream.total))
    tokenizer = load_tokenizer(ds.dir)
    if not (ds.dir / "tokenizer.json").is_file() or tokenizer.get_vocab_size() != ds.vocab_size:
        print(f"sample: skipped ({ds.dir / 'tokenizer.json'} is missing or does not match the dataset's vocab)")
    else:
        text = tokenizer.decode(stream.read(0, n).tolist(), skip_special_tokens=False)
        print(f"sample ({split}, first {n} tokens): {text!r}")
