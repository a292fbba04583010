"""`phiforge tokenizer train --out DIR`: a byte-level BPE learnt from a corpus (phiforge.data.tokenizer_train).

    phiforge tokenizer train --source bundled --vocab-size 8192 --out tokenizers/gutenberg-8k
    phiforge tokenizer train --input notes/ web.jsonl.zst --text-key content --vocab-size 16384 --out tok/web
    phiforge prepare gutenberg --source bundled --tokenizer-dir tokenizers/gutenberg-8k --out data/gutenberg-8k

Each flag is the config key of the same name (the Gutenberg flags are the keys under `gutenberg:`): the
defaults, then --config, then the flags, then --set.
"""

from __future__ import annotations


def register(sub) -> None:
    import argparse

    from phiforge.commands import add_config_args
    from phiforge.commands.prepare import add_book_selection

    p = sub.add_parser("tokenizer", help="train a byte-level BPE tokenizer on a corpus")
    cmds = p.add_subparsers(dest="tokenizer_command", metavar="COMMAND")
    cmds.required = True
    t = cmds.add_parser("train", argument_default=argparse.SUPPRESS,
                        help="byte-level BPE (GPT-2's kind) with <|endoftext|>, from Gutenberg books or text/jsonl "
                             "files; deterministic")
    t.add_argument("--out", metavar="DIR", help="the tokenizer directory (an earlier tokenizer there is replaced; "
                   "any other non-empty directory needs --overwrite)")
    t.add_argument("--vocab-size", metavar="N", help="tokens in all, <|endoftext|> and the 256 bytes included, "
                   "rounded up to a multiple of --pad-vocab-multiple (default 8192)")
    t.add_argument("--pad-vocab-multiple", metavar="M", help="the model's embedding multiple (default 64)")
    t.add_argument("--min-frequency", metavar="K", help="merge only pairs seen at least K times (default 2)")
    t.add_argument("--input", nargs="+", metavar="PATH", help="train on these text / .jsonl files (.gz, .zst) or "
                   "folders of them instead of Gutenberg books: a text file is one document, a JSON line one")
    t.add_argument("--text-key", metavar="KEY", help="the field of a JSON line that holds its text (default text)")
    t.add_argument("--overwrite", action="store_true", help="replace an --out that holds something else")
    t.add_argument("--progress", action="store_true", help="show progress bars even when not on a terminal")
    add_book_selection(t)
    add_config_args(t, "TokenizerTrainConfig: the flags above, with _ for -; the Gutenberg ones under gutenberg.",
                    "vocab_size=4096")
    t.set_defaults(func=run_train)


def run_train(args) -> int:
    import yaml

    from phiforge.config import to_dict
    from phiforge.data.tokenizer_train import load_tokenizer_config, train_tokenizer

    cfg = load_tokenizer_config(getattr(args, "config", None), flags=vars(args), sets=args.sets)
    if getattr(args, "print_config", False):
        print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
        return 0
    train_tokenizer(cfg, echo=print)
    return 0
