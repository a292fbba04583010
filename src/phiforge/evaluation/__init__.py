"""`phiforge eval`: how good a model is, offline, on local files (docs/evaluation.md).

    perplexity.py  bits per byte and perplexity of text files and of a prepared dataset's documents
    tasks.py       multiple-choice and cloze tasks (HellaSwag, ARC, PIQA, WinoGrande, OpenBookQA, COPA, BoolQ,
                   LAMBADA, generic) scored as lm-evaluation-harness 0.4.x scores them; the CORE aggregate
    cloze.py       `make-cloze`: LAMBADA-style items from a dataset's held-out books (gutenberg-cloze)
    suite.py       a fixed set of tasks and text files evaluated during training (`eval_tasks`)
    harness.py     the bridge to lm-evaluation-harness itself (`--harness lm-eval`, the `eval` extra)
    scoring.py     the forward passes they share (context once per question, lm_head only where needed)

Stable Python API (phiforge study uses it):

    model, tokenizer = load_for_eval(CKPT_OR_RUN_DIR, device="auto")
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


def load_for_eval(checkpoint: str | Path, device: str = "auto", dtype=None):
    """(model in eval mode, its tokenizer) from a checkpoint directory or a run directory (its latest checkpoint);
    device auto|cpu|cuda|cuda:N, dtype a torch dtype (None: as saved)."""
    from phiforge.checkpoint import load_checkpoint, read_config, resolve_checkpoint
    from phiforge.errors import CheckpointError
    from phiforge.tokenizer import load_tokenizer
    from phiforge.train.distributed import resolve_device

    ckpt = resolve_checkpoint(Path(checkpoint))
    tokenizer, vocab = load_tokenizer(ckpt), read_config(ckpt).vocab_size
    if tokenizer.get_vocab_size() > vocab:
        raise CheckpointError(f"the tokenizer of {ckpt} has {tokenizer.get_vocab_size()} tokens but the model's "
                              f"vocabulary only {vocab}: give the model its own tokenizer.json")
    return load_checkpoint(ckpt, device=resolve_device(device), dtype=dtype), tokenizer
