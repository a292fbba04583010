"""`phiforge train --config FILE [--set key=value ...] [--resume auto|none|PATH | --overwrite]
[--allow-tokenizer-mismatch] [--print-config]`.

Also under torchrun: `torchrun --nproc-per-node N -m phiforge train ...` (docs/training.md)."""

from __future__ import annotations

from phiforge.commands import add_config_args, load_command_config


def register(sub) -> None:
    p = sub.add_parser("train", help="train a model (see configs/ and docs/training.md)")
    add_config_args(p, "phiforge.train.config.TrainConfig", "optim.lr=1e-3", resume=True, tokenizer_check=True)
    p.set_defaults(func=run)


def run(args) -> int:
    from phiforge.train.config import TrainConfig
    from phiforge.train.pretrain import train

    cfg = load_command_config(TrainConfig, args)
    if cfg is None:
        return 0
    summary = train(cfg, overwrite=args.overwrite)
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
