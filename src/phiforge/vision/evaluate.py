"""Answer accuracy on held-out visual questions, with and without the image.

Every (human, gpt) pair of a record becomes one single-question prompt (prompt_ids) answered by greedy
generation; an answer is right when it equals the reference word, ignoring case and surrounding space.
Accuracy is reported per question `kind` (a key of the human turn; "all" without one) and under ablations:
    blank   every image replaced by a plain white one (features: zeros)
    gates0  every cross-attention gate forced to 0, so the model cannot see the context at all
"""

from __future__ import annotations

from collections import Counter, defaultdict
from pathlib import Path

import torch
from tokenizers import Tokenizer

from phiforge.errors import DataError
from phiforge.generate import generate
from phiforge.tokenizer import eot_id
from phiforge.vision.data import load_visuals, prompt_ids, read_records
from phiforge.vision.model import VisionLM

ABLATIONS = ("none", "blank", "gates0")


def question_pairs(pairs: list[tuple[dict, torch.Tensor]]) -> list[tuple[int, str, str, str]]:
    """(pair index, kind, question, reference answer) for each human turn followed by a gpt turn."""
    out = []
    for i, (rec, _) in enumerate(pairs):
        turns = rec["conversations"]
        for q, a in zip(turns, turns[1:]):
            if q["from"] == "human" and a["from"] == "gpt":
                out.append((i, q.get("kind", "all"), q["value"], a["value"]))
    return out


@torch.no_grad()
def answer(model: VisionLM, tok: Tokenizer, visuals: torch.Tensor, question_texts: list[str],
           max_new_tokens: int = 8) -> list[str]:
    """Greedy answers to one question per image. Prompts of equal length share a batch (no padding needed)."""
    device = next(model.parameters()).device
    eot = eot_id(tok)
    prompts = [prompt_ids(tok, q) for q in question_texts]
    answers = [""] * len(prompts)
    by_len = defaultdict(list)
    for i, p in enumerate(prompts):
        by_len[len(p)].append(i)
    for rows in by_len.values():
        idx = torch.tensor([prompts[i] for i in rows], device=device)
        context = model.encode(visuals[rows].to(device))
        out = generate(model.lm, idx, max_new_tokens, stop_token=eot, context=context)[:, idx.size(1):].tolist()
        for i, new in zip(rows, out):
            answers[i] = tok.decode(new[: new.index(eot)] if eot in new else new)
    return answers


def evaluate_file(model: VisionLM, tok: Tokenizer, data: str | Path, image_dir: str | Path | None = None,
                  ablations: tuple[str, ...] = ABLATIONS, batch_size: int = 64, limit: int | None = None) -> dict:
    """Accuracy per question kind and ablation. Records whose image is missing or unreadable are skipped and
    counted (result["records"], as `vision finetune` counts them); DataError when nothing is left to ask."""
    records = read_records(data)[:limit]
    pairs, stats = load_visuals(records, Path(image_dir) if image_dir else Path(data).parent, model.vcfg.encoder)
    if not pairs:
        why = ", ".join(f"{k} {v}" for k, v in stats.items() if k not in ("records", "used") and v)
        raise DataError(f"{data}: none of its {stats['records']} record(s) is usable ({why or 'no records'})")
    qs = question_pairs(pairs)
    if not qs:
        raise DataError(f"{data}: no question/answer pairs (a human turn followed by a gpt turn) in the "
                        f"{len(pairs)} usable record(s)")
    refs = [a.strip().lower() for _, _, _, a in qs]
    kinds = [k for _, k, _, _ in qs]
    result = {"data": str(data), "images": len(pairs), "questions": len(qs), "records": dict(stats), "results": {}}
    model.eval()
    for ablation in ablations:
        got = []
        for start in range(0, len(qs), batch_size):
            chunk = qs[start : start + batch_size]
            visuals = torch.stack([pairs[i][1] for i, _, _, _ in chunk])
            if ablation == "blank":
                visuals = torch.full_like(visuals, 255) if visuals.dtype == torch.uint8 else torch.zeros_like(visuals)
            if ablation == "gates0":
                with model.gates_closed():
                    got += answer(model, tok, visuals, [q for _, _, q, _ in chunk])
            else:
                got += answer(model, tok, visuals, [q for _, _, q, _ in chunk])
        result["results"][ablation] = _accuracy(kinds, refs, [g.strip().lower() for g in got])
    # reference points: guessing uniformly among the answers seen, and always giving the most common one
    result["chance"] = {k: 1 / len({r for r, kk in zip(refs, kinds) if kk == k}) for k in sorted(set(kinds))}
    result["majority"] = {k: max(Counter(r for r, kk in zip(refs, kinds) if kk == k).values()) / kinds.count(k)
                          for k in sorted(set(kinds))}
    return result


def _accuracy(kinds: list[str], refs: list[str], got: list[str]) -> dict:
    right, total = Counter(), Counter(kinds)
    for k, r, g in zip(kinds, refs, got):
        right[k] += r == g
    return {k: {"accuracy": right[k] / total[k], "correct": right[k], "n": total[k]} for k in sorted(total)}
