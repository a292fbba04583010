"""Shared by the evaluation tests: a tiny model over the full GPT-2 vocabulary and small task files."""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

from phiforge.model import Phi2, Phi2Config
from phiforge.model_files import save_checkpoint

WORDS = ("the a man woman house tree ran walked quickly slowly red blue and but to of in sea ship Anne letter "
         "Captain wrote said").split()


def gpt2_checkpoint(path: Path, max_seq_len: int = 64, seed: int = 0) -> Path:
    """A 2-layer model with the 50304-row vocabulary the built-in GPT-2 tokenizer needs; every weight perturbed so
    that choices get clearly different log-likelihoods."""
    torch.manual_seed(seed)
    model = Phi2(Phi2Config(vocab_size=50304, n_layer=2, n_embd=40, n_head=4, intermediate_size=80,
                            max_seq_len=max_seq_len, rotary_pct=0.4))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return save_checkpoint(model, path)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def mc_rows(n: int, seed: int = 0) -> list[dict]:
    """Generic multiple-choice rows (context, choices, label): 2-4 choices of different lengths, some contexts
    ending in a space (lm-eval moves it to the continuation)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        ctx = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))).capitalize() + (" " if i % 7 == 0 else "")
        choices = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 4))) for _ in range(rng.choice([2, 3, 4]))]
        rows.append({"context": ctx, "choices": choices, "label": rng.randrange(len(choices))})
    return rows


def cloze_rows(n: int, seed: int = 1) -> list[dict]:
    """LAMBADA-format rows: a passage whose last word is the target."""
    rng = random.Random(seed)
    return [{"text": " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 15)))} for _ in range(n)]
