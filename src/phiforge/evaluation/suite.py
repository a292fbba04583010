"""Local tasks and text files evaluated together, e.g. at every validation of a training run (`eval_tasks`).

Everything is read and tokenised once, when the suite is built (so a missing file, a bad row or a choice longer
than the model's context is reported before training starts); each call then only runs the model. Every call
runs the same forwards on every rank (the items are not split), which is what FSDP needs; `limit` bounds the cost.

Metric names: task/NAME/acc, task/NAME/acc_norm (multiple choice), task/NAME/ll (cloze); text/NAME/bpb and
text/NAME/loss for text files.
"""

from __future__ import annotations

from dataclasses import dataclass

from phiforge.evaluation.perplexity import encode_documents, read_text_file, score_tokenized
from phiforge.evaluation.tasks import encode_task, load_task, score_task, task_metrics
from phiforge.tokenizer import check_vocab_fits

TEXT_FORMAT = "text"
TASK_KEYS = ("acc", "acc_norm", "ll")


@dataclass
class SuiteItem:
    name: str
    kind: str  # "task" | "text"
    requests: list | None = None  # task: its encoded requests
    streams: list | None = None  # text: [EOT] + tokens of each document
    byte_counts: list | None = None


class EvalSuite:
    def __init__(self, items: list[SuiteItem]):
        self.items = items

    @classmethod
    def load(cls, entries, tokenizer, max_len: int, vocab_size: int) -> "EvalSuite":
        """entries: objects with name, path, format (None: implied by the name; "text": a .txt/.jsonl text
        file), limit (questions or documents) and num_fewshot, such as train.config.EvalTaskConfig; for a model
        of context max_len and vocab_size embedding rows."""
        check_vocab_fits(tokenizer.get_vocab_size(), vocab_size, "eval_tasks: the tokenizer",
                         "give the data directory the tokenizer.json it was made with")
        items = []
        for e in entries:
            if e.format == TEXT_FORMAT:
                docs = read_text_file(e.path)[: e.limit]
                items.append(SuiteItem(e.name, "text", streams=encode_documents(tokenizer, [t for _, t in docs]),
                                       byte_counts=[len(t.encode("utf-8")) for _, t in docs]))
            else:
                task = load_task(e.name, e.path, format=e.format)
                items.append(SuiteItem(e.name, "task", requests=encode_task(
                    task, tokenizer, max_len, num_fewshot=e.num_fewshot, limit=e.limit)))
        return cls(items)

    def __call__(self, model) -> dict[str, float]:
        out = {}
        for item in self.items:
            if item.kind == "text":
                score = score_tokenized(model, item.streams, [item.name] * len(item.streams), item.byte_counts)
                out[f"text/{item.name}/bpb"], out[f"text/{item.name}/loss"] = score.bpb, score.loss
            else:
                metrics = task_metrics(item.requests, score_task(model, item.requests))
                out.update({f"task/{item.name}/{k}": metrics[k] for k in TASK_KEYS if k in metrics})
        return out
