"""The `phiforge` subcommands: each module has register(subparsers) and the functions its parsers call."""

from __future__ import annotations


def add_flags(p, rows) -> None:
    """Flags from (name, metavar, help) rows; a row whose metavar is None is a switch (store_true)."""
    for name, metavar, help_text in rows:
        if metavar is None:
            p.add_argument(name, action="store_true", help=help_text)
        else:
            p.add_argument(name, metavar=metavar, help=help_text)


def add_config_args(p, config_class: str, set_example: str, resume: bool = False,
                    tokenizer_check: bool = False) -> None:
    """--config, --set, --print-config (and --resume, --allow-tokenizer-mismatch) for a command driven by one
    config dataclass."""
    p.add_argument("--config", help=f"YAML config file (keys of {config_class})")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help=f"override a config key, e.g. --set {set_example} (repeatable)")
    if resume:
        p.add_argument("--resume", default=None, metavar="auto|none|PATH",
                       help="same as --set resume=...: auto continues from out_dir's newest intact checkpoint")
        p.add_argument("--overwrite", action="store_true",
                       help="start over in an out_dir that holds an earlier run (deletes its checkpoints and metrics)")
    if tokenizer_check:
        p.add_argument("--allow-tokenizer-mismatch", action="store_true",
                       help="same as --set allow_tokenizer_mismatch=true: train on data made by another tokenizer "
                            "than the model's (init_from, the resumed checkpoint), with a warning")
    p.add_argument("--print-config", action="store_true",
                   help="print the resolved config (defaults, then the file, then --set) as YAML and exit; "
                        "the output is itself a valid --config file")


def load_command_config(cls, args):
    """The config from the command line; None (after printing it) when --print-config was given."""
    import yaml

    from phiforge.config import load_config, to_dict

    sets = list(args.sets) + ([f"resume={args.resume}"] if getattr(args, "resume", None) is not None else [])
    if getattr(args, "allow_tokenizer_mismatch", False):
        sets.append("allow_tokenizer_mismatch=true")
    cfg = load_config(cls, args.config, sets)
    if args.print_config:
        print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
        return None
    return cfg
