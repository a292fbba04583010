"""Bits per byte and perplexity of documents.

Each document is one token stream that starts after <|endoftext|>: [EOT] + its tokens, every token after the
EOT scored once (sliding windows of the model's context, `stride` new tokens per window; default half the
context). A document's nats are the summed negative log-likelihoods of its tokens, its bytes its UTF-8 length;

    loss = nats / tokens        ppl = exp(loss)        bpb = nats / (ln 2 x bytes)

Totals add nats, tokens and bytes over documents (so bpb is byte-weighted, not a mean of per-document bpb).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from phiforge.errors import DataError, PhiforgeError
from phiforge.evaluation.scoring import eval_context, eval_mode, score_streams, window_plan


@dataclass
class TextScore:
    """Tokens, nats and bytes of a document or of a set of them (`documents`: the parts, when it is a set)."""

    name: str
    tokens: int = 0
    nats: float = 0.0
    bytes: int = 0
    documents: list["TextScore"] = field(default_factory=list)

    @property
    def loss(self) -> float:
        return self.nats / self.tokens if self.tokens else float("nan")

    @property
    def ppl(self) -> float:
        return math.exp(self.loss) if self.loss < 700 else float("inf")

    @property
    def bpb(self) -> float:
        return self.nats / (math.log(2) * self.bytes) if self.bytes else float("nan")

    @classmethod
    def total(cls, name: str, parts: Sequence["TextScore"]) -> "TextScore":
        return cls(name, sum(p.tokens for p in parts), sum(p.nats for p in parts), sum(p.bytes for p in parts),
                   list(parts))

    def to_dict(self) -> dict:
        out = {"name": self.name, "bpb": self.bpb, "nats": self.nats, "bytes": self.bytes, "tokens": self.tokens,
               "loss": self.loss, "ppl": self.ppl}
        if self.documents:
            out["documents"] = [d.to_dict() for d in self.documents]
        return out


def _stride(max_len: int, stride: int | None) -> int:
    stride = max_len // 2 if stride is None else stride
    if not 1 <= stride <= max_len:
        raise PhiforgeError(f"--stride must be between 1 and the model's context ({max_len}), got {stride}")
    return max(stride, 1)


def score_tokenized(model, streams: Sequence[Sequence[int]], names: Sequence[str], byte_counts: Sequence[int], *,
                    stride: int | None = None, batch_size: int = 8, progress: bool = False,
                    desc: str = "scoring") -> TextScore:
    """Score token streams ([EOT] + a document's tokens each) whose texts have `byte_counts` UTF-8 bytes."""
    max_len = eval_context(model)
    stride = _stride(max_len, stride)
    total = sum(len(window_plan(len(s), max_len, stride)) for s in streams)
    with tqdm(total=total, desc=desc, unit="window", disable=not progress, leave=False) as bar, eval_mode(model):
        scored = score_streams(model, streams, max_len, stride, batch_size, progress=bar.update)
    docs = [TextScore(n, tokens, nats, b) for n, (nats, tokens), b in zip(names, scored, byte_counts)]
    return TextScore.total("total", docs)


def encode_documents(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    """Each text as the token stream it is scored as: [<|endoftext|>] + its tokens."""
    from phiforge.tokenizer import eot_id

    eot = eot_id(tokenizer)
    return [[eot, *tokenizer.encode(t).ids] for t in texts]


def score_documents(model, tokenizer, texts: Sequence[str], *, names: Sequence[str] | None = None,
                    stride: int | None = None, batch_size: int = 8, progress: bool = False) -> TextScore:
    """Score each text as one document ([EOT] + its tokens); returns the total with one row per document."""
    streams = encode_documents(tokenizer, texts)
    names = list(names) if names is not None else [f"document {i + 1}" for i in range(len(texts))]
    return score_tokenized(model, streams, names, [len(t.encode("utf-8")) for t in texts], stride=stride,
                           batch_size=batch_size, progress=progress, desc="scoring text")


def check_dataset_tokenizer(checkpoint: str | Path, data_dir: str | Path, allow: bool = False) -> None:
    """The tokenizer that made the dataset's tokens must be the checkpoint's (a run directory: its latest), by
    identity (phiforge.tokenizer.tokenizer_identity): DataError otherwise, or with `allow` a warning."""
    from phiforge.data.shards import open_token_dataset
    from phiforge.model_files import resolve_checkpoint
    from phiforge.tokenizer import check_same_tokenizer, tokenizer_identity

    ckpt = resolve_checkpoint(Path(checkpoint))
    data_sha = open_token_dataset(data_dir).tokenizer_sha256(allow)
    check_same_tokenizer(tokenizer_identity(ckpt), f"checkpoint {ckpt}", data_sha, f"dataset {data_dir}", allow)


def score_dataset(model, data_dir: str | Path, split: str = "val", *, stride: int | None = None,
                  batch_size: int = 8, limit: int | None = None, progress: bool = False) -> TextScore:
    """Score each document of a `phiforge prepare` dataset's split whole (its own tokens, its recorded UTF-8
    bytes); `limit`: the first that many documents."""
    from phiforge.data.shards import open_token_dataset
    from phiforge.tokenizer import check_vocab_fits

    dataset = open_token_dataset(data_dir)
    check_vocab_fits(dataset.vocab_size, model.cfg.vocab_size, f"the tokenizer of the data in {data_dir}",
                     "the model was not trained on this tokenizer", DataError)
    eot, streams, names, byte_counts = dataset.eot_id, [], [], []
    for doc, tokens in dataset.iter_document_tokens(split):
        if limit is not None and len(streams) >= limit:
            break
        if not isinstance(doc.get("bytes"), int):
            raise DataError(f"document {doc.get('id')!r} in {Path(data_dir) / 'documents.jsonl'} has no UTF-8 "
                            "byte count ('bytes'); prepare the dataset again with this phiforge")
        if doc["bytes"] < 1:  # bits per byte divide by it; `prepare` never writes an empty document
            raise DataError(f"document {doc.get('id')!r} in {Path(data_dir) / 'documents.jsonl'} has 'bytes': "
                            f"{doc['bytes']}, but a document holds at least one byte; the record is corrupt "
                            "(prepare the dataset again)")
        ids = tokens.tolist()
        streams.append([eot, *(ids[:-1] if ids and ids[-1] == eot else ids)])
        names.append(str(doc.get("title") or doc.get("id")))
        byte_counts.append(doc["bytes"])
    if not streams:
        raise DataError(f"dataset {data_dir} has no documents in split '{split}'")
    return score_tokenized(model, streams, names, byte_counts, stride=stride, batch_size=batch_size,
                           progress=progress, desc=f"scoring {split}")


# ---------------------------------------------------------------------------------------------
# Text files


def read_text_file(path: str | Path) -> list[tuple[str, str]]:
    """(name, text) of each document of a .txt file (the whole file, name FILE) or a .jsonl file (the `text` of
    each line, name FILE:LINE). DataError naming the file (and line) for a missing, empty or non-UTF-8 file and for
    a line without a string `text`."""
    from phiforge.evaluation.files import read_bytes, read_rows, utf8

    path = Path(path)
    if path.suffix.lower() in (".jsonl", ".json"):
        docs = []
        for n, row in read_rows(path):
            if not isinstance(row.get("text"), str):
                raise DataError(f"{path} line {n}: no string field 'text'")
            docs.append((f"{path}:{n}", row["text"]))
        return docs
    text = utf8(read_bytes(path), path)
    if not text.strip():
        raise DataError(f"{path} is empty: no text to score")
    return [(str(path), text)]
