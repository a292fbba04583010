"""`phiforge train --config FILE [--set key=value ...] [--resume auto|none|PATH]`.

Also under torchrun: `torchrun --nproc-per-node N -m phiforge train ...` (docs/training.md)."""

from __future__ import annotations

from phiforge.config import load_config


def register(sub) -> None:
    p = sub.add_parser("train", help="train a model (see configs/ and docs/training.md)")
    p.add_argument("--config", help="YAML config file (keys of phiforge.train.config.TrainConfig)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set optim.lr=1e-3 (repeatable)")
    p.add_argument("--resume", default=None, metavar="auto|none|PATH",
                   help="same as --set resume=...: auto continues from out_dir's latest complete checkpoint")
    p.set_defaults(func=run)


def run(args) -> int:
    from phiforge.train.config import TrainConfig
    from phiforge.train.loop import train

    sets = list(args.sets) + ([f"resume={args.resume}"] if args.resume is not None else [])
    cfg = load_config(TrainConfig, args.config, sets)
    summary = train(cfg)
    if summary.get("rank", 0) != 0:
        return 0
    start = summary["val_loss_start"]
    if summary.get("stopped_by"):
        print(f"stopped by {summary['stopped_by']} at step {summary['steps']}; checkpoint {summary['checkpoint']} "
              "(continue with --resume auto)")
        return 0
    print(f"done: {summary['steps']} steps, {summary['tokens']:,} tokens, val loss "
          f"{start:.4f} -> {summary['val_loss_end']:.4f}; checkpoint {summary['checkpoint']}")
    return 0
