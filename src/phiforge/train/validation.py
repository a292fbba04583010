"""The one validation loop every trainer uses (`phiforge train`, `phiforge vision finetune`, the study's scoring):
batches split across ranks, every score summed over tokens, then over ranks, so the mean is per token whatever the
batches and the ranks."""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

from phiforge.train.distributed import DistEnv, all_reduce_
from phiforge.train.metrics import perplexity


@torch.no_grad()
def validate(model: torch.nn.Module, batches: list, score: Callable, env: DistEnv | None = None) -> list[float]:
    """The sums of `score(model, batch)` (a 1-D tensor of sums, e.g. [nats, tokens]) over `batches`, in eval mode.
    Rank r takes batches r, r + world, ...; every rank runs the same number of forwards (FSDP gathers weights in
    each one), a rank short of batches repeating the first and not counting it."""
    rank, world = (env.rank, env.world_size) if env is not None else (0, 1)
    mine = batches[rank::world]
    total = None
    model.eval()
    try:
        for i in range(-(-len(batches) // world)):
            s = score(model, mine[i] if i < len(mine) else batches[0]).double()
            total = torch.zeros_like(s) if total is None else total
            if i < len(mine):
                total += s
    finally:
        model.train()
    if env is not None:
        all_reduce_(total, env)
    return total.tolist()


def token_scores(device: torch.device, token_bytes: torch.Tensor | None = None, eot: int | None = None) -> Callable:
    """score() for language-model batches (x, y): [nats, tokens, text nats, text bytes]; the text leaves out the
    document separators (eot), which stand for no text, as `phiforge eval` does; bytes: UTF-8 bytes per token id."""
    table = token_bytes.to(device) if token_bytes is not None else None

    def score(model, batch) -> torch.Tensor:
        x, y = (t.to(device) for t in batch)
        nats = F.cross_entropy(model(x).float().flatten(0, 1), y.flatten(), reduction="none").double()
        text = y.flatten() != eot if eot is not None else torch.ones_like(nats, dtype=torch.bool)
        n_bytes = table[y.flatten()].sum() if table is not None else nats.new_zeros(())
        return torch.stack([nats.sum(), nats.new_tensor(float(nats.numel())), nats[text].sum(), n_bytes.double()])

    return score


def evaluate(model: torch.nn.Module, batches: list, env: DistEnv | None = None,
             token_bytes: torch.Tensor | None = None, eot: int | None = None) -> dict:
    """val_loss (mean nats per token) and val_ppl over language-model batches; with token_bytes also val_bpb, the
    bits per byte of their text."""
    device = env.device if env is not None else next(model.parameters()).device
    nats, tokens, text_nats, text_bytes = validate(model, batches, token_scores(device, token_bytes, eot), env)
    out = {"val_loss": nats / max(tokens, 1)}
    out["val_ppl"] = perplexity(out["val_loss"])
    if token_bytes is not None and text_bytes > 0:
        out["val_bpb"] = text_nats / (math.log(2) * text_bytes)
    return out
