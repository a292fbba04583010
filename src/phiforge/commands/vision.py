"""`phiforge vision synth|finetune|generate|eval`: visual instruction tuning through cross-attention (docs/vision.md)."""

from __future__ import annotations

import json
from pathlib import Path

from phiforge.commands import add_config_args, load_command_config
from phiforge.commands.generate import add_sampling_args, check_sampling_args, fit_sampling
from phiforge.errors import PhiforgeError, oom_advice


def register(sub) -> None:
    p = sub.add_parser("vision", help="image-conditioned models: synthetic data, fine-tuning, generation, eval")
    vsub = p.add_subparsers(dest="vision_command", metavar="COMMAND")
    vsub.required = True

    s = vsub.add_parser("synth", help="draw a synthetic visual-instruction dataset (LLaVA format)")
    s.add_argument("--out", required=True, help="output directory: new, empty or an earlier `vision synth` output "
                                                "(replaced)")
    s.add_argument("--overwrite", action="store_true",
                   help="replace --out even if it holds something else (its contents are deleted)")
    s.add_argument("--n", type=int, required=True, help="number of images (train + held out)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--heldout", type=float, default=0.1, help="fraction of images held out (default 0.1)")
    s.add_argument("--size", type=int, default=64, help="image side in pixels (default 64)")
    s.set_defaults(func=run_synth)

    f = vsub.add_parser("finetune", help="two-stage fine-tuning (see configs/vision-synth-cpu.yaml); also under "
                                         "torchrun (DDP)")
    add_config_args(f, "phiforge.vision.config.FinetuneConfig", "stage1.steps=200", resume=True)
    f.set_defaults(func=run_finetune)

    g = vsub.add_parser("generate", help="answer a prompt about an image")
    g.add_argument("--checkpoint", required=True, help="vision checkpoint directory, or a run directory")
    g.add_argument("--image", required=True, help="image file (or .npy/.safetensors features for a features encoder)")
    g.add_argument("--prompt", required=True)
    add_sampling_args(g, max_new_tokens=32, temperature=0.0)
    g.set_defaults(func=run_generate)

    e = vsub.add_parser("eval", help="answer accuracy on held-out questions, with and without the image")
    e.add_argument("--checkpoint", required=True)
    e.add_argument("--data", required=True, help="LLaVA-format JSON, e.g. the held-out split of `vision synth`")
    e.add_argument("--image-dir", default=None, help="default: the data file's directory")
    e.add_argument("--ablations", default="none,blank,gates0", help="comma list of none, blank, gates0")
    e.add_argument("--limit", type=int, default=None, help="evaluate only the first N records")
    e.add_argument("--out", default=None, help="also write the results as JSON here")
    e.add_argument("--device", default="auto")
    e.set_defaults(func=run_eval)


def run_synth(args) -> int:
    from phiforge.config import check_seed
    from phiforge.vision.synth import synthesize

    check_seed("--seed", args.seed)

    info = synthesize(Path(args.out), args.n, seed=args.seed, heldout=args.heldout, size=args.size,
                      overwrite=args.overwrite)
    print(f"wrote {info['train']} training and {info['heldout']} held-out images with questions to {args.out}")
    return 0


def run_finetune(args) -> int:
    from phiforge.vision.config import FinetuneConfig
    from phiforge.vision.finetune import finetune

    cfg = load_command_config(FinetuneConfig, args)
    if cfg is None:
        return 0
    summary = finetune(cfg, overwrite=args.overwrite)
    if summary["rank"] != 0:
        return 0
    val = f", val loss {summary['val_loss_end']:.4f}" if summary["val_loss_end"] is not None else ""
    print(f"done: {summary['steps']} steps in {summary['elapsed_s']:.0f} s{val}; checkpoint {summary['checkpoint']}")
    return 0


def _load(checkpoint: str, device_name: str):
    from phiforge.model_files import resolve_checkpoint
    from phiforge.tokenizer import load_tokenizer
    from phiforge.train.distributed import resolve_device
    from phiforge.vision.model import load_vision_checkpoint

    ckpt = resolve_checkpoint(checkpoint)
    device = resolve_device(device_name)
    return load_vision_checkpoint(ckpt, device=device), load_tokenizer(ckpt), device


def run_generate(args) -> int:
    import torch

    from phiforge.generate import generate
    from phiforge.tokenizer import eot_id
    from phiforge.vision.data import prompt_ids
    from phiforge.vision.encoders import load_visual

    if not args.prompt.strip():
        raise PhiforgeError("empty prompt: give a question with --prompt")
    check_sampling_args(args)
    model, tok, device = _load(args.checkpoint, args.device)
    try:
        visual = load_visual(Path(args.image), model.vcfg.encoder)
    except FileNotFoundError:
        raise PhiforgeError(f"image not found: {args.image}") from None
    ids = prompt_ids(tok, args.prompt)
    fit_sampling(args, len(ids), model.lm.cfg)
    with torch.no_grad():
        context = model.encode(visual[None].to(device))
    eot = eot_id(tok)
    with oom_advice(f"lower --max-new-tokens (now {args.max_new_tokens}) or use a device with more memory "
                    "(--device)"):
        out = generate(model.lm, torch.tensor([ids], device=device), args.max_new_tokens,
                       temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                       stop_token=eot, context=context)
    new = out[0, len(ids):].tolist()
    print(tok.decode(new[: new.index(eot)] if eot in new else new).strip())
    return 0


def run_eval(args) -> int:
    from phiforge.config import check_range
    from phiforge.vision.evaluate import ABLATIONS, evaluate_file

    if args.limit is not None:  # a negative one sliced records off the end
        check_range("--limit", args.limit, 1, note=" (leave it out for every record)")
    ablations = tuple(a.strip() for a in args.ablations.split(",") if a.strip())
    bad = [a for a in ablations if a not in ABLATIONS]
    if bad or not ablations:
        raise PhiforgeError(f"--ablations takes a comma list of {', '.join(ABLATIONS)}, got '{args.ablations}'")
    model, tok, _ = _load(args.checkpoint, args.device)
    result = {"checkpoint": args.checkpoint, **evaluate_file(model, tok, args.data, args.image_dir, ablations,
                                                              limit=args.limit)}
    kinds = sorted(result["chance"])
    stats = result["records"]
    skipped = {k: v for k, v in stats.items() if k not in ("records", "used") and v}
    if skipped:  # the same line `vision finetune` prints
        print(f"eval data: skipped {sum(skipped.values())} of {stats['records']} records: {skipped}")
    print(f"{result['questions']} questions on {result['images']} images")
    print(f"{'':10}" + "".join(f"{k:>10}" for k in kinds))
    for name, acc in result["results"].items():
        print(f"{name:10}" + "".join(f"{acc[k]['accuracy']:>10.1%}" for k in kinds))
    print(f"{'chance':10}" + "".join(f"{result['chance'][k]:>10.1%}" for k in kinds))
    print(f"{'majority':10}" + "".join(f"{result['majority'][k]:>10.1%}" for k in kinds))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return 0
