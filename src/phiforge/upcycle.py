"""Upcycling: add MoE sublayers to a dense phiforge checkpoint (`phiforge convert upcycle`).

init="zero": the new experts get their fresh init, whose output projections are zero. With `after_mlp` (the
    default) and `parallel` the upcycled model computes exactly what the dense one did.
init="copy": every expert starts as a copy of its block's dense MLP, with multiplicative noise
    (1 + noise * N(0, 1)) so the experts can diverge (sparse upcycling). Needs expert_hidden ==
    intermediate_size (the default here). With top_k > 1 the gates sum to 1, so the gated sum of identical
    experts is the old MLP up to the noise. `replace_mlp` therefore keeps the dense function. `parallel`
    keeps it too: the output projections of the MLP that stays and of the experts are halved, so
    mlp(h)/2 + moe(h) = mlp(h). With `after_mlp` the copies add to the MLP that stays (the function changes).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from phiforge.config import apply_overrides
from phiforge.errors import CheckpointError, ConfigError
from phiforge.fileio import claim_output_dir
from phiforge.model import Phi2, Phi2Config
from phiforge.model.init import on_meta
from phiforge.model_files import check_state_dict, load_state_dict, read_config, resolve_checkpoint, save_checkpoint

INITS = ("zero", "copy")
_MLP_KEYS = ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias")


def parse_moe_spec(text: str) -> dict:
    """A JSON object ('{"num_experts": 8}') or a comma-separated key=value list ('num_experts=8,top_k=2')."""
    text = text.strip()
    if text.startswith("{"):
        try:
            spec = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"--moe is not valid JSON: {e}") from None
        if not isinstance(spec, dict):
            raise ConfigError("--moe must be a JSON object")
        return spec
    return apply_overrides({}, [item for item in text.split(",") if item.strip()])


def upcycle(src: Path, out: Path, moe: dict, init: str = "zero", noise: float = 0.01, seed: int = 0,
            overwrite: bool = False) -> Phi2:
    """Write OUT: the dense checkpoint SRC with MoE sublayers per `moe` (MoEConfig keys). Keeps SRC's dtype.
    OUT follows fileio.claim_output_dir (a checkpoint output; never SRC or around it)."""
    if init not in INITS:
        raise ConfigError(f"unknown --init '{init}' (choose from: {', '.join(INITS)})")
    if noise < 0:
        raise ConfigError(f"--noise must be 0 or more, got {noise}")
    given = Path(src)
    src, out = resolve_checkpoint(src), Path(out)
    claim_output_dir(out, "model", [given, src], overwrite)
    cfg = read_config(src)
    if cfg.moe is not None:
        raise CheckpointError(f"{src} already has MoE layers")
    moe = dict(moe)
    if init == "copy":
        moe.setdefault("expert_hidden", cfg.intermediate_size)  # experts as wide as the MLP they copy
    new_cfg = Phi2Config.from_dict({**cfg.to_dict(), "moe": moe})
    state = load_state_dict(src)
    with on_meta():
        check_state_dict(Phi2(cfg), state, str(src))
        model = Phi2(new_cfg)
    dtype = state["lm_head.weight"].dtype
    model = model.to_empty(device="cpu").to(dtype)
    expected = model.state_dict()
    model.load_state_dict({k: v for k, v in state.items() if k in expected}, strict=False)

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    for i, layer in model.moe_layers().items():
        block = model.layers[i]
        if block.moe_layernorm is not None:
            block.moe_layernorm.reset_parameters()
        layer.reset_parameters()
        if init == "copy":  # `replace_mlp` dropped these keys from the model, but the dense state still has them
            layer.load_dense_mlp(*(state[f"layers.{i}.mlp.{k}"] for k in _MLP_KEYS), noise=noise, generator=gen)
            if new_cfg.moe.position == "parallel":  # halved MLP + halved expert copies = the dense MLP
                with torch.no_grad():
                    for p in (block.mlp.fc2.weight, block.mlp.fc2.bias, layer.w2, layer.b2):
                        p.mul_(0.5)
    model.reset_rope()
    save_checkpoint(model, out, tokenizer_dir=src, inputs=[given, src], overwrite=overwrite,
                    extra={"upcycled_from": {"src": str(src), "init": init, "noise": noise, "seed": seed}})
    return model
