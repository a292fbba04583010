"""Zero- and k-shot tasks from local files, scored as lm-evaluation-harness 0.4.x scores them.

    task = load_task("hellaswag", "hellaswag/validation.jsonl")        # JSONL or parquet, as the releases ship
    metrics = evaluate_task(model, tokenizer, task, num_fewshot=0)     # {"acc", "acc_norm", "acc_bytes", "n", ...}
    core_score({"hellaswag": metrics, ...})                            # CORE-style aggregate

A format turns each row into a question the way lm-eval's task YAML and utils do (docs/evaluation.md lists them):

    mc       multiple choice: context + " " + choice for each choice, one shared context
    partial  partial scoring (WinoGrande): one context per option, the same continuation scored after each
    cloze    one context and one target (LAMBADA): acc = every target token is the model's argmax

Requests are tokenised as lm-eval's `hf` model does (trailing spaces of the context move to the continuation;
the continuation is encode(context + continuation)[len(encode(context)):]; an empty context becomes
<|endoftext|>); each question's choices are scored together (scoring.score_continuations: the shared context
runs once). Metrics, with lm-eval's names and definitions:

    acc        the choice of highest log-likelihood is the gold one (first of equal maxima, as numpy.argmax)
    acc_norm   the same with log-likelihood / len(choice) in characters (lm-eval's acc_norm)
    acc_bytes  the same with log-likelihood / the choice's UTF-8 bytes (lm-eval's acc_bytes)
    cloze:     acc (greedy match of the whole target), ll (mean target log-likelihood), ppl = exp(-ll)

k-shot: the k demonstrations before each question are drawn as lm-eval's default sampler draws them, from one
random.Random(seed) over the questions in order; from the task's own rows (the question itself left out, as
lm-eval does with fewshot_split equal to the test split) or from a separate `fewshot_path` file.

Stable API (phiforge study calls it): load_task, evaluate_task, encode_task, score_task, task_metrics,
core_score, parse_task_spec, TASK_FORMATS.
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from phiforge.errors import ConfigError, DataError
from phiforge.evaluation.files import read_rows

DEFAULT_FEWSHOT_SEED = 1234  # lm-eval's default fewshot_random_seed


@dataclass
class Example:
    """One question. mc: `query` and its `choices`; partial: `choices` are the contexts, `target` the shared
    continuation; cloze: `query` and `target` (with its leading space)."""

    row: int
    doc: dict
    kind: str
    query: str = ""
    choices: list[str] = field(default_factory=list)
    gold: int = 0
    target: str = ""

    def demonstration(self) -> str:
        """This question answered, as a few-shot example: question, target delimiter " ", answer."""
        if self.kind == "mc":
            return f"{self.query} {self.choices[self.gold]}"
        if self.kind == "partial":
            return f"{self.choices[self.gold]} {self.target}"
        return f"{self.query} {self.target}"

    def pairs(self, prefix: str) -> list[tuple[str, str]]:
        """(context, continuation) of each choice after the few-shot `prefix` (lm-eval's requests)."""
        if self.kind == "mc":
            return [(prefix + self.query, " " + c) for c in self.choices]
        if self.kind == "partial":
            return [(prefix + c, " " + self.target) for c in self.choices]
        return [(prefix + self.query, self.target)]


@dataclass
class Task:
    name: str
    format: str
    path: Path
    examples: list[Example]
    fewshot: list[Example] | None = None  # demonstrations; None: the examples (a question never shows itself)

    @property
    def kind(self) -> str:
        return self.examples[0].kind


# ---------------------------------------------------------------------------------------------
# Fields of a row


def _field(doc: dict, key: str, where: str):
    if key not in doc or doc[key] is None:
        raise DataError(f"{where}: no field '{key}'")
    return doc[key]


def _text(doc: dict, key: str, where: str) -> str:
    value = _field(doc, key, where)
    if not isinstance(value, str):
        raise DataError(f"{where}: field '{key}' must be a string, got {type(value).__name__}")
    return value


def _choice_list(value, where: str, key: str) -> list[str]:
    if not isinstance(value, (list, tuple)) or not all(isinstance(c, str) for c in value):
        raise DataError(f"{where}: '{key}' must be a list of strings")
    if len(value) < 2:
        raise DataError(f"{where}: '{key}' has {len(value)} choice(s); a question needs at least two")
    if not all(value):
        raise DataError(f"{where}: '{key}' has an empty choice")
    return list(value)


def _label(value, n: int, where: str, key: str) -> int:
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool):
        raise DataError(f"{where}: '{key}' must be an integer choice index, got {value!r}")
    if not 0 <= value < n:
        raise DataError(f"{where}: '{key}' {value} is out of range for {n} choices (0..{n - 1})")
    return value


def _labelled_choices(doc: dict, where: str) -> tuple[str, list[str], int]:
    """(question, choice texts, gold index) of an ARC / OpenBookQA row: the Hugging Face layout
    (question[_stem], choices {text, label}, answerKey) or AllenAI's JSONL (question {stem, choices [{text, label}]})."""
    if isinstance(doc.get("question"), dict):
        q = doc["question"]
        stem = _text(q, "stem", where)
        listed = _field(q, "choices", where)
        if not isinstance(listed, list) or not all(isinstance(c, dict) for c in listed):
            raise DataError(f"{where}: 'question.choices' must be a list of {{text, label}} objects")
        texts, labels = [c.get("text") for c in listed], [c.get("label") for c in listed]
    else:
        stem = _text(doc, "question_stem" if "question_stem" in doc else "question", where)
        choices = _field(doc, "choices", where)
        if not isinstance(choices, dict):
            raise DataError(f"{where}: 'choices' must be an object with lists 'text' and 'label'")
        texts, labels = choices.get("text"), choices.get("label")
    texts = _choice_list(texts, where, "choices.text")
    answer = str(_field(doc, "answerKey", where)).lstrip()
    if not isinstance(labels, list) or answer not in labels or len(labels) != len(texts):
        raise DataError(f"{where}: answerKey {answer!r} is not one of the choice labels {labels}")
    return stem, texts, labels.index(answer)


# ---------------------------------------------------------------------------------------------
# Formats: row -> Example, as lm-eval's task definitions render them


def _hellaswag_clean(text: str) -> str:  # lm_eval/tasks/hellaswag/utils.py: preprocess
    text = text.strip().replace(" [title]", ". ")
    return re.sub("\\[.*?\\]", "", text).replace("  ", " ")


def _hellaswag(doc: dict, where: str) -> Example:
    ctx = _text(doc, "ctx_a", where) + " " + _text(doc, "ctx_b", where).capitalize()
    choices = [_hellaswag_clean(e) for e in _choice_list(_field(doc, "endings", where), where, "endings")]
    return Example(0, doc, "mc", _hellaswag_clean(_text(doc, "activity_label", where) + ": " + ctx), choices,
                   _label(_field(doc, "label", where), len(choices), where, "label"))


def _arc(doc: dict, where: str) -> Example:
    stem, texts, gold = _labelled_choices(doc, where)
    return Example(0, doc, "mc", f"Question: {stem}\nAnswer:", texts, gold)


def _openbookqa(doc: dict, where: str) -> Example:
    stem, texts, gold = _labelled_choices(doc, where)
    return Example(0, doc, "mc", stem, texts, gold)


def _piqa(doc: dict, where: str) -> Example:
    choices = [_text(doc, "sol1", where), _text(doc, "sol2", where)]
    return Example(0, doc, "mc", f"Question: {_text(doc, 'goal', where)}\nAnswer:", choices,
                   _label(_field(doc, "label", where), 2, where, "label"))


def _winogrande(doc: dict, where: str) -> Example:
    sentence = _text(doc, "sentence", where)
    if "_" not in sentence:
        raise DataError(f"{where}: 'sentence' has no blank '_' to fill")
    idx = sentence.index("_")
    options = [_text(doc, "option1", where), _text(doc, "option2", where)]
    answer = str(_field(doc, "answer", where)).strip()
    if answer not in ("1", "2"):
        raise DataError(f"{where}: 'answer' must be 1 or 2, got {doc['answer']!r}")
    return Example(0, doc, "partial", "", [sentence[:idx] + o for o in options], int(answer) - 1,
                   sentence[idx + 1:].strip())


def _copa(doc: dict, where: str) -> Example:
    connector = {"cause": "because", "effect": "therefore"}.get(_field(doc, "question", where))
    if connector is None:
        raise DataError(f"{where}: 'question' must be cause or effect, got {doc['question']!r}")
    choices = [_text(doc, k, where) for k in ("choice1", "choice2")]
    if not all(choices):
        raise DataError(f"{where}: an empty choice")
    return Example(0, doc, "mc", _text(doc, "premise", where).strip()[:-1] + f" {connector}",
                   [" " + c[0].lower() + c[1:] for c in choices], _label(_field(doc, "label", where), 2, where,
                                                                          "label"))


def _boolq(doc: dict, where: str) -> Example:
    if "label" in doc:
        gold = _label(doc["label"], 2, where, "label")
    elif isinstance(doc.get("answer"), bool):  # the original BoolQ JSONL
        gold = int(doc["answer"])
    else:
        raise DataError(f"{where}: no field 'label' (or boolean 'answer')")
    query = f"{_text(doc, 'passage', where)}\nQuestion: {_text(doc, 'question', where)}?\nAnswer:"
    return Example(0, doc, "mc", query, ["no", "yes"], gold)


def _lambada(doc: dict, where: str) -> Example:
    words = _text(doc, "text", where).split(" ")
    if len(words) < 2 or not words[-1]:
        raise DataError(f"{where}: 'text' needs a context and a last word after a space")
    return Example(0, doc, "cloze", " ".join(words[:-1]), target=" " + words[-1])


def _mc(doc: dict, where: str) -> Example:
    choices = _choice_list(_field(doc, "choices", where), where, "choices")
    return Example(0, doc, "mc", _text(doc, "context", where), choices,
                   _label(_field(doc, "label", where), len(choices), where, "label"))


FORMATS: dict[str, Callable[[dict, str], Example]] = {
    "hellaswag": _hellaswag, "arc": _arc, "piqa": _piqa, "winogrande": _winogrande, "openbookqa": _openbookqa,
    "copa": _copa, "boolq": _boolq, "lambada": _lambada, "mc": _mc,
}
# task name -> format (a name not listed here needs NAME:FORMAT)
TASK_FORMATS = {**{f: f for f in FORMATS}, "arc_easy": "arc", "arc_challenge": "arc", "lambada_openai": "lambada",
                "lambada_standard": "lambada", "cloze": "lambada", "gutenberg-cloze": "lambada"}


def parse_task_spec(spec: str) -> tuple[str, str | None, str]:
    """'NAME[:FORMAT]=PATH' -> (name, format or None, path)."""
    name, sep, path = spec.partition("=")
    name, _, fmt = name.strip().partition(":")
    if not sep or not name or not path.strip():
        raise ConfigError(f"task '{spec}' must be NAME=PATH or NAME:FORMAT=PATH (formats: {', '.join(TASK_FORMATS)})")
    return name, fmt.strip() or None, path.strip()


def task_format(name: str, fmt: str | None = None) -> str:
    """The format a task is read in: `fmt`, or the one its name implies; ConfigError for an unknown one."""
    key = fmt or name
    if key not in TASK_FORMATS:
        raise ConfigError(f"unknown task format '{key}' for task '{name}' (known: {', '.join(TASK_FORMATS)}; "
                          "name another with NAME:FORMAT=PATH)")
    return TASK_FORMATS[key]


def _read_examples(fmt: str, path: Path) -> list[Example]:
    examples = []
    for n, doc in read_rows(path):
        ex = FORMATS[fmt](doc, f"{path} row {n}")
        ex.row = n
        examples.append(ex)
    return examples


def load_task(name: str, path: str | Path, *, format: str | None = None, fewshot_path: str | Path | None = None) -> Task:
    """Read a task file (JSONL or parquet) in the format `format` or the one `name` implies (TASK_FORMATS).
    Errors name the file and the row."""
    fmt = task_format(name, format)
    path = Path(path)
    fewshot = _read_examples(fmt, Path(fewshot_path)) if fewshot_path is not None else None
    return Task(name, fmt, path, _read_examples(fmt, path), fewshot)


# ---------------------------------------------------------------------------------------------
# Requests: tokenised as lm-eval's hf model tokenises them


@dataclass
class Request:
    example: Example
    contexts: list[list[int]]  # one shared context (mc, cloze) or one per choice (partial)
    continuations: list[list[int]]


def _encode_pair(tokenizer, eot: int, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's TemplateLM.loglikelihood / _encode_pair for a causal model."""
    if context == "":
        cont = tokenizer.encode(continuation).ids
        return ([eot], cont) if not cont or cont[0] != eot else (cont[:1], cont[1:])
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    whole = tokenizer.encode(context + continuation).ids
    ctx = tokenizer.encode(context).ids
    return ctx, whole[len(ctx):]


def _demonstrations(task: Task, example: Example, k: int, rnd: random.Random) -> list[Example]:
    """lm-eval's ContextSampler.sample: k from the separate few-shot file, or k + 1 from the task's own rows with
    the question itself removed."""
    if task.fewshot is not None:
        if k > len(task.fewshot):
            raise DataError(f"{k}-shot needs {k} demonstrations; the few-shot file of {task.name} has "
                            f"{len(task.fewshot)}")
        return rnd.sample(task.fewshot, k)
    pool = task.examples
    if k + 1 > len(pool):
        raise DataError(f"{k}-shot needs {k + 1} rows in {task.path} (the question and {k} others); it has {len(pool)}")
    shots = [x for x in rnd.sample(pool, k + 1) if x.doc != example.doc][:k]
    if len(shots) < k:  # duplicates of the question: draw again from the others
        shots = rnd.sample([x for x in pool if x.doc != example.doc], k)
    return shots


def encode_task(task: Task, tokenizer, max_len: int, *, num_fewshot: int = 0, seed: int = DEFAULT_FEWSHOT_SEED,
                limit: int | None = None) -> list[Request]:
    """The first `limit` questions (all by default) as token requests for a model of context `max_len`.
    DataError naming the file and row when a continuation is empty or longer than the context."""
    from phiforge.tokenizer import eot_id

    if num_fewshot < 0:
        raise ConfigError(f"--num-fewshot must be 0 or more, got {num_fewshot}")
    eot, rnd, requests = eot_id(tokenizer), random.Random(seed), []
    for ex in task.examples[:limit]:
        prefix = "".join(d.demonstration() + "\n\n" for d in _demonstrations(task, ex, num_fewshot, rnd)) \
            if num_fewshot else ""
        encoded = [_encode_pair(tokenizer, eot, c, x) for c, x in ex.pairs(prefix)]
        for i, (_, cont) in enumerate(encoded):
            what = f"{task.path} row {ex.row}: {'the target' if ex.kind == 'cloze' else f'choice {i}'}"
            if not cont:
                raise DataError(f"{what} encodes to no tokens")
            if len(cont) > max_len:
                raise DataError(f"{what} is {len(cont)} tokens, longer than the model's context ({max_len})")
        contexts = [encoded[0][0]] if ex.kind != "partial" else [c for c, _ in encoded]
        requests.append(Request(ex, contexts, [x for _, x in encoded]))
    return requests


# ---------------------------------------------------------------------------------------------
# Scoring and metrics


def score_task(model, requests: list[Request], progress: bool = False) -> list[list[tuple[float, bool | None]]]:
    """(log-likelihood, greedy) of each choice of each request; each question's choices in one batched forward.
    greedy (every token the argmax) is computed for cloze only (None otherwise): it costs a pass over the vocabulary."""
    from phiforge.evaluation.scoring import eval_context, eval_mode, score_continuations, score_sequences

    max_len, out = eval_context(model), []
    greedy = bool(requests) and requests[0].example.kind == "cloze"
    with eval_mode(model):
        for r in tqdm(requests, desc="scoring", unit="question", disable=not progress, leave=False):
            if len(r.contexts) == 1:
                out.append(score_continuations(model, r.contexts[0], r.continuations, max_len, greedy))
            else:
                out.append(score_sequences(model, [c + x for c, x in zip(r.contexts, r.continuations)],
                                           [len(x) for x in r.continuations], max_len, greedy))
    return out


def _argmax(values: list[float]) -> int:
    return max(range(len(values)), key=lambda i: (values[i], -i))  # the first of equal maxima, as numpy


def task_metrics(requests: list[Request], scores: list[list[tuple[float, bool]]]) -> dict:
    """lm-eval's per-task metrics (means over questions), the number of questions `n` and the random baseline
    (the mean of 1 / choices; 0 for cloze)."""
    n = len(requests)
    examples = [r.example for r in requests]
    if examples[0].kind == "cloze":
        lls = [s[0][0] for s in scores]
        ll = sum(lls) / n
        return {"acc": sum(s[0][1] for s in scores) / n, "ll": ll, "ppl": math.exp(-ll) if -ll < 700 else math.inf,
                "n": n, "random_baseline": 0.0}
    out = {"acc": sum(_argmax([a for a, _ in s]) == ex.gold for ex, s in zip(examples, scores)) / n}
    if examples[0].kind == "mc":  # lm-eval measures the choices (for partial scoring: the contexts; it reports acc)
        out["acc_norm"] = sum(_argmax([a / len(c) for (a, _), c in zip(s, ex.choices)]) == ex.gold
                              for ex, s in zip(examples, scores)) / n
        out["acc_bytes"] = sum(_argmax([a / len(c.encode("utf-8")) for (a, _), c in zip(s, ex.choices)]) == ex.gold
                               for ex, s in zip(examples, scores)) / n
    return {**out, "n": n, "random_baseline": sum(1 / len(ex.choices) for ex in examples) / n}


def evaluate_task(model, tokenizer, task: Task, *, num_fewshot: int = 0, seed: int = DEFAULT_FEWSHOT_SEED,
                  limit: int | None = None, progress: bool = False) -> dict:
    """Metrics of `model` on `task` (see the module docstring): acc, acc_norm, acc_bytes for multiple choice;
    acc, ll, ppl for cloze; with n and random_baseline."""
    from phiforge.evaluation.scoring import eval_context

    requests = encode_task(task, tokenizer, eval_context(model), num_fewshot=num_fewshot, seed=seed, limit=limit)
    return task_metrics(requests, score_task(model, requests, progress=progress))


def core_score(results: dict[str, dict]) -> float:
    """CORE-style aggregate: the mean over tasks of (acc - random_baseline) / (1 - random_baseline)."""
    centred = [(m["acc"] - m["random_baseline"]) / (1 - m["random_baseline"]) for m in results.values()]
    return sum(centred) / len(centred) if centred else float("nan")
