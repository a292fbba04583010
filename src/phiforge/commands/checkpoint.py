"""`phiforge checkpoint consolidate RUN/STEP OUT`: a sharded training checkpoint as a single model directory."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("checkpoint", help="training checkpoint tools (consolidate)")
    csub = p.add_subparsers(dest="checkpoint_command", metavar="ACTION", parser_class=type(p))
    csub.required = True
    c = csub.add_parser("consolidate", help="write a sharded (DCP) training checkpoint in the single-directory "
                                            "model format that generate and convert read")
    c.add_argument("src", help="RUN/checkpoints/step-N, or a run directory (its latest complete checkpoint)")
    c.add_argument("out", help="output model directory: new, empty or an earlier model (replaced); never inside "
                               "the run")
    c.add_argument("--overwrite", action="store_true",
                   help="replace OUT even if it holds something else (its contents are deleted)")
    c.set_defaults(func=run_consolidate)


def run_consolidate(args) -> int:
    from phiforge.train.checkpointing import consolidate, read_train_state, resolve_training_checkpoint

    src = resolve_training_checkpoint(args.src)
    out = consolidate(args.src, args.out, overwrite=args.overwrite)
    state = read_train_state(src)
    print(f"consolidated {src} (step {state['step']}, {state['tokens']:,} tokens, saved by "
          f"{state.get('world_size', '?')} rank(s)) -> {out}")
    return 0
