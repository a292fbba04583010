"""Autoregressive generation with a KV cache: greedy (temperature 0), temperature, top-k and top-p sampling."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from phiforge.config import check_range
from phiforge.errors import ConfigError
from phiforge.model import KVCache, Phi2, Phi2Config


def check_sampling(max_new_tokens: int, temperature: float, top_k: int | None, top_p: float | None) -> None:
    """Refuse settings that mean nothing, named as the CLI flags: temperature negative or not finite (0 is
    greedy), top-k below 1, top-p outside (0, 1] (None: no limit), fewer than one new token."""
    check_range("--max-new-tokens", max_new_tokens, 1)
    check_range("--temperature", temperature, 0.0, note=" (0 is greedy)")
    if top_k is not None:
        check_range("--top-k", top_k, 1, note=" (leave it out for no limit)")
    if top_p is not None:
        check_range("--top-p", top_p, 0.0, 1.0, lo_open=True, note=" (1 keeps every token)")


def fit_to_model(prompt_len: int, max_new_tokens: int, top_k: int | None, cfg: Phi2Config) -> tuple[int, int | None,
                                                                                                     list[str]]:
    """(max_new_tokens, top_k, notes): both clamped to what the model allows (its context, its vocabulary),
    with a note for each clamp. A prompt that fills the context alone is an error."""
    room = cfg.max_seq_len - prompt_len
    if room < 1:
        raise ConfigError(f"prompt is {prompt_len} tokens; the model's context is {cfg.max_seq_len}, which leaves "
                          "no room for new tokens (shorten the prompt)")
    notes = []
    if max_new_tokens > room:
        notes.append(f"the prompt's {prompt_len} token{'s' * (prompt_len != 1)} + --max-new-tokens {max_new_tokens} "
                     f"exceed the model's context ({cfg.max_seq_len}); generating at most {room} tokens")
        max_new_tokens = room
    if top_k is not None and top_k > cfg.vocab_size:
        notes.append(f"--top-k {top_k} is more than the model's vocabulary ({cfg.vocab_size}); using {cfg.vocab_size}")
        top_k = cfg.vocab_size
    return max_new_tokens, top_k, notes


def sample_next(logits: torch.Tensor, temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Pick the next token id [B] from last-position logits [B, V]."""
    if temperature <= 0.0:
        return logits.argmax(dim=-1)
    # Subtract the maximum before dividing: a tiny temperature then sends the other logits to -inf instead of the
    # largest to inf (inf - inf is NaN in the softmax); below float32's smallest normal number it is greedy anyway.
    logits = logits.float()
    logits = (logits - logits.amax(-1, keepdim=True)) / max(temperature, torch.finfo(torch.float32).tiny)
    if top_k is not None and 0 < top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and 0.0 < top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop = cum - sorted_logits.softmax(dim=-1) >= top_p  # keep the smallest prefix whose mass reaches top_p
        drop[..., 0] = False  # the likeliest token always stays (a top_p that rounds to 0 in float32 kept none)
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)


@torch.no_grad()
def stream(model: Phi2, idx: torch.Tensor, max_new_tokens: int, temperature: float = 0.0, top_k: int | None = None,
           top_p: float | None = None, generator: torch.Generator | None = None,
           stop_token: int | None = None, context: torch.Tensor | None = None) -> Iterator[torch.Tensor]:
    """Yield each new token [B] as it is produced. The prompt is prefilled once; then one token per step.

    `context` [B, S, context_dim] conditions a model with cross-attention; its K/V is cached at the prefill."""
    check_sampling(max_new_tokens, temperature, top_k, top_p)
    B, T = idx.shape
    max_len = min(model.cfg.max_seq_len, T + max_new_tokens)
    if T >= model.cfg.max_seq_len:
        raise ValueError(f"prompt of {T} tokens leaves no room under max_seq_len {model.cfg.max_seq_len}")
    p = next(model.parameters())
    cache = KVCache(model.cfg, B, max_len=max_len, device=p.device, dtype=p.dtype)
    logits = model(idx, cache=cache, context=context)[:, -1]
    n = max_len - T
    for i in range(n):
        nxt = sample_next(logits, temperature, top_k, top_p, generator)
        yield nxt
        if i == n - 1 or (stop_token is not None and bool((nxt == stop_token).all())):
            return
        logits = model(nxt[:, None], cache=cache, context=context)[:, -1]


def generate(model: Phi2, idx: torch.Tensor, max_new_tokens: int, temperature: float = 0.0, top_k: int | None = None,
             top_p: float | None = None, seed: int | None = None, stop_token: int | None = None,
             on_token: Callable[[torch.Tensor], None] | None = None, context: torch.Tensor | None = None) -> torch.Tensor:
    """Return idx extended by up to max_new_tokens tokens: [B, T + n]."""
    gen = None
    if seed is not None:
        gen = torch.Generator(device=idx.device).manual_seed(seed)
    out = [idx]
    for tok in stream(model, idx, max_new_tokens, temperature, top_k, top_p, gen, stop_token, context):
        out.append(tok[:, None])
        if on_token is not None:
            on_token(tok)
    return torch.cat(out, dim=1)


@torch.no_grad()
def generate_uncached(model: Phi2, idx: torch.Tensor, max_new_tokens: int,
                      context: torch.Tensor | None = None) -> torch.Tensor:
    """Greedy decoding by recomputing the full sequence each step: the reference for the KV-cache test."""
    for _ in range(max_new_tokens):
        nxt = model(idx, context=context)[:, -1].argmax(dim=-1, keepdim=True)
        idx = torch.cat([idx, nxt], dim=1)
    return idx
