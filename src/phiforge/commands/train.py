"""`phiforge train --config FILE [--set key=value ...]`."""

from __future__ import annotations

from phiforge.config import load_config


def register(sub) -> None:
    p = sub.add_parser("train", help="train a model (see configs/ for examples)")
    p.add_argument("--config", help="YAML config file (keys of phiforge.train.config.TrainConfig)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set optim.lr=1e-3 (repeatable)")
    p.set_defaults(func=run)


def run(args) -> int:
    from phiforge.train.config import TrainConfig
    from phiforge.train.loop import train

    cfg = load_config(TrainConfig, args.config, args.sets)
    summary = train(cfg)
    print(f"done: {summary['steps']} steps, {summary['tokens']:,} tokens, val loss "
          f"{summary['val_loss_start']:.4f} -> {summary['val_loss_end']:.4f}; checkpoint {summary['checkpoint']}")
    return 0
