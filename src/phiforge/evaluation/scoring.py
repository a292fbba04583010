"""The forward passes every evaluation shares: log-likelihoods of chosen tokens, computed only where needed.

    token_scores(model, idx, select, targets)        log p(target) and "is it the argmax" at the selected positions
    score_continuations(model, context, conts, L)   each continuation after one context (a question's choices):
                                                     the context runs once, then all continuations in one batch
    score_sequences(model, seqs, n_scored, L)       the last n tokens of each sequence, one batched forward
    window_plan(n, L, stride) / score_streams(...)  sliding-window scoring of long token streams

Inputs follow lm-evaluation-harness's `hf` model: a sequence longer than the context L + 1 is cut from the left,
(context + continuation)[-(L + 1):][:-1] is the input. A plain Phi2 is called in parts (blocks, then the lm_head
only on the selected rows, in chunks), which is where most of the speed over lm-eval comes from on small models
with a 50k vocabulary; an FSDP-wrapped model is called whole, so every rank runs the same forwards.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager

import torch

from phiforge.model import KVCache, Phi2

HEAD_ROWS = 512  # lm_head rows per chunk: at most 512 x vocab fp32 logits at a time


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def eval_context(model: torch.nn.Module) -> int:
    """The tokens of context an evaluation gives the model: its `eval_context` when it was built with one
    (load_for_eval gives the context the checkpoint was trained with, the trainer its data.seq_len: a model
    trained on 128-token windows has not learnt the positions beyond), else the model's max_seq_len."""
    return model.eval_context or model.cfg.max_seq_len


@contextmanager
def eval_mode(model: torch.nn.Module):
    """model.eval() and no autograd inside; the previous train/eval mode after."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def _callable_in_parts(model: torch.nn.Module) -> bool:
    """A plain Phi2: its blocks and its head can be run separately (an FSDP root gathers its own parameters only
    inside its forward, so it is called whole)."""
    if not isinstance(model, Phi2):
        return False
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch without distributed support
        return True
    return not isinstance(model, FSDPModule)


def token_scores(model: torch.nn.Module, idx: torch.Tensor, where: tuple[torch.Tensor, torch.Tensor],
                 targets: torch.Tensor, cache: KVCache | None = None,
                 greedy: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(log p(target) [N] float64, target is the argmax [N] bool, or None without `greedy`) at the N positions
    where = (rows, columns) of model(idx) (a position may repeat, e.g. to score several first tokens after one
    context); targets [N]. Each pass over the vocabulary costs as much as the lm_head: skip the argmax unless
    it is needed."""
    if _callable_in_parts(model):
        hidden, head = model.hidden_states(idx, cache)[where], model.lm_head
    else:
        hidden, head = model(idx, cache=cache)[where], None
    logprobs, is_max = [], []
    for start in range(0, hidden.size(0), HEAD_ROWS):
        chunk = hidden[start : start + HEAD_ROWS]
        logits = (head(chunk) if head is not None else chunk).float()
        y = targets[start : start + HEAD_ROWS]
        logprobs.append((logits.gather(1, y[:, None]).squeeze(1) - torch.logsumexp(logits, dim=-1)).double())
        if greedy:
            is_max.append(logits.argmax(dim=-1) == y)
    return torch.cat(logprobs), torch.cat(is_max) if greedy else None


class PrefixCache(KVCache):
    """KVCache for scoring several continuations of one context: the first forward (batch 1, the context) keeps
    each layer's keys and values; the next forward (batch n, the continuations) attends to them expanded to n rows,
    so the context is computed once. Implements what Attention and Phi2.hidden_states use: update() and pos."""

    def __init__(self):  # nothing preallocated: dtype and batch follow the forward (also under FSDP's casting)
        self.k, self.v, self.pos, self.context_kv, self.max_len = {}, {}, 0, {}, None

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if layer not in self.k:
            self.k[layer], self.v[layer] = k, v
            return k, v
        n = k.size(0)
        return (torch.cat([self.k[layer].expand(n, -1, -1, -1), k], dim=2),
                torch.cat([self.v[layer].expand(n, -1, -1, -1), v], dim=2))


def _padded(rows: Sequence[Sequence[int]], device) -> torch.Tensor:
    """Right-padded [len(rows), longest] token ids (padding comes after each row's tokens, so a causal model's
    outputs at the real positions do not depend on it)."""
    idx = torch.zeros(len(rows), max(max(len(r) for r in rows), 1), dtype=torch.long)
    for i, r in enumerate(rows):
        idx[i, : len(r)] = torch.tensor(list(r), dtype=torch.long)
    return idx.to(device)


def _positions(spans: Sequence[tuple[int, int]], device) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, columns) of the positions start..end-1 of each row i, spans[i] = (start, end), row by row."""
    rows = [i for i, (a, b) in enumerate(spans) for _ in range(a, b)]
    cols = [j for a, b in spans for j in range(a, b)]
    return torch.tensor(rows, dtype=torch.long, device=device), torch.tensor(cols, dtype=torch.long, device=device)


def _per_item(logprobs: torch.Tensor, greedy: torch.Tensor | None, counts: Sequence[int]) -> list[tuple]:
    out, start = [], 0
    for n in counts:
        out.append((float(logprobs[start : start + n].sum()),
                    bool(greedy[start : start + n].all()) if greedy is not None else None))
        start += n
    return out


def score_sequences(model: torch.nn.Module, seqs: Sequence[Sequence[int]], n_scored: Sequence[int], max_len: int,
                    greedy: bool = True) -> list[tuple[float, bool | None]]:
    """(summed log-likelihood, all greedy or None) of the last n_scored[i] tokens of each sequence, in one
    forward."""
    inputs = [list(s)[-(max_len + 1):][:-1] for s in seqs]
    idx = _padded(inputs, model_device(model))
    where = _positions([(len(x) - n, len(x)) for x, n in zip(inputs, n_scored)], idx.device)
    targets = torch.tensor([t for s, n in zip(seqs, n_scored) for t in list(s)[len(s) - n:]], device=idx.device)
    return _per_item(*token_scores(model, idx, where, targets, greedy=greedy), n_scored)


def score_continuations(model: torch.nn.Module, context: Sequence[int], continuations: Sequence[Sequence[int]],
                        max_len: int, greedy: bool = True) -> list[tuple[float, bool | None]]:
    """(log-likelihood, all greedy or None) of each continuation after `context` (at least one token each). The context
    runs once, then every continuation after it in one batched forward; when context + continuation exceeds the
    window, each row is cut from the left as lm-eval does and scored whole (one batched forward)."""
    conts = [list(c) for c in continuations]
    if len(context) + max(len(c) for c in conts) > max_len + 1:
        return score_sequences(model, [list(context) + c for c in conts], [len(c) for c in conts], max_len, greedy)
    device = model_device(model)
    cache = PrefixCache()
    ctx = torch.tensor([list(context)], dtype=torch.long, device=device)
    # the context's last position predicts each continuation's first token (the same row, scored n times)
    last = (torch.zeros(len(conts), dtype=torch.long, device=device),
            torch.full((len(conts),), len(context) - 1, dtype=torch.long, device=device))
    first = token_scores(model, ctx, last, torch.tensor([c[0] for c in conts], device=device), cache, greedy)
    scores = _per_item(*first, [1] * len(conts))
    rest = [c[:-1] for c in conts]  # inputs after the context; they predict c[1:]
    if not any(len(c) > 1 for c in conts):
        return scores
    where = _positions([(0, len(c) - 1) for c in conts], device)
    targets = torch.tensor([t for c in conts for t in c[1:]], dtype=torch.long, device=device)
    tail = _per_item(*token_scores(model, _padded(rest, device), where, targets, cache, greedy),
                     [len(c) - 1 for c in conts])
    return [(a + b, g and h if greedy else None) for (a, g), (b, h) in zip(scores, tail)]


# ---------------------------------------------------------------------------------------------
# Long token streams: sliding windows


def window_plan(n: int, max_len: int, stride: int) -> list[tuple[int, int, int]]:
    """Windows over a stream of n tokens whose first token (<|endoftext|>) is context only, as (begin, end, first):
    the window's input is tokens[begin:end-1], predicting tokens[begin+1:end], of which positions first..end-1
    are scored. The first window ends at min(max_len + 1, n), each next one `stride` tokens further, and each
    reaches back max_len tokens (or to the start), so every position 1..n-1 is scored exactly once, with as much
    left context as the window allows."""
    plan, scored = [], 1
    while scored < n:
        end = min(n, scored + stride if plan else max_len + 1)
        plan.append((max(0, end - max_len - 1), end, scored))
        scored = end
    return plan


def score_streams(model: torch.nn.Module, streams: Sequence[Sequence[int]], max_len: int, stride: int,
                  batch_size: int = 8, progress=None) -> list[tuple[float, int]]:
    """(nats, tokens scored) of each stream (its first token is context only): every token after the first is
    scored once, by sliding windows (window_plan), `batch_size` windows per forward. `progress(n)`: called with
    the number of windows done after each forward."""
    windows = [(i, w) for i, s in enumerate(streams) for w in window_plan(len(s), max_len, stride)]
    nats = [0.0] * len(streams)
    device = model_device(model)
    for start in range(0, len(windows), batch_size):
        batch = windows[start : start + batch_size]
        inputs = [streams[i][b : e - 1] for i, (b, e, _) in batch]
        where = _positions([(f - b - 1, e - b - 1) for _, (b, e, f) in batch], device)
        targets = torch.tensor([t for i, (_, e, f) in batch for t in streams[i][f:e]], dtype=torch.long,
                               device=device)
        logprobs, _ = token_scores(model, _padded(inputs, device), where, targets, greedy=False)
        pos = 0
        for i, (_, e, f) in batch:
            nats[i] -= float(logprobs[pos : pos + e - f].sum())
            pos += e - f
        if progress is not None:
            progress(len(batch))
    return [(nats[i], max(len(s) - 1, 0)) for i, s in enumerate(streams)]
