"""LLaVA-format visual instruction data: parsing, the prompt template, loss masks and batches.

A data file is a JSON list (or JSON lines) of records
    {"id": "...", "image": "relative/or/absolute/path.png",
     "conversations": [{"from": "human", "value": "<image>\\nWhat color is it?"}, {"from": "gpt", "value": "red"}, ...]}

Prompt template (the image enters only through cross-attention, so `<image>` is removed from the text):
    USER: {human 1}\\nASSISTANT: {gpt 1}<|endoftext|>\\nUSER: {human 2}\\nASSISTANT: {gpt 2}<|endoftext|>
The loss covers only the assistant's tokens: " {gpt}" and its <|endoftext|> (labels are -100 elsewhere).

Bad input: a malformed file or record raises DataError naming the line or record; a record whose image is
missing or unreadable is skipped and counted (see VisionDataset.stats).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import torch
from tokenizers import Tokenizer

from phiforge.data.readers import BadRecord, iter_jsonl
from phiforge.errors import DataError
from phiforge.fileio import read_user_text
from phiforge.tokenizer import eot_id
from phiforge.vision.config import EncoderConfig
from phiforge.vision.encoders import load_visual

IMAGE_TOKEN = "<image>"
ROLES = ("human", "gpt")


# ---------------------------------------------------------------------------------------------
# Parsing


def read_records(path: str | Path) -> list[dict]:
    """Records of a LLaVA JSON list (or .jsonl file), each checked for the fields this pipeline uses."""
    path = Path(path)
    text = read_user_text(path, DataError, "data file")
    if path.suffix == ".jsonl":
        records = []
        for rec in iter_jsonl(path):
            if isinstance(rec, BadRecord):
                raise DataError(rec.error(path))
            records.append(rec[1])
    else:
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: malformed JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
        if not isinstance(records, list):
            raise DataError(f"{path}: expected a JSON list of records, got {type(records).__name__}")
    for i, rec in enumerate(records):
        _check_record(rec, f"{path}: record {i}")
    return records


def _check_record(rec, where: str) -> None:
    if not isinstance(rec, dict):
        raise DataError(f"{where}: expected an object, got {type(rec).__name__}")
    where = f"{where} (id {rec['id']!r})" if "id" in rec else where
    if "image" in rec and not isinstance(rec["image"], str):
        raise DataError(f"{where}: 'image' must be a path string")
    turns = rec.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{where}: 'conversations' must be a non-empty list")
    for j, turn in enumerate(turns):
        if not isinstance(turn, dict) or turn.get("from") not in ROLES or not isinstance(turn.get("value"), str):
            raise DataError(f"{where}: conversations[{j}] must be {{\"from\": \"human\"|\"gpt\", \"value\": str}}")
    if not any(t["from"] == "gpt" for t in turns):
        raise DataError(f"{where}: no 'gpt' turn to learn from")


# ---------------------------------------------------------------------------------------------
# Prompt template and loss masks


def format_turn(turn: dict, first: bool) -> str:
    value = turn["value"].replace(IMAGE_TOKEN, "").strip()
    if turn["from"] == "human":
        return ("" if first else "\n") + f"USER: {value}\nASSISTANT:"
    return f" {value}"  # followed by <|endoftext|>


def encode_conversation(tok: Tokenizer, turns: list[dict]) -> tuple[list[int], list[int]]:
    """Token ids of the whole conversation and, per token, itself where it is an assistant token, else -100."""
    eot = eot_id(tok)
    ids: list[int] = []
    labels: list[int] = []
    for j, turn in enumerate(turns):
        seg = tok.encode(format_turn(turn, first=j == 0)).ids
        if turn["from"] == "gpt":
            seg = seg + [eot]
            labels += seg
        else:
            labels += [-100] * len(seg)
        ids += seg
    return ids, labels


def prompt_ids(tok: Tokenizer, question: str) -> list[int]:
    """A one-question prompt, ready for the assistant's answer to be generated."""
    return tok.encode(format_turn({"from": "human", "value": question}, first=True)).ids


# ---------------------------------------------------------------------------------------------
# Dataset and batches


def load_visuals(records: list[dict], image_dir: Path, enc: EncoderConfig) -> tuple[list[tuple[dict, torch.Tensor]], Counter]:
    """(record, visual) for every record whose image loads; the stats count the records skipped and why."""
    stats = Counter(records=len(records))
    out = []
    for rec in records:
        if "image" not in rec:
            stats["no_image"] += 1  # text-only records: this pipeline always conditions on an image
            continue
        try:
            visual = load_visual(image_dir / rec["image"], enc)
        except FileNotFoundError:
            stats["missing_image"] += 1
            continue
        except DataError:
            stats["unreadable_image"] += 1
            continue
        out.append((rec, visual))
    stats["used"] = len(out)
    return out, stats


class VisionDataset:
    """Decodes every usable image once into memory (uint8) and tokenises every conversation.

    items[i] = (visual, input ids, target labels), targets already shifted by one position."""

    def __init__(self, path: str | Path, tok: Tokenizer, enc: EncoderConfig, max_len: int,
                 image_dir: str | Path | None = None):
        records = read_records(path)
        image_dir = Path(image_dir) if image_dir else Path(path).parent
        pairs, self.stats = load_visuals(records, image_dir, enc)
        self.items: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        for rec, visual in pairs:
            ids, labels = encode_conversation(tok, rec["conversations"])
            ids, labels = ids[: max_len + 1], labels[: max_len + 1]
            if all(t == -100 for t in labels[1:]):
                self.stats["too_long"] += 1  # truncation cut every assistant token
                continue
            self.items.append((visual, torch.tensor(ids[:-1]), torch.tensor(labels[1:])))
        self.stats["used"] = len(self.items)
        if not self.items:
            raise DataError(f"{path}: no usable records ({dict(self.stats)})")
        self.pad_id = eot_id(tok)

    def __len__(self) -> int:
        return len(self.items)

    def batch(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(visual [B, ...], idx [B, T], labels [B, T]), right-padded; padding is never a target."""
        items = [self.items[i] for i in indices]
        T = max(len(ids) for _, ids, _ in items)
        idx = torch.full((len(items), T), self.pad_id, dtype=torch.long)
        labels = torch.full((len(items), T), -100, dtype=torch.long)
        for row, (_, ids, lab) in enumerate(items):
            idx[row, : len(ids)] = ids
            labels[row, : len(lab)] = lab
        return torch.stack([v for v, _, _ in items]), idx, labels

    def shuffled_batches(self, batch_size: int, seed: int, start: int = 0, rank: int = 0,
                         world_size: int = 1) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Endless batches: a fresh seeded permutation each epoch, full batches only.

        The stream is one of global batches of batch_size x world_size records; rank r gets records r, r + world,
        ... of each, so the ranks together see exactly the batches of one process with the global batch size.
        start skips that many global batches (a resumed run's position) without building them."""
        g = torch.Generator().manual_seed(seed)
        size = min(batch_size * world_size, len(self) - len(self) % world_size)
        if size < world_size:
            raise DataError(f"{len(self)} usable records cannot feed {world_size} ranks")
        per_epoch = len(self) // size
        epoch, skip = divmod(start, per_epoch)
        for _ in range(epoch):  # advance the generator past whole epochs already seen
            torch.randperm(len(self), generator=g)
        while True:
            order = torch.randperm(len(self), generator=g).tolist()
            for i in range(skip, per_epoch):
                yield self.batch(order[i * size : (i + 1) * size][rank::world_size])
            skip = 0
