"""`phiforge eval`: bits per byte, perplexity and zero-/k-shot task accuracy of a checkpoint, offline.

    phiforge eval --checkpoint RUN --text book.txt more.jsonl [--stride N] [--out results.json]
    phiforge eval --checkpoint RUN --data data/gutenberg [--split val]
    phiforge eval --checkpoint RUN --tasks hellaswag=hs.jsonl,arc_easy=arc.parquet [--num-fewshot 5]
    phiforge eval --checkpoint RUN --harness lm-eval --tasks my_task --include-path tasks/
    phiforge eval make-cloze --data data/gutenberg --out gutenberg-cloze.jsonl
"""

from __future__ import annotations

import sys
from pathlib import Path

from phiforge.errors import PhiforgeError, oom_advice


def register(sub) -> None:
    p = sub.add_parser("eval", help="bits per byte, perplexity and task accuracy of a checkpoint (docs/evaluation.md)",
                       description="Evaluate a checkpoint on local files. `phiforge eval make-cloze --help`: build "
                                   "the gutenberg-cloze task.")
    p.add_argument("--checkpoint", help="checkpoint directory, or a run directory (uses its latest)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--text", nargs="+", metavar="FILE", help=".txt (one document) or .jsonl (a `text` per line)")
    src.add_argument("--data", metavar="DIR", help="a `phiforge prepare` dataset: each document of --split scored whole")
    p.add_argument("--split", default="val", help="--data: the split to score (default val)")
    p.add_argument("--allow-tokenizer-mismatch", action="store_true",
                   help="--data: score a dataset made by another tokenizer than the checkpoint's (with a warning)")
    p.add_argument("--context", type=int, default=None,
                   help="tokens of context per window and question (default: the sequence length the checkpoint "
                        "was trained with, from its train_state.json; else the model's max_seq_len)")
    p.add_argument("--stride", type=int, default=None,
                   help="new tokens per sliding window on documents longer than the context (default: half of it)")
    p.add_argument("--tasks", metavar="NAME[:FORMAT]=PATH,...",
                   help="local task files (JSONL or parquet); with --harness lm-eval: lm-eval task names")
    p.add_argument("--num-fewshot", type=int, default=0, help="demonstrations before each question (default 0)")
    p.add_argument("--seed", type=int, default=1234, help="few-shot sampling seed (default 1234, as lm-eval)")
    p.add_argument("--limit", type=int, default=None, help="score only the first N questions of each task")
    p.add_argument("--batch-size", type=int, default=8, help="sliding windows per forward (lm-eval: its batch size)")
    p.add_argument("--harness", choices=["builtin", "lm-eval"], default="builtin",
                   help="builtin (default) or lm-evaluation-harness on the HF export (the `eval` extra)")
    p.add_argument("--include-path", metavar="DIR", help="--harness lm-eval: a folder of task YAML files")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                   help="weights and compute (default float32)")
    p.add_argument("--threads", type=int, default=0,
                   help="CPU threads (0 keeps torch's default; 1 is fastest on a busy machine, docs/evaluation.md)")
    p.add_argument("--out", metavar="FILE.json", help="write the results as JSON (totals at the top level)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    p.set_defaults(func=run)
    actions = p.add_subparsers(dest="eval_action", metavar="ACTION", parser_class=type(p))
    c = actions.add_parser("make-cloze", help="LAMBADA-style cloze items from a dataset's held-out documents")
    c.add_argument("--data", required=True, metavar="DIR", help="a `phiforge prepare` dataset")
    c.add_argument("--out", required=True, metavar="FILE.jsonl")
    c.add_argument("--split", default="val")
    c.add_argument("--n-items", type=int, default=500, help="at most this many items (default 500)")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    c.set_defaults(func=run_make_cloze)


def run_make_cloze(args) -> int:
    from phiforge.config import check_seed
    from phiforge.evaluation.cloze import make_cloze

    check_seed("--seed", args.seed)

    out = make_cloze(args.data, args.out, n_items=args.n_items, seed=args.seed, split=args.split,
                     overwrite=args.overwrite)
    n = sum(1 for _ in open(out, encoding="utf-8"))
    print(f"wrote {n} cloze items from split '{args.split}' of {args.data} to {out} "
          f"(evaluate: --tasks gutenberg-cloze={out})")
    return 0


def _check_args(args) -> None:
    from phiforge.config import check_range, check_seed

    if not args.checkpoint:
        raise PhiforgeError("phiforge eval needs --checkpoint (or the make-cloze action)")
    if not (args.text or args.data or args.tasks):
        raise PhiforgeError("nothing to evaluate: give --text FILE..., --data DIR or --tasks NAME=PATH,...")
    if args.harness == "lm-eval" and (args.text or args.data or not args.tasks):
        raise PhiforgeError("--harness lm-eval runs --tasks (lm-eval task names) only")
    for flag, value, low in (("--num-fewshot", args.num_fewshot, 0), ("--limit", args.limit, 1),
                             ("--batch-size", args.batch_size, 1)):
        if value is not None and value < low:
            raise PhiforgeError(f"{flag} must be at least {low}, got {value}")
    check_seed("--seed", args.seed)
    check_range("--threads", args.threads, 0, 4096, note=" (0 keeps torch's default)")
    if args.out:
        _check_out(args)


def _check_out(args) -> None:
    """--out is never one of eval's inputs or inside one (not even with --overwrite), and can be written: both
    checked before anything is evaluated."""
    from phiforge.evaluation.tasks import parse_task_spec
    from phiforge.fileio import check_output_location, check_writable

    out = Path(args.out)
    tasks = [parse_task_spec(s)[2] for s in args.tasks.split(",") if s.strip()] \
        if args.tasks and args.harness == "builtin" else []
    inputs = [args.checkpoint, args.data, args.include_path, *(args.text or []), *tasks]
    check_output_location(out, inputs, what="--out")
    if out.is_dir() or (out.exists() and not args.overwrite):
        raise PhiforgeError(f"--out {out} exists; pass --overwrite to replace it or choose another path")
    check_writable(out, what="--out")


def run(args) -> int:
    import torch

    from phiforge.fileio import write_json_atomic

    _check_args(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    with oom_advice(f"lower --batch-size (now {args.batch_size}) or --context, use --dtype bfloat16, or a device "
                    "with more memory (--device)"):
        result = _run_lm_eval(args) if args.harness == "lm-eval" else _run_builtin(args)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(Path(args.out), result)
        print(f"wrote {args.out}")
    return 0


def _run_lm_eval(args) -> dict:
    from phiforge.evaluation.harness import run_lm_eval
    from phiforge.train.distributed import resolve_device

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    result = run_lm_eval(args.checkpoint, tasks, include_path=args.include_path, num_fewshot=args.num_fewshot,
                         limit=args.limit, batch_size=args.batch_size, device=str(resolve_device(args.device)),
                         seed=args.seed,
                         dtype=args.dtype)
    for name, metrics in result["results"].items():
        shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float))
        print(f"{name}: {shown}")
    return {"harness": "lm-eval", "checkpoint": str(args.checkpoint), **result}


def _load(args):
    import torch

    from phiforge.evaluation import load_for_eval
    from phiforge.train.distributed import resolve_device

    return load_for_eval(args.checkpoint, device=resolve_device(args.device), dtype=getattr(torch, args.dtype),
                         context=args.context)


def _run_builtin(args) -> dict:
    from phiforge.evaluation.perplexity import check_dataset_tokenizer
    from phiforge.evaluation.tasks import load_task, parse_task_spec

    specs = [parse_task_spec(s) for s in args.tasks.split(",") if s.strip()] if args.tasks else []
    names = [name for name, _, _ in specs]
    for name, fmt, path in reversed(specs):
        if names.count(name) > 1:  # results are kept by task name: the second would replace the first
            raise PhiforgeError(f"--tasks names two tasks '{name}': give each its own name, e.g. "
                                f"{name}-2:{fmt or name}={path}")
    tasks = [load_task(name, path, format=fmt) for name, fmt, path in specs]  # bad files fail before the model loads
    texts = _read_texts(args.text) if args.text else None
    if args.data:  # the dataset's tokens must be the checkpoint tokenizer's: checked before the model loads
        check_dataset_tokenizer(args.checkpoint, args.data, allow=args.allow_tokenizer_mismatch)
    model, tokenizer = _load(args)
    result = {"checkpoint": str(args.checkpoint), "context": model.eval_context}
    if texts is not None or args.data:
        result.update(_score_text(args, model, tokenizer, texts))
    if tasks:
        result.update(_score_tasks(args, model, tokenizer, tasks))
    return result


def _read_texts(paths: list[str]) -> list[tuple[str, list[tuple[str, str]]]]:
    from phiforge.evaluation.perplexity import read_text_file

    return [(p, read_text_file(p)) for p in paths]


def _score_text(args, model, tokenizer, texts) -> dict:
    from phiforge.evaluation.perplexity import TextScore, score_dataset, score_documents

    if texts is None:
        total = score_dataset(model, args.data, args.split, stride=args.stride, batch_size=args.batch_size,
                              progress=True)
        rows = total.documents
    else:
        rows = []
        for path, docs in texts:
            part = score_documents(model, tokenizer, [t for _, t in docs], names=[n for n, _ in docs],
                                   stride=args.stride, batch_size=args.batch_size, progress=True)
            rows.append(TextScore.total(path, part.documents) if len(docs) > 1 else part.documents[0])
        total = TextScore.total("total", rows)
    _print_text_table(rows, total)
    stride = args.stride if args.stride is not None else model.eval_context // 2
    return {**total.to_dict(), "stride": stride}


def _print_text_table(rows, total) -> None:
    width = max(len(r.name) for r in [*rows, total])
    print(f"{'':{width}}  {'tokens':>10} {'bytes':>11} {'loss':>8} {'ppl':>10} {'bpb':>7}")
    for r in [*rows, total] if len(rows) > 1 else rows:
        print(f"{r.name:{width}}  {r.tokens:>10,} {r.bytes:>11,} {r.loss:>8.4f} {r.ppl:>10.2f} {r.bpb:>7.4f}")


def _score_tasks(args, model, tokenizer, tasks) -> dict:
    from phiforge.evaluation.tasks import core_score, evaluate_task

    results = {}
    for task in tasks:
        results[task.name] = evaluate_task(model, tokenizer, task, num_fewshot=args.num_fewshot, seed=args.seed,
                                           limit=args.limit, progress=True)
        shown = ", ".join(f"{k} {v:.4f}" for k, v in results[task.name].items() if k not in ("n", "random_baseline"))
        print(f"{task.name} ({results[task.name]['n']} questions, {args.num_fewshot}-shot): {shown}", file=sys.stdout)
    core = core_score(results)
    print(f"CORE (accuracy centred on each task's random baseline, averaged): {core:.4f}")
    return {"tasks": results, "core": core, "num_fewshot": args.num_fewshot, "seed": args.seed}
