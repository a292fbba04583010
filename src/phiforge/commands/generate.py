"""`phiforge generate --checkpoint DIR --prompt TEXT`: stream generated text."""

from __future__ import annotations

import sys

from phiforge.errors import PhiforgeError, oom_advice


def register(sub) -> None:
    p = sub.add_parser("generate", help="generate text from a checkpoint (temperature 0 is greedy)")
    p.add_argument("--checkpoint", required=True, help="checkpoint directory, or a run directory (uses its latest)")
    p.add_argument("--prompt", required=True)
    add_sampling_args(p, max_new_tokens=100, temperature=0.8)
    p.set_defaults(func=run)


def add_sampling_args(p, max_new_tokens: int, temperature: float) -> None:
    """--max-new-tokens, --temperature, --top-k, --top-p (checked by phiforge.generate.check_sampling), --seed
    and --device."""
    p.add_argument("--max-new-tokens", type=int, default=max_new_tokens,
                   help=f"default {max_new_tokens}; clamped to the model's context after the prompt")
    p.add_argument("--temperature", type=float, default=temperature,
                   help=f"0 is greedy (default {temperature}); must be finite and not negative")
    p.add_argument("--top-k", type=int, default=None,
                   help="sample from the k likeliest tokens (at least 1; clamped to the vocabulary)")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling: keep this much mass, in (0, 1]")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (default: unseeded)")
    p.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda or cuda:N")


def check_sampling_args(args) -> None:
    """The flags of add_sampling_args, before anything is loaded."""
    from phiforge.config import check_seed
    from phiforge.generate import check_sampling

    check_sampling(args.max_new_tokens, args.temperature, args.top_k, args.top_p)
    check_seed("--seed", args.seed)


def fit_sampling(args, prompt_len: int, cfg) -> None:
    """Clamp args.max_new_tokens and args.top_k to the model, with a note on stderr for each clamp."""
    from phiforge.generate import fit_to_model

    args.max_new_tokens, args.top_k, notes = fit_to_model(prompt_len, args.max_new_tokens, args.top_k, cfg)
    for note in notes:
        print(f"phiforge: note: {note}", file=sys.stderr)


def run(args) -> int:
    import torch

    from phiforge.generate import generate
    from phiforge.model_files import load_checkpoint, resolve_checkpoint
    from phiforge.tokenizer import eot_id, load_tokenizer
    from phiforge.train.distributed import resolve_device

    if not args.prompt.strip():
        raise PhiforgeError("empty prompt: give some text with --prompt")
    check_sampling_args(args)
    ckpt = resolve_checkpoint(args.checkpoint)
    device = resolve_device(args.device)
    model = load_checkpoint(ckpt, device=device)
    tok = load_tokenizer(ckpt)
    ids = tok.encode(args.prompt).ids
    fit_sampling(args, len(ids), model.cfg)
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

    with oom_advice(f"lower --max-new-tokens (now {args.max_new_tokens}) or use a device with more memory "
                    "(--device)"):
        generate(model, idx, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                 seed=args.seed, stop_token=eot_id(tok), on_token=emit)
    sys.stdout.write(tok.decode(new)[len(printed):] + "\n")
    return 0
