"""`phiforge info`: a preset's shape and exact parameter count, built on the meta device."""

from __future__ import annotations

import json


def register(sub) -> None:
    p = sub.add_parser("info", help="show a preset's shape and exact parameter count")
    p.add_argument("--preset", default="phi-2",
                   help="phi-2 (default), phi-1_5, phi-1, base, small or tiny (README, 'Presets')")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=run)


def run(args) -> int:
    from phiforge.model import Phi2Config, count_params_meta

    cfg = Phi2Config.from_preset(args.preset)
    total, non_emb = count_params_meta(cfg)
    info = {"preset": args.preset, **cfg.to_dict(), "head_dim": cfg.head_dim, "rotary_dim": cfg.rotary_dim,
            "params": total, "params_non_embedding": non_emb}
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    width = max(len(k) for k in info)
    for k, v in info.items():
        print(f"{k:<{width}}  {v:,}" if isinstance(v, int) and not isinstance(v, bool) else f"{k:<{width}}  {v}")
    return 0
