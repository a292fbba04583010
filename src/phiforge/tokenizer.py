"""Tokenizer: GPT-2 byte-level BPE (the base of Phi-2's CodeGen tokenizer), built offline.

The built-in tokenizer is made from the bundled `assets/gpt2/encoder.json` and `vocab.bpe`
(OpenAI, MIT; see assets/gpt2/README.md). A checkpoint's own tokenizer.json, e.g. from a downloaded
microsoft/phi-2 or from `phiforge tokenizer train` (`train_byte_level_bpe`), takes precedence over it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
import threading
from functools import lru_cache
from pathlib import Path

from tokenizers import Tokenizer, decoders, pre_tokenizers, trainers
from tokenizers.models import BPE

from phiforge.errors import CheckpointError, ConfigError, DataError

ASSETS = Path(__file__).parent / "assets" / "gpt2"
EOT = "<|endoftext|>"
EOT_ID = 50256
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "added_tokens.json")
MIN_BPE_VOCAB = 257  # the 256 byte tokens and <|endoftext|>


def _byte_level(bpe: BPE) -> Tokenizer:
    """GPT-2's arrangement: its regex split into pre-tokens, each byte written as one printable character."""
    tok = Tokenizer(bpe)
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return tok


@lru_cache(maxsize=1)
def _builtin_json() -> str:
    tok = _byte_level(BPE.from_file(str(ASSETS / "encoder.json"), str(ASSETS / "vocab.bpe")))
    tok.add_special_tokens([EOT])
    return tok.to_str()


def train_byte_level_bpe(texts, vocab_size: int, min_frequency: int = 2, progress: bool = False) -> Tokenizer:
    """A byte-level BPE like GPT-2's learnt from `texts` (an iterable of strings): <|endoftext|> is id 0, the
    256 bytes follow, then the merges, up to `vocab_size` tokens in all (fewer when the texts hold fewer pairs
    seen `min_frequency` times). Every byte sequence round-trips. The same texts give the same tokenizer.json
    byte for byte, whatever their order and the number of threads (merge ties are broken by token ids)."""
    if vocab_size < MIN_BPE_VOCAB:
        raise ValueError(f"vocab_size {vocab_size} < {MIN_BPE_VOCAB}")
    tok = _byte_level(BPE())
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=[EOT],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=progress)
    tok.train_from_iterator(texts, trainer)
    return tok


def builtin_tokenizer() -> Tokenizer:
    return Tokenizer.from_str(_builtin_json())


def load_tokenizer(ckpt_dir: Path | None = None) -> Tokenizer | CheckedTokenizer:
    """The checkpoint's tokenizer.json if it has one (as a CheckedTokenizer), else the built-in GPT-2 BPE."""
    if ckpt_dir is not None and (Path(ckpt_dir) / "tokenizer.json").exists():
        path = Path(ckpt_dir) / "tokenizer.json"
        try:
            return CheckedTokenizer(_holding_stderr(Tokenizer.from_file, str(path)), path)
        except BaseException as e:  # tokenizers raises a bare Exception on bad files, a PanicException on worse
            if not isinstance(e, Exception) and not _is_panic(e):
                raise
            raise CheckpointError(f"cannot read tokenizer {path}: {_first_line(e)}") from None
    return builtin_tokenizer()


def _is_panic(e: BaseException) -> bool:
    return type(e).__name__ == "PanicException"  # pyo3's: the Rust library panicked (not an Exception subclass)


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]


_HELD: dict = {}  # process id -> the temporary file _holding_stderr sends file descriptor 2 to
_HELD_LOCK = threading.Lock()


def _holding_stderr(fn, *args, **kwargs):
    """fn(*args, **kwargs) with file descriptor 2 sent to a temporary file, whose text is copied back after unless
    fn raised Rust's panic: the library's multi-line report of it (a backtrace under RUST_BACKTRACE) is dropped
    for the one-line error the caller makes of it. About 10 microseconds a call."""
    with _HELD_LOCK:
        held = _HELD.get(os.getpid())
        if held is None:
            held = _HELD.setdefault(os.getpid(), tempfile.TemporaryFile())
        sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(held.fileno(), 2)
        panicked = False
        try:
            return fn(*args, **kwargs)
        except BaseException as e:
            panicked = _is_panic(e)
            raise
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            size = os.lseek(held.fileno(), 0, os.SEEK_END)
            if size:
                text = os.pread(held.fileno(), size, 0)
                os.lseek(held.fileno(), 0, os.SEEK_SET)
                os.ftruncate(held.fileno(), 0)
                if not panicked:
                    os.write(2, text)


class CheckedTokenizer:
    """A tokenizer.json phiforge did not make: calls go to its tokenizers.Tokenizer, but a panic of the Rust library
    while encoding or decoding (a crafted pre-tokenizer regex that backtracks without end, say) is a CheckpointError
    naming the file, in one line."""

    def __init__(self, tok: Tokenizer, path: Path):
        self.tokenizer, self.path = tok, Path(path)

    def __getattr__(self, name: str):
        if name.startswith("__") or name in ("tokenizer", "path"):  # not set yet (copying, unpickling)
            raise AttributeError(name)
        return getattr(self.tokenizer, name)

    def _guarded(self, fn, *args, **kwargs):
        try:
            return _holding_stderr(fn, *args, **kwargs)
        except BaseException as e:
            if not _is_panic(e):
                raise
            raise CheckpointError(f"bad tokenizer {self.path}: the tokenizers library failed on this input "
                                  f"({_first_line(e)}); replace the file with a working tokenizer.json") from None

    def encode(self, *args, **kwargs):
        return self._guarded(self.tokenizer.encode, *args, **kwargs)

    def encode_batch(self, *args, **kwargs):
        return self._guarded(self.tokenizer.encode_batch, *args, **kwargs)

    def encode_batch_fast(self, *args, **kwargs):
        return self._guarded(self.tokenizer.encode_batch_fast, *args, **kwargs)

    def decode(self, *args, **kwargs):
        return self._guarded(self.tokenizer.decode, *args, **kwargs)

    def decode_batch(self, *args, **kwargs):
        return self._guarded(self.tokenizer.decode_batch, *args, **kwargs)


def tokenizer_sha256(tok: Tokenizer) -> str:
    """A tokenizer's identity: the sha256 of its canonical serialisation (`to_str()`), so the same tokenizer saved
    pretty-printed or compact has one identity. A dataset's index.json records it as tokenizer.sha256."""
    return hashlib.sha256(tok.to_str().encode()).hexdigest()


def tokenizer_identity(d: Path) -> str | None:
    """The identity (tokenizer_sha256) of the tokenizer.json in directory d: a dataset, a checkpoint or a model
    directory; None when d has none (nothing is assumed in its place)."""
    path = Path(d) / "tokenizer.json"
    if not path.is_file():
        return None
    stat = path.stat()
    return _identity_of_file(str(path.resolve()), stat.st_size, stat.st_mtime_ns)


@lru_cache(maxsize=16)
def _identity_of_file(path: str, size: int, mtime_ns: int) -> str:  # size and mtime: a changed file is re-read
    return tokenizer_sha256(load_tokenizer(Path(path).parent))


def refuse_tokenizer_mismatch(problem: str, fix: str, allow: bool = False) -> None:
    """A tokenizer identity problem: DataError("problem; fix"), or with `allow` (allow_tokenizer_mismatch,
    --allow-tokenizer-mismatch) a one-line warning, and the command goes on."""
    if allow:
        print(f"phiforge: warning: {problem}; going on (tokenizer mismatch allowed)", file=sys.stderr)
        return
    raise DataError(f"{problem}; {fix}")


def check_same_tokenizer(model_sha: str | None, model_what: str, data_sha: str | None, data_what: str,
                         allow: bool = False) -> None:
    """Refuse a model and token data made by different tokenizers (identities as tokenizer_identity; model_sha
    None: the model has no tokenizer.json, data_sha None: unknown and already allowed), unless `allow`."""
    if data_sha is None or model_sha == data_sha:
        return
    fix = "use data prepared with the model's tokenizer, or pass --allow-tokenizer-mismatch if this is intended"
    if model_sha is None:
        refuse_tokenizer_mismatch(f"{model_what} has no tokenizer.json, so it cannot be checked against the "
                                  f"tokenizer of {data_what}", fix, allow)
    else:
        refuse_tokenizer_mismatch(f"{data_what} was made by another tokenizer than {model_what} (tokenizer sha256 "
                                  f"{data_sha[:12]} vs {model_sha[:12]}): the same token ids stand for other text",
                                  fix, allow)


def check_vocab_fits(n_tokens: int, vocab_size: int, source: str,
                     fix: str = "choose a larger preset or set model.vocab_size", error: type = ConfigError) -> None:
    """Refuse a model whose embedding has fewer rows than the tokenizer (of `source`) has tokens: `error`, naming
    both sizes and what to do (`fix`; the default is a trainer's)."""
    if n_tokens > vocab_size:
        raise error(f"{source} has {n_tokens} tokens but the model's vocabulary has {vocab_size}; {fix}")


def eot_id(tok: Tokenizer) -> int:
    i = tok.token_to_id(EOT)
    if i is None:
        raise CheckpointError(f"tokenizer has no {EOT} token")
    return i


def save_tokenizer_files(out_dir: Path, source_dir: Path | None = None) -> None:
    """Carry over a source checkpoint's tokenizer files; otherwise write the built-in tokenizer.

    The written files load with both `tokenizers.Tokenizer.from_file` and transformers' AutoTokenizer.
    """
    out_dir = Path(out_dir)
    copied = set()
    if source_dir is not None:
        for name in TOKENIZER_FILES:
            src = Path(source_dir) / name
            if src.exists() and src.resolve() != (out_dir / name).resolve():
                shutil.copyfile(src, out_dir / name)
                copied.add(name)
    if "tokenizer.json" not in copied and not (out_dir / "tokenizer.json").exists():
        (out_dir / "tokenizer.json").write_text(_builtin_json(), encoding="utf-8")
    if "tokenizer_config.json" not in copied and not (out_dir / "tokenizer_config.json").exists():
        cfg = {"tokenizer_class": "GPT2Tokenizer", "bos_token": EOT, "eos_token": EOT, "unk_token": EOT,
               "add_prefix_space": False, "model_max_length": 2048, "clean_up_tokenization_spaces": False}
        (out_dir / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")


def token_byte_lengths(tok: Tokenizer) -> list[int]:
    """The UTF-8 bytes each token id stands for (special tokens such as <|endoftext|>: 0), for bits per byte.
    A byte-level BPE writes every byte as one character of its vocabulary, so a token's length in characters
    is its length in bytes, also for tokens that hold part of a multi-byte character."""
    special = {i for i, t in tok.get_added_tokens_decoder().items() if t.special}
    byte_level = "ByteLevel" in json.dumps(json.loads(tok.to_str()).get("pre_tokenizer"))
    lengths = []
    for i in range(tok.get_vocab_size()):
        piece = tok.id_to_token(i)
        if i in special or piece is None:
            lengths.append(0)
        else:
            lengths.append(len(piece) if byte_level else len(tok.decode([i]).encode("utf-8")))
    return lengths
