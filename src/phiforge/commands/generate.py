"""`phiforge generate --checkpoint DIR --prompt TEXT`: stream generated text."""

from __future__ import annotations

import sys

import torch

from phiforge.errors import PhiforgeError


def register(sub) -> None:
    p = sub.add_parser("generate", help="generate text from a checkpoint (temperature 0 is greedy)")
    p.add_argument("--checkpoint", required=True, help="checkpoint directory, or a run directory (uses its latest)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=100)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--device", default="auto")
    p.set_defaults(func=run)


def run(args) -> int:
    from phiforge.checkpoint import load_checkpoint, resolve_checkpoint
    from phiforge.generate import generate
    from phiforge.tokenizer import eot_id, load_tokenizer
    from phiforge.train.distributed import resolve_device

    if not args.prompt.strip():
        raise PhiforgeError("empty prompt: give some text with --prompt")
    if args.max_new_tokens < 1:
        raise PhiforgeError("--max-new-tokens must be at least 1")
    ckpt = resolve_checkpoint(args.checkpoint)
    device = resolve_device(args.device)
    model = load_checkpoint(ckpt, device=device)
    tok = load_tokenizer(ckpt)
    ids = tok.encode(args.prompt).ids
    if len(ids) >= model.cfg.max_seq_len:
        raise PhiforgeError(f"prompt is {len(ids)} tokens; the model's context is {model.cfg.max_seq_len}")
    idx = torch.tensor([ids], device=device)
    new: list[int] = []
    printed = ""
    sys.stdout.write(args.prompt)

    def emit(token: torch.Tensor) -> None:
        # decode everything so far and print the new suffix: byte-level BPE may split a character across tokens
        nonlocal printed
        new.append(int(token[0]))
        text = tok.decode(new)
        if not text.endswith("\ufffd"):
            sys.stdout.write(text[len(printed):])
            sys.stdout.flush()
            printed = text

    generate(model, idx, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
             seed=args.seed, stop_token=eot_id(tok), on_token=emit)
    sys.stdout.write(tok.decode(new)[len(printed):] + "\n")
    return 0
