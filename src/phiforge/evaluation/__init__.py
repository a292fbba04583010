"""`phiforge eval`: how good a model is, offline, on local files (docs/evaluation.md).

    perplexity.py  bits per byte and perplexity of text files and of a prepared dataset's documents
    tasks.py       multiple-choice and cloze tasks (HellaSwag, ARC, PIQA, WinoGrande, OpenBookQA, COPA, BoolQ,
                   LAMBADA, generic) scored as lm-evaluation-harness 0.4.x scores them; the CORE aggregate
    cloze.py       `make-cloze`: LAMBADA-style items from a dataset's held-out books (gutenberg-cloze)
    suite.py       a fixed set of tasks and text files evaluated during training (`eval_tasks`)
    harness.py     the bridge to lm-evaluation-harness itself (`--harness lm-eval`, the `eval` extra)
    scoring.py     the forward passes they share (context once per question, lm_head only where needed)

Stable Python API (phiforge study uses it):

    model, tokenizer = load_for_eval(CKPT_OR_RUN_DIR, device="cpu")     # any torch device ("cuda", "cuda:1")
    score_documents(model, tokenizer, texts, *, names=None, stride=None, batch_size=8) -> TextScore
    score_dataset(model, data_dir, split="val", *, stride=None, batch_size=8, limit=None) -> TextScore
        TextScore: .tokens .nats .bytes .loss .ppl .bpb, .documents (per-document TextScores), .to_dict()
    load_task(name, path, *, format=None, fewshot_path=None) -> Task
    evaluate_task(model, tokenizer, task, *, num_fewshot=0, seed=1234, limit=None) -> dict of metrics
    core_score({task name: metrics}) -> float
    make_cloze(data_dir, out_path, *, n_items=500, seed=0, split="val") -> Path
"""

from __future__ import annotations

from pathlib import Path

from phiforge.evaluation.cloze import make_cloze
from phiforge.evaluation.perplexity import TextScore, score_dataset, score_documents
from phiforge.evaluation.tasks import Task, core_score, evaluate_task, load_task

__all__ = ["TextScore", "Task", "core_score", "evaluate_task", "load_for_eval", "load_task", "make_cloze",
           "score_dataset", "score_documents"]


def load_for_eval(checkpoint: str | Path, device="cpu", dtype=None, context: int | None = None):
    """(model in eval mode, its tokenizer) from a checkpoint directory or a run directory (its latest checkpoint);
    device a torch device or its name (`phiforge eval --device auto` resolves auto with
    train.distributed.resolve_device: evaluation sits below training and imports nothing of it), dtype a torch
    dtype (None: as saved). The model's `eval_context` (the window every evaluation uses, scoring.eval_context) is
    `context`, else the sequence length the checkpoint was trained with (its train_state.json), else its
    max_seq_len."""
    from phiforge.errors import CheckpointError
    from phiforge.model_files import load_checkpoint, read_config, resolve_checkpoint
    from phiforge.tokenizer import check_vocab_fits, load_tokenizer

    ckpt = resolve_checkpoint(Path(checkpoint))
    tokenizer, mcfg = load_tokenizer(ckpt), read_config(ckpt)
    check_vocab_fits(tokenizer.get_vocab_size(), mcfg.vocab_size, f"the tokenizer of {ckpt}",
                     "give the model its own tokenizer.json", CheckpointError)
    window = checked_context(context if context is not None else trained_context(ckpt), mcfg.max_seq_len)
    return load_checkpoint(ckpt, device=device, dtype=dtype, eval_context=window), tokenizer


def trained_context(ckpt: Path) -> int | None:
    """The sequence length a training checkpoint's run trained with (None for other checkpoints)."""
    import json

    try:
        return int(json.loads((Path(ckpt) / "train_state.json").read_text(encoding="utf-8"))["seq_len"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def checked_context(context: int | None, max_seq_len: int) -> int:
    from phiforge.errors import ConfigError

    if context is not None and not 1 < context <= max_seq_len:
        raise ConfigError(f"--context must be between 2 and the model's max_seq_len ({max_seq_len}), got {context}")
    return context or max_seq_len
