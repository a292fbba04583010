"""`phiforge prepare gutenberg|redpajama ... --out DIR`: corpus -> cleaned, deduplicated, tokenized, packed shards.

    phiforge prepare gutenberg --source bundled --out data/gutenberg
    phiforge prepare gutenberg --source mirror --mirror /srv/gutenberg --catalog pg_catalog.csv --language en --out D
    phiforge prepare gutenberg --source parquet --parquet data/pg19/ --out D
    phiforge prepare gutenberg --download 1342,2701 --mirror-url URL --cache DIR --out D
    phiforge prepare redpajama --input /data/RedPajama-Data-1T-Sample --out D [--weights common_crawl=67,...]
    phiforge prepare redpajama --config prep.yaml --set workers=4 [--print-config]
    phiforge prepare redpajama --input D --out PARTS --task-count 8 [--task-index I]; phiforge data merge PARTS --out D2

Each flag is the config key of the same name (phiforge.data.corpora): the defaults, then --config, then the
flags, then --set. An interrupted run resumes when re-run with the same arguments (see docs/data.md).
"""

from __future__ import annotations


def positive_int(text: str) -> int:
    import argparse

    try:
        v = int(text.replace("_", ""))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {v}")
    return v


# (flag, metavar or None for a switch, help): each flag is the config key of the same name
COMMON_FLAGS = (
    ("--out", "DIR", "output dataset directory (an existing dataset there is replaced at the end; any other "
     "non-empty directory is refused)"),
    ("--tokenizer-dir", "DIR", "directory with a tokenizer.json (default: built-in GPT-2 BPE)"),
    ("--shard-tokens", "N", "tokens per shard file (default 100,000,000)"),
    ("--workers", "N", "worker processes for cleaning and tokenizing (default: all cores; 0: in this process)"),
    ("--near-dup-threshold", "J", "estimated Jaccard similarity above which a document is a near duplicate "
     "(default 0.8)"),
    ("--checkpoint-seconds", "S", "journal progress for resume at most every S seconds (default 60; 0: after "
     "every unit)"),
    ("--restart", None, "discard an interrupted run of this --out instead of resuming it"),
    ("--task-count", "N", "split the input units into N tasks (one per machine or array job); this run prepares "
     "one of them into OUT/part-I-of-N, and `phiforge data merge OUT --out DIR` joins the parts"),
    ("--task-index", "I", "which task, 0 to N-1 (default: the scheduler's array index, e.g. SLURM_ARRAY_TASK_ID "
     "minus SLURM_ARRAY_TASK_MIN)"),
    ("--progress", None, "show the progress bar even when not on a terminal"),
)
BOOK_SELECTION_FLAGS = (
    ("--mirror", "DIR", "--source mirror: the rsync tree"),
    ("--catalog", "CSV", "pg_catalog.csv (Text#, Type, Issued, Title, Language, ...)"),
    ("--language", "CODES", "keep books in these catalog languages, e.g. en or en,fr"),
    ("--type", "TYPES", "keep these catalog types (default Text)"),
    ("--ids", "RANGES", "book ids, e.g. 1-1000,2701 (mirror: a filter; download: what to fetch)"),
    ("--download", "IDS", "shorthand for --source download --ids IDS"),
    ("--catalog-filter", None, "--source download: fetch the catalog's books that pass --language/--type/--ids"),
    ("--mirror-url", "URL", "--source download: the mirror to fetch from (default https://www.gutenberg.org)"),
    ("--url-template", "T", "book URL, with {mirror} and {id} (default {mirror}/cache/epub/{id}/pg{id}.txt)"),
    ("--cache", "DIR", "download cache (default ~/.cache/phiforge/gutenberg)"),
    ("--rate-limit", "R", "at most R requests per second (default 0.5)"),
    ("--retries", "N", "retries per file (default 5)"),
)


def register(sub) -> None:
    import argparse

    from phiforge.commands import add_config_args, add_flags
    from phiforge.data.redpajama import SOURCES as RP_SOURCES

    p = sub.add_parser("prepare", help="turn a corpus into packed token shards for training")
    corpora = p.add_subparsers(dest="corpus", metavar="CORPUS")
    corpora.required = True
    # every flag is the config key of the same name; only the flags given are set (over --config)
    g = corpora.add_parser("gutenberg", argument_default=argparse.SUPPRESS,
                           help="Project Gutenberg books: clean, dedup, tokenize, hold out whole books")
    add_book_selection(g)
    add_flags(g, COMMON_FLAGS)
    g.add_argument("--dedup", metavar="MODES",
                   help="exact, near, exact,near (default) or none: drop repeated books and other editions")
    add_config_args(g, "GutenbergPrepareConfig: the flags above, with _ for -", "val_books=2")
    g.set_defaults(func=run_prepare)

    r = corpora.add_parser("redpajama", argument_default=argparse.SUPPRESS,
                           help="RedPajama-Data-1T / 1T-Sample / V2 JSON lines: tokenize per source; mixture "
                                "weights are applied by the loader when sampling")
    r.add_argument("--input", metavar="DIR", help="the download: per-source folders "
                   f"({', '.join(RP_SOURCES)}), 1T-Sample *_sample.jsonl files, or V2 documents/")
    add_flags(r, COMMON_FLAGS)
    r.add_argument("--sources", metavar="NAMES", help="only these sources, e.g. book,github")
    r.add_argument("--weights", metavar="SPEC", help="mixture weights recorded for the loader, over the sources "
                   "the dataset holds, renormalised (default lit-gpt's: common_crawl=67,c4=15,github=4.5,"
                   "wikipedia=4.5,book=4.5,arxiv=2.5,stackexchange=2)")
    r.add_argument("--val-fraction", metavar="F",
                   help="hold out this fraction of documents (by a hash of their id) for validation, at least one "
                        "when 2 or more are kept (default 0.001)")
    r.add_argument("--quality-filter", metavar="NAME", help="rpv2-basic or module:function (see docs/data.md)")
    r.add_argument("--dedup", metavar="MODES", help="exact, near, exact,near or none (default none: "
                   "RedPajama is deduplicated upstream)")
    add_config_args(r, "RedPajamaPrepareConfig: the flags above, with _ for -", "val_fraction=0.01")
    r.set_defaults(func=run_prepare)


def add_book_selection(g) -> None:
    """The `prepare gutenberg` flags that choose the books and the validation books (each the config key of
    the same name), shared with `tokenizer train`."""
    from phiforge.commands import add_flags
    from phiforge.data.corpora import GUTENBERG_SOURCES

    sources = "; ".join(f"{name}: {cls.help}" for name, cls in GUTENBERG_SOURCES.items())
    g.add_argument("--source", metavar="NAME", help=f"where the books come from (default bundled; {sources})")
    val = g.add_mutually_exclusive_group()
    val.add_argument("--val-books", metavar="N",
                     help="hold out N whole books for validation, chosen deterministically among the books that "
                          "can be read (default: Persuasion for bundled, else 0.5%% of the books, at least 1)")
    val.add_argument("--val-ids", metavar="ID,...", help="hold out these ebook numbers for validation, e.g. 105,121")
    m = g.add_argument_group("mirror / download selection")
    add_flags(m, BOOK_SELECTION_FLAGS)
    m.add_argument("--parquet", nargs="+", metavar="PATH", help="--source parquet: files or folders of .parquet")


def run_prepare(args) -> int:
    import dataclasses

    from phiforge.data.corpora import config_class, config_yaml, load_prepare_config, prepare_corpus

    keys = {f.name for f in dataclasses.fields(config_class(args.corpus))}
    flags = {k: v for k, v in vars(args).items() if k in keys}
    cfg = load_prepare_config(args.corpus, getattr(args, "config", None), flags=flags, sets=args.sets)
    if getattr(args, "print_config", False):
        print(config_yaml(cfg), end="")
        return 0
    prepare_corpus(cfg, echo=print)
    return 0
