"""`phiforge tokenizer train` as an API: a byte-level BPE learnt from the text the model will be trained on.

    from phiforge.data.tokenizer_train import TokenizerTrainConfig, train_tokenizer

    train_tokenizer(TokenizerTrainConfig(out="tok/gutenberg-8k", vocab_size=8192))          # the bundled books
    train_tokenizer(TokenizerTrainConfig(out="tok/mine", input=["notes/", "web.jsonl.zst"]))  # text / JSON lines

The corpus is either Gutenberg books, chosen by the keys of `prepare gutenberg` (`gutenberg: {source: mirror,
mirror: ..., val_books: 2}`) and cleaned by the same code, so the tokenizer sees the text the model will, with
the books that `prepare gutenberg` would hold out for validation left out; or `input` files: plain text (one
document per file) and JSON lines (one document per record, its `text_key` field), .gz and .zst included,
folders searched for *.txt and *.jsonl. Nothing is deduplicated.

The vocabulary: `vocab_size` tokens in all, <|endoftext|> (id 0, the document separator `prepare` puts after
every document) and the 256 bytes included, rounded up to a multiple of `pad_vocab_multiple` (the model's, 64)
so that every embedding row is a token. OUT gets tokenizer.json, tokenizer_config.json and tokenizer-train.json
(what it was trained on); `prepare --tokenizer-dir OUT` uses it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from phiforge.config import BadValue, apply_overrides, check_range, from_dict, read_yaml
from phiforge.data.readers import BadRecord, iter_jsonl, open_binary
from phiforge.data.sources import RawDoc, Skip, Source, Unit, clean_raw
from phiforge.errors import DataError
from phiforge.tokenizer import MIN_BPE_VOCAB

KIND = "tokenizer"
# The largest vocabulary (docs/data.md): the BPE trainer allocates tables by vocab_size up front (10**14 aborted
# in Rust asking for petabytes), and 2**20 is four times the largest vocabularies in use.
MAX_BPE_VOCAB = 2**20
REPORT = "tokenizer-train.json"
TEXT_SUFFIXES = (".txt", ".jsonl")
COMPRESSED = ("", ".gz", ".zst")


@dataclass
class TokenizerTrainConfig:
    """`phiforge tokenizer train`: every flag is the key of the same name; the Gutenberg flags go to `gutenberg`."""

    out: str | None = None  # the tokenizer directory
    vocab_size: int = 8192  # tokens in all, <|endoftext|> and the 256 bytes included
    pad_vocab_multiple: int = 64  # vocab_size is rounded up to a multiple of this (the model's)
    min_frequency: int = 2  # a pair is merged only if it occurs at least this often
    input: list[str] | str | None = None  # text / JSON-lines files or folders, instead of Gutenberg books
    text_key: str = "text"  # the field of a JSON line that holds its document
    gutenberg: dict = field(default_factory=dict)  # the `prepare gutenberg` keys that choose the books
    overwrite: bool = False  # replace an OUT that holds something else
    progress: bool | None = None  # progress bars: None only on a terminal

    def __post_init__(self):
        if isinstance(self.input, str):
            self.input = [self.input]
        check_range("vocab_size", self.vocab_size, MIN_BPE_VOCAB,
                    note=" (the 256 byte tokens and <|endoftext|> come first)")
        check_range("vocab_size", self.vocab_size, hi=MAX_BPE_VOCAB, note=" (2**20)")
        check_range("pad_vocab_multiple", self.pad_vocab_multiple, 1)
        if self.padded_vocab > MAX_BPE_VOCAB:
            raise BadValue("pad_vocab_multiple", f"rounds vocab_size {self.vocab_size} up to {self.padded_vocab}, "
                                                 f"more than the largest vocabulary, {MAX_BPE_VOCAB} (2**20)")
        check_range("min_frequency", self.min_frequency, 1)
        if self.input is not None and not self.input:
            raise BadValue("input", "needs at least one file or folder")
        if self.input and self.gutenberg:
            raise DataError(f"give input files or Gutenberg keys ({', '.join(self.gutenberg)}), not both")
        self.books()  # checks the Gutenberg keys now, before anything is read

    @property
    def padded_vocab(self) -> int:
        m = self.pad_vocab_multiple
        return -(-self.vocab_size // m) * m

    def books(self):
        """The GutenbergPrepareConfig that the `gutenberg` keys describe (None with input files)."""
        if self.input:
            return None
        from phiforge.data.corpora import gutenberg_selection

        return gutenberg_selection(self.gutenberg)

    def input_paths(self) -> list[Path]:
        """What the corpus is read from (OUT may not be or hold any of them)."""
        if self.input:
            return [Path(p) for p in self.input]
        b = self.books()
        return [Path(p) for p in (b.mirror, b.catalog, *(b.parquet or ()), b.cache) if p]


def load_tokenizer_config(path: str | Path | None = None, flags: dict | None = None,
                          sets: list[str] | None = None) -> TokenizerTrainConfig:
    """Defaults, then the YAML file, then flags ({key: value or its text}; the Gutenberg keys go under
    `gutenberg`, other keys that are not config keys are ignored), then `key=value` overrides."""
    from phiforge.data.corpora import SELECTION_KEYS, GutenbergPrepareConfig, flag_values

    data = read_yaml(path) if path else {}
    own = [f.name for f in dataclasses.fields(TokenizerTrainConfig) if f.name != "gutenberg"]
    flags = flags or {}
    data.update(flag_values(TokenizerTrainConfig, {k: v for k, v in flags.items() if k in own}))
    books = flag_values(GutenbergPrepareConfig, {k: v for k, v in flags.items() if k in SELECTION_KEYS})
    if books:
        data["gutenberg"] = data.get("gutenberg") if isinstance(data.get("gutenberg"), dict) else {}
        for key, value in books.items():  # --val-ids on the command line replaces the file's val_books
            data["gutenberg"].pop(GutenbergPrepareConfig.exclusive.get(key), None)
            data["gutenberg"][key] = value
    apply_overrides(data, sets or [])
    return from_dict(TokenizerTrainConfig, data)


# ---------------------------------------------------------------------------------------------- input files


def _is_jsonl(path: Path) -> bool:
    return ".jsonl" in path.suffixes


def _expand(paths: list[str]) -> list[Path]:
    """Files as given, and the *.txt / *.jsonl (.gz, .zst) files under folders, sorted, each once."""
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            wanted = {s + c for s in TEXT_SUFFIXES for c in COMPRESSED}
            files += sorted(f for f in p.rglob("*") if f.is_file() and any(f.name.endswith(w) for w in wanted))
        elif p.is_file():
            files.append(p)
        else:
            raise DataError(f"input not found: {p}")
    return list(dict.fromkeys(files))


class TextFiles(Source):
    """Plain text files (one document each) and JSON lines (one document per record's `text_key`)."""

    name = "files"

    def __init__(self, paths: list[str], text_key: str = "text"):
        super().__init__()
        self.files, self.text_key = _expand(paths), text_key

    def ids(self) -> list[str]:
        return [str(f) for f in self.files]

    def describe(self) -> dict:
        return {"source": self.name, "files": [str(f) for f in self.files], "text_key": self.text_key}

    def units(self) -> list[Unit]:
        return [Unit(key=str(f), source=self.name, size=f.stat().st_size, ref=f) for f in self.files]

    def read(self, unit: Unit) -> Iterator[RawDoc]:
        path = unit.ref
        if not _is_jsonl(path):
            with open_binary(path) as f:
                yield RawDoc(id=str(path), title=path.name, source=self.name, data=f.read(), origin=str(path))
            return
        for item in iter_jsonl(path):
            if isinstance(item, BadRecord):
                raise DataError(f"{path}:{item.line}: {item.reason} ({item.detail})")
            line, rec = item
            text = rec.get(self.text_key)
            if not isinstance(text, str):
                raise DataError(f"{path}:{line}: the record has no text field '{self.text_key}' (a string); "
                                f"its keys: {', '.join(rec) or 'none'} (choose the field with --text-key)")
            yield RawDoc(id=f"{path}:{line}", title="", source=self.name, text=text, origin=f"{path}:{line}")


# ---------------------------------------------------------------------------------------------- the corpus


@dataclass
class Corpus:
    """The documents a tokenizer is trained on, read once as a stream; counts filled in as it is read."""

    source: Source
    held_out: list[str]
    progress: bool | None = None
    documents: int = 0
    bytes: int = 0
    skipped: int = 0

    def texts(self) -> Iterator[str]:
        """Each kept document's cleaned text, in pieces at pre-token boundaries (so the pieces count the same
        words as the whole text, and the trainer's threads share long books)."""
        from tqdm import tqdm

        from phiforge.data.prepare import text_chunks

        units, skip = self.source.units(), set(self.held_out)
        with tqdm(total=sum(u.size for u in units), unit="B", unit_scale=True, desc="reading",
                  disable=None if self.progress is None else not self.progress, file=sys.stderr) as bar:
            for unit in units:
                for raw in self.source.read(unit):
                    if isinstance(raw, RawDoc) and raw.id in skip:
                        continue
                    c = raw if isinstance(raw, Skip) else clean_raw(raw)
                    if isinstance(c, Skip):
                        self.skipped += 1
                        continue
                    self.documents += 1
                    self.bytes += len(c[0].encode("utf-8"))
                    yield from text_chunks(c[0])
                bar.update(unit.size)


def open_corpus(cfg: TokenizerTrainConfig) -> Corpus:
    if cfg.input:
        return Corpus(TextFiles(cfg.input, cfg.text_key), [], cfg.progress)
    from phiforge.data.corpora import build_source

    source, val = build_source(cfg.books())
    return Corpus(source, val["val_ids"], cfg.progress)


# ---------------------------------------------------------------------------------------------- training


def train_tokenizer(cfg: TokenizerTrainConfig, echo=print) -> dict:
    """Train the tokenizer cfg describes into cfg.out; returns what tokenizer-train.json records. OUT is checked
    before anything is read and written only at the end (fileio.output_dir); a failure leaves it as it was."""
    from phiforge.fileio import claim_output_dir, output_dir, write_json_atomic
    from phiforge.tokenizer import eot_id, save_tokenizer_files, train_byte_level_bpe

    if not cfg.out:
        raise DataError("give --out DIR (out: in a --config file): where the tokenizer goes")
    claim_output_dir(cfg.out, KIND, cfg.input_paths(), cfg.overwrite)
    t0 = time.perf_counter()
    corpus = open_corpus(cfg)
    show = sys.stderr.isatty() if cfg.progress is None else cfg.progress
    tok = train_byte_level_bpe(corpus.texts(), cfg.padded_vocab, cfg.min_frequency, progress=show)
    if corpus.documents == 0:
        raise DataError(f"the corpus has no text to train on ({corpus.skipped} empty or unreadable document(s); "
                        f"held out for validation: {', '.join(corpus.held_out) or 'none'})")
    text = tok.to_str()
    report = {"vocab_size": tok.get_vocab_size(), "asked": cfg.vocab_size, "padded_to": cfg.padded_vocab,
              "eot_id": eot_id(tok), "sha256": hashlib.sha256(text.encode()).hexdigest(),
              "documents": corpus.documents, "bytes": corpus.bytes, "skipped": corpus.skipped,
              "held_out": corpus.held_out, "corpus": corpus.source.describe(), "config": dataclasses.asdict(cfg),
              "seconds": round(time.perf_counter() - t0, 3)}
    with output_dir(cfg.out, KIND, cfg.input_paths(), cfg.overwrite) as tmp:
        (tmp / "tokenizer.json").write_text(text, encoding="utf-8")
        save_tokenizer_files(tmp)  # tokenizer_config.json for transformers
        write_json_atomic(tmp / REPORT, report)
    if echo is not None:
        for line in summary(report, cfg.out):
            echo(line)
    return report


def summary(report: dict, out) -> list[str]:
    lines = [f"trained on {report['documents']:,} document(s), {report['bytes']:,} bytes"
             + (f" (held out for validation: {', '.join(report['held_out'])})" if report["held_out"] else "")]
    if report["vocab_size"] < report["padded_to"]:
        lines.append(f"note: the corpus gave only {report['vocab_size']:,} tokens of the {report['padded_to']:,} "
                     f"asked for (no more pairs occur often enough)")
    elif report["padded_to"] != report["asked"]:
        lines.append(f"vocab_size {report['asked']:,} rounded up to {report['padded_to']:,}, a multiple of "
                     "pad_vocab_multiple, so that every embedding row is a token")
    lines.append(f"wrote {out}: {report['vocab_size']:,} tokens, <|endoftext|> = {report['eot_id']}, in "
                 f"{report['seconds']:.1f} s; use it with `phiforge prepare ... --tokenizer-dir {out}`")
    return lines
