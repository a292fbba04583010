"""`phiforge convert FORMAT SRC OUT`: convert checkpoints to and from other formats.

To add a converter (e.g. `upcycle`, `from-litgpt`), append a `Converter` to CONVERTERS below:
`add_args(parser)` adds its arguments (SRC, OUT and --overwrite are already there) and `run(args)` returns a
summary dict {"params", "dtype", "out", "files"[, "warnings"]} that is printed the same way for every converter.
OUT follows phiforge.fileio's rule: new, empty or an earlier output of the same kind (else --overwrite), and
never SRC, inside it or around it.
"""

from __future__ import annotations

import argparse
import re
from typing import Callable, NamedTuple


class Converter(NamedTuple):
    name: str
    help: str
    add_args: Callable  # (argparse.ArgumentParser) -> None
    run: Callable  # (argparse.Namespace) -> dict


def parse_size(text: str) -> int:
    """'5GB', '500MB', '200KB' (powers of 10, like transformers' max_shard_size) or a plain byte count."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B)?\s*", text, re.IGNORECASE)
    if not m:
        # ArgumentTypeError: argparse turns it into its usual one-line usage error (exit 2)
        raise argparse.ArgumentTypeError(f"bad size '{text}' (examples: 5GB, 500MB, 1000000)")
    unit = (m.group(2) or "").upper()
    scale = {"": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}[unit]
    return int(float(m.group(1)) * scale)


def _shard_size_arg(p, default: str = "4GiB") -> None:
    p.add_argument("--max-shard-size", type=parse_size, default=None,
                   help=f"split weights into shards of at most this size (default {default})")


def _dtype_arg(p) -> None:
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default=None,
                   help="cast the weights (default: keep the checkpoint's dtype)")


def _save_kwargs(args) -> dict:
    """A phiforge checkpoint's save options from the flags (the library's defaults where a flag is not given)."""
    return {} if args.max_shard_size is None else {"max_shard_bytes": args.max_shard_size}


def _from_hf(args) -> dict:
    from phiforge.hf import convert_from_hf

    return convert_from_hf(args.src, args.out, overwrite=args.overwrite, **_save_kwargs(args))


def _to_hf_args(p) -> None:
    _dtype_arg(p)
    _shard_size_arg(p, "5GB, as transformers")


def _to_hf(args) -> dict:
    from phiforge.hf import HF_SHARD_BYTES, convert_to_hf

    return convert_to_hf(args.src, args.out, dtype=args.dtype, max_shard_bytes=args.max_shard_size or HF_SHARD_BYTES,
                         overwrite=args.overwrite)


def _upcycle_args(p) -> None:
    p.add_argument("--moe", required=True, metavar="SPEC",
                   help="MoE config (keys of model.moe) as JSON or key=value,key=value, e.g. num_experts=8,top_k=2,every=2")
    p.add_argument("--init", choices=["zero", "copy"], default="zero",
                   help="zero: zero expert outputs, the model is unchanged (default); copy: experts copy the dense MLP")
    p.add_argument("--noise", type=float, default=0.01,
                   help="--init copy: multiply each expert weight by 1 + noise * N(0, 1) (default 0.01)")
    p.add_argument("--seed", type=int, default=0)


def _upcycle(args) -> dict:
    from pathlib import Path

    from phiforge.config import check_range, check_seed
    from phiforge.model_files import conversion_summary
    from phiforge.upcycle import parse_moe_spec, upcycle

    check_range("--noise", args.noise, 0.0, note=" (0: exact copies)")
    check_seed("--seed", args.seed)

    model = upcycle(args.src, args.out, parse_moe_spec(args.moe), init=args.init, noise=args.noise, seed=args.seed,
                    overwrite=args.overwrite)
    return conversion_summary(model.state_dict(), Path(args.out))


def _from_litgpt(args) -> dict:
    from phiforge.litgpt.convert import convert_from_litgpt

    return convert_from_litgpt(args.src, args.out, overwrite=args.overwrite, **_save_kwargs(args))


def _to_litgpt_args(p) -> None:
    _dtype_arg(p)
    p.add_argument("--qkv-layout", choices=["split", "grouped"], default="split",
                   help="split: attn.qkv rows [q; k; v] (litgpt 0.5.x, default); grouped: the older per-head-group "
                        "interleaved attn.attn")


def _to_litgpt(args) -> dict:
    from phiforge.litgpt.convert import convert_to_litgpt

    return convert_to_litgpt(args.src, args.out, dtype=args.dtype, qkv_layout=args.qkv_layout,
                             overwrite=args.overwrite)


CONVERTERS: list[Converter] = [
    Converter("from-hf", "Hugging Face PhiForCausalLM directory (e.g. microsoft/phi-2) -> phiforge checkpoint",
              _shard_size_arg, _from_hf),
    Converter("to-hf", "phiforge checkpoint -> Hugging Face PhiForCausalLM directory", _to_hf_args, _to_hf),
    Converter("upcycle", "dense phiforge checkpoint -> checkpoint with mixture-of-experts sublayers",
              _upcycle_args, _upcycle),
    Converter("from-litgpt", "LitGPT checkpoint directory (lit_model.pth + model_config.yaml) -> phiforge checkpoint",
              _shard_size_arg, _from_litgpt),
    Converter("to-litgpt", "phiforge checkpoint -> LitGPT checkpoint directory (lit_model.pth + model_config.yaml)",
              _to_litgpt_args, _to_litgpt),
]


def register(sub) -> None:
    p = sub.add_parser("convert", help="convert checkpoints to and from other formats")
    conv = p.add_subparsers(dest="converter", metavar="FORMAT", parser_class=type(p))
    conv.required = True
    for c in CONVERTERS:
        cp = conv.add_parser(c.name, help=c.help, description=c.help)
        cp.add_argument("src", metavar="SRC", help="source directory")
        cp.add_argument("out", metavar="OUT", help="output directory: new, empty, or an earlier output of this "
                                                   "converter (replaced)")
        cp.add_argument("--overwrite", action="store_true",
                        help="replace OUT even if it holds something else (its contents are deleted)")
        c.add_args(cp)
        cp.set_defaults(func=lambda args, c=c: _print_summary(args, c.run(args)))


def _print_summary(args, s: dict) -> int:
    import sys

    for w in s.get("warnings", []):
        print(f"phiforge: warning: {w}", file=sys.stderr)
    print(f"converted {args.src} -> {s['out']} ({args.converter})")
    print(f"  params  {s['params']:,}")
    print(f"  dtype   {s['dtype']}")
    print(f"  files   {', '.join(s['files'])}")
    return 0
