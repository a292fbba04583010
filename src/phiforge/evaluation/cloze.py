"""`phiforge eval make-cloze`: LAMBADA-style items from a prepared dataset's held-out documents (gutenberg-cloze).

An item is a passage of `min_sentences`..`max_sentences` consecutive sentences of one validation document whose
last word is the target, written as LAMBADA writes its items: {"text": "PASSAGE TARGET"} (whitespace collapsed to
single spaces, so the target is text.split(" ")[-1]), plus "target", "document" and "sentence" (where it came from).

The filter keeps targets a reader needs the passage for:
  - the target is the last word of its sentence (the sentence's closing punctuation and quotes are dropped),
    letters only, at least 3 of them, and not one of a short list of function words (STOPWORDS);
  - the same word (same case) already occurs in the passage before it;
  - the passage has 30..200 words.
Every sentence that can end a passage is tried with the lengths min..max sentences in an order drawn from one
random.Random(seed), keeping the first that passes; each sentence ends at most one item (passages may share
earlier sentences). The same generator then picks n_items of these candidates; items are written in document
order. Same dataset, same seed: the same file.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

from phiforge.errors import DataError, PhiforgeError

STOPWORDS = frozenset("""the and that was for with his her she him you not but had have are all this from they
were been one said which what would there their when who will more out then them into could some than very
any can our your its only other such much own most must also did does done may might shall should upon these
those being here where why how too well now yet just even ever every each both few many made make""".split())
MIN_WORDS, MAX_WORDS = 30, 200
_SENTENCE = re.compile(r".+?[.!?]+[\"'\u201d\u2019)\]]*(?= |$)")
_WORD = re.compile(r"[A-Za-z]+")


def sentences(text: str) -> list[str]:
    """The text's sentences, whitespace collapsed: runs ending in . ! or ? (and closing quotes/brackets)."""
    return [s.strip() for s in _SENTENCE.findall(" ".join(text.split()))]


def cloze_item(passage: list[str]) -> tuple[str, str] | None:
    """(context, target) when the passage's last sentence ends in a target that passes the filter, else None."""
    last = passage[-1].rstrip(".!?\"'\u201d\u2019)]")
    context, _, target = last.rpartition(" ")
    if not context or not _WORD.fullmatch(target) or len(target) < 3 or target.lower() in STOPWORDS:
        return None
    before = " ".join([*passage[:-1], context])
    if target not in _WORD.findall(before) or not MIN_WORDS <= len(before.split()) + 1 <= MAX_WORDS:
        return None
    return before, target


def _candidates(docs: list[tuple[str, list[str]]], rng: random.Random, lo: int, hi: int) -> list[tuple]:
    """(document index, last sentence, context, target) of one passing passage per possible last sentence."""
    found = []
    for d, (_, sents) in enumerate(docs):
        for end in range(len(sents)):
            lengths = list(range(lo, hi + 1))
            rng.shuffle(lengths)
            for k in lengths:
                item = cloze_item(sents[end + 1 - k : end + 1]) if k <= end + 1 else None
                if item is not None:
                    found.append((d, end, *item))
                    break
    return found


def document_texts(data_dir: Path, split: str) -> list[tuple[str, str]]:
    """(name, text) of each document of the split, decoded from its tokens (byte-level BPE decodes exactly)."""
    from phiforge.data.shards import open_token_dataset
    from phiforge.tokenizer import load_tokenizer

    dataset = open_token_dataset(data_dir)
    dataset.tokenizer_sha256()  # its own tokenizer.json, the one that made the tokens: never another in its place
    tok = load_tokenizer(data_dir)
    return [(str(doc.get("title") or doc.get("id")), tok.decode(tokens.tolist()))
            for doc, tokens in dataset.iter_document_tokens(split)]


def make_cloze(data_dir: str | Path, out_path: str | Path, *, n_items: int = 500, seed: int = 0, split: str = "val",
               min_sentences: int = 3, max_sentences: int = 6, overwrite: bool = False) -> Path:
    """Write up to n_items cloze items (LAMBADA's JSONL format, see the module docstring) made from the split's
    documents to out_path; returns it. An existing out_path needs `overwrite`; the file appears complete or not
    at all."""
    from phiforge.fileio import check_output_location, check_writable, write_text_atomic

    out = Path(out_path)
    if n_items < 1 or not 1 <= min_sentences <= max_sentences:
        raise PhiforgeError(f"need n_items >= 1 and 1 <= min_sentences <= max_sentences, got {n_items}, "
                            f"{min_sentences}, {max_sentences}")
    check_output_location(out, [data_dir], what="--out")
    if out.exists() and not overwrite:
        raise PhiforgeError(f"{out} exists; pass --overwrite to replace it or choose another path")
    check_writable(out, what="--out")
    docs = [(name, sentences(text)) for name, text in document_texts(Path(data_dir), split)]
    rng = random.Random(seed)
    found = _candidates(docs, rng, min_sentences, max_sentences)
    if not found:
        raise DataError(f"no passage of split '{split}' in {data_dir} passes the cloze filter")
    chosen = sorted(rng.sample(found, min(n_items, len(found))))
    lines = [json.dumps({"text": f"{context} {target}", "target": target, "document": docs[d][0], "sentence": end},
                        ensure_ascii=False) for d, end, context, target in chosen]
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out, "\n".join(lines) + "\n")
    return out
