"""`phiforge litgpt prepare|pretrain|config`: the LitGPT route on phiforge's data (docs/litgpt.md).

    phiforge litgpt prepare --data gutenberg --out data/lit-gutenberg --seq-len 256 [--prepare-args "--source bundled"]
    phiforge litgpt prepare --from-dataset data/gutenberg --out data/lit-gutenberg --seq-len 256
    phiforge litgpt pretrain --config configs/litgpt-cpu.yaml [--set key=value ...]
    phiforge litgpt config --preset phi-2            # the LitGPT model_config of a phiforge model
"""

from __future__ import annotations

import shlex

from phiforge.commands import add_config_args, load_command_config
from phiforge.commands.prepare import positive_int


def register(sub) -> None:
    p = sub.add_parser("litgpt", help="train with LitGPT on phiforge's data (prepare, pretrain, config)")
    cmds = p.add_subparsers(dest="litgpt_command", metavar="COMMAND")
    cmds.required = True

    pr = cmds.add_parser("prepare", help="phiforge's tokens -> litdata chunks (train/, val/) for litgpt.data.LitData",
                         description="Writes LitGPT-ready data from the same cleaned, tokenized documents phiforge "
                                     "trains on: phiforge's own `prepare` (or an existing phiforge dataset) makes the "
                                     "tokens, and this re-cuts its token stream into the windows phiforge trains on.")
    pr.add_argument("--data", choices=["gutenberg", "redpajama"],
                    help="corpus to prepare with `phiforge prepare DATA` into OUT/phiforge (not needed with "
                         "--from-dataset)")
    pr.add_argument("--from-dataset", metavar="DIR", help="use this prepared phiforge dataset (index.json + shards)")
    pr.add_argument("--prepare-args", default="", metavar="ARGS",
                    help="arguments for `phiforge prepare DATA`, as one string, e.g. \"--source bundled --val-books 1\"")
    pr.add_argument("--out", required=True, metavar="DIR", help="output directory (litdata train/ and val/ + manifest)")
    pr.add_argument("--seq-len", type=positive_int, required=True, metavar="N",
                    help="training sequence length; windows are N+1 tokens (must match the training config)")
    pr.add_argument("--micro-batch-size", type=positive_int, default=1, metavar="N",
                    help="phiforge's micro-batch size, for its per-epoch order (default 1)")
    pr.add_argument("--seed", type=int, default=0, help="phiforge's data.seed: the window order (default 0)")
    pr.add_argument("--epochs", type=positive_int, default=1, help="epochs of training windows to write (default 1)")
    pr.add_argument("--mixture", default="none", metavar="none|index|SPEC",
                    help="sample sources as phiforge's loader does with this mixture: index = the weights `prepare "
                         "redpajama` recorded, SPEC = e.g. github=3,wikipedia=1 (default none: one stream, as "
                         "`phiforge train`)")
    pr.add_argument("--eval-batches", type=positive_int, metavar="N",
                    help="with --mixture index: the validation batches phiforge evaluates (eval_batches)")
    pr.set_defaults(func=run_prepare)

    pt = cmds.add_parser("pretrain", help="run `litgpt pretrain` on prepared data; metrics and checkpoint in "
                                          "phiforge's run format")
    add_config_args(pt, "phiforge.litgpt.pretrain.LitPretrainConfig", "max_steps=100")
    pt.set_defaults(func=run_pretrain)

    c = cmds.add_parser("config", help="print the LitGPT model_config (YAML) of a phiforge model")
    src = c.add_mutually_exclusive_group(required=True)
    src.add_argument("--preset", help="a phiforge preset, e.g. phi-2 or small")
    src.add_argument("--checkpoint", help="a phiforge checkpoint directory")
    c.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="Phi2Config override for --preset, e.g. --set n_layer=8")
    c.set_defaults(func=run_config)


def run_prepare(args) -> int:
    from pathlib import Path

    from phiforge.config import check_seed
    from phiforge.data.shards import read_index
    from phiforge.errors import DataError
    from phiforge.litgpt.data import prepare_litdata

    check_seed("--seed", args.seed)
    out = Path(args.out)
    if args.from_dataset:
        if args.prepare_args:
            raise DataError("--prepare-args applies to `phiforge prepare`; it is not run with --from-dataset")
        dataset = Path(args.from_dataset)
        corpus = read_index(dataset).get("prepared", {}).get("corpus")
        if args.data and corpus and corpus != args.data:
            raise DataError(f"--data {args.data} but {dataset} was prepared from '{corpus}'")
    else:
        if not args.data:
            raise DataError("give --data gutenberg|redpajama (phiforge prepares it first) or --from-dataset DIR")
        from phiforge.data.corpora import load_prepare_config, parse_flags, prepare_corpus

        dataset = out / "phiforge"
        argv = shlex.split(args.prepare_args)
        cfg = load_prepare_config(args.data, flags={**parse_flags(args.data, argv), "out": str(dataset)})
        print(f"phiforge prepare {args.data} {' '.join(shlex.quote(a) for a in argv)} --out {dataset}", flush=True)
        prepare_corpus(cfg, echo=print)
    m = prepare_litdata(dataset, out, args.seq_len, micro_batch_size=args.micro_batch_size, seed=args.seed,
                        epochs=args.epochs, mixture=_mixture(args.mixture),
                        eval_batches_n=args.eval_batches)
    tr, va = m["splits"]["train"], m["splits"]["val"]
    print(f"wrote {out}: train {tr['windows']:,} windows x {m['block_size']} tokens ({tr['epochs']} epoch(s) of "
          f"{tr['windows_per_epoch']:,}), val {va['windows']:,} windows, from {dataset} in {m['seconds']:.1f} s")
    print(f"LitGPT reads it with: --data LitData --data.data_path {out} --data.split_names [train,val] "
          f"--train.max_seq_length {args.seq_len}  (or `phiforge litgpt pretrain`, which keeps phiforge's order)")
    return 0


def _mixture(text: str):
    from phiforge.errors import DataError

    if text in ("none", "index"):
        return None if text == "none" else text
    out = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, value = part.partition("=")
        try:
            out[name.strip()] = float(value)
        except ValueError:
            sep = ""
        if not sep or not name.strip():
            raise DataError(f"--mixture: cannot read {part!r} (none, index, or e.g. github=3,wikipedia=1)")
    return out


def run_pretrain(args) -> int:
    from phiforge.litgpt.pretrain import LitPretrainConfig, pretrain

    cfg = load_command_config(LitPretrainConfig, args)
    if cfg is None:
        return 0
    s = pretrain(cfg)
    start, end = s["val_loss_start"], s["val_loss_end"]
    val = (f"{start:.4f} -> " if start is not None else "") + (f"{end:.4f}" if end is not None else "n/a")
    print(f"done: {s['steps']} steps, {s['tokens']:,} tokens, val loss {val}; {s['wall_s']:.0f} s, "
          f"peak RSS {s['peak_rss_gib']:.2f} GiB; checkpoint {s['checkpoint']}")
    return 0


def run_config(args) -> int:
    import yaml

    from phiforge.config import apply_overrides
    from phiforge.litgpt.convert import config_to_litgpt
    from phiforge.model import Phi2Config
    from phiforge.model_files import read_config, resolve_checkpoint

    if args.checkpoint:
        cfg = read_config(resolve_checkpoint(args.checkpoint))
    else:
        cfg = Phi2Config.from_preset(args.preset, **apply_overrides({}, args.sets))
    print(yaml.safe_dump(config_to_litgpt(cfg), sort_keys=True), end="")
    return 0
