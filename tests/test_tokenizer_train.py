"""`phiforge tokenizer train` (issue 13, items 2 and 4): byte-level BPE on the bundled books or text/jsonl files,
deterministic, usable by prepare, training checkpoints and HF exports; bad input is a one-line error."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer

from conftest import assert_one_line_error, run_cli
from data_fixtures import cleaned_documents
from phiforge.data.shards import open_token_dataset
from phiforge.data.sources import BundledGutenberg
from phiforge.tokenizer import EOT

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = "It is a truth universally acknowledged — ünïcödé 日本\r\n\tCall me Ishmael.  \x00\x7f"


@pytest.fixture(scope="module")
def tok8k(tmp_path_factory):
    """The bundled books' tokenizer at vocab 8,192 (about 3 s), and the books prepared with it (about 6 s)."""
    base = tmp_path_factory.mktemp("tok")
    assert run_cli_plain("tokenizer", "train", "--source", "bundled", "--vocab-size", "8192",
                         "--out", base / "tok") == 0
    assert run_cli_plain("prepare", "gutenberg", "--source", "bundled", "--tokenizer-dir", base / "tok",
                         "--out", base / "data") == 0
    return base / "tok", base / "data"


def run_cli_plain(*argv) -> int:
    from phiforge.cli import main

    return main([str(a) for a in argv])


def test_every_bundled_book_round_trips_byte_for_byte(tok8k):
    tok_dir, data_dir = tok8k
    tok = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    assert tok.get_vocab_size() == 8192 and tok.token_to_id(EOT) == 0
    ds = open_token_dataset(data_dir)
    assert ds.vocab_size == 8192 and ds.eot_id == 0 and ds.dtype == np.uint16
    assert (data_dir / "tokenizer.json").read_bytes() == (tok_dir / "tokenizer.json").read_bytes()
    streams = {s: ds.stream(s) for s in ds.splits()}
    texts = {i: text for i, _, text, _ in cleaned_documents(BundledGutenberg())}
    docs = list(ds.iter_documents())
    assert sorted(d["id"] for d in docs) == sorted(texts) and len(texts) == 7
    for d in docs:
        ids = streams[d["split"]].read(d["offset"], d["tokens"]).tolist()
        assert ids[-1] == 0 and 0 not in ids[:-1]
        assert tok.decode(ids[:-1], skip_special_tokens=False).encode() == texts[d["id"]].encode(), d["id"]
    assert tok.decode(tok.encode(SAMPLE).ids) == SAMPLE  # any bytes, not only the books'


def test_held_out_book_is_left_out_and_reported(tok8k):
    report = json.loads((tok8k[0] / "tokenizer-train.json").read_text())
    assert report["held_out"] == ["105"] and report["documents"] == 6  # Persuasion, as prepare holds it out
    assert report["vocab_size"] == 8192 and report["eot_id"] == 0


def test_same_input_gives_byte_identical_tokenizer(tok8k, tmp_path):
    """Another process, one thread instead of all, another hash seed: the same tokenizer.json."""
    env = {**os.environ, "RAYON_NUM_THREADS": "1", "PYTHONHASHSEED": "123", "PYTHONPATH": str(ROOT / "src")}
    subprocess.run([sys.executable, "-m", "phiforge", "tokenizer", "train", "--vocab-size", "8192",
                    "--out", str(tmp_path / "again")], check=True, env=env, capture_output=True)
    assert (tmp_path / "again" / "tokenizer.json").read_bytes() == (tok8k[0] / "tokenizer.json").read_bytes()


def test_document_order_does_not_matter():
    from phiforge.data.prepare import text_chunks
    from phiforge.tokenizer import train_byte_level_bpe

    texts = [text for _, _, text, _ in cleaned_documents(BundledGutenberg())][:3]
    pieces = [c for t in texts for c in text_chunks(t)]
    one = train_byte_level_bpe(texts, 1024).to_str()
    assert train_byte_level_bpe(pieces[::-1], 1024).to_str() == one
    assert train_byte_level_bpe(texts[::-1], 1024).to_str() == one


def test_train_checkpoint_and_hf_export_carry_the_tokenizer(capsys, tok8k, tmp_path):
    import transformers
    tok_dir, data_dir = tok8k
    run = tmp_path / "run"
    code, _, err = run_cli(capsys, "train", "--set", "model.preset=tiny", "--set", "model.vocab_size=8192",
                           "--set", "model.n_layer=1", "--set", f"data.dir={data_dir}", "--set", "data.seq_len=32",
                           "--set", "micro_batch_size=2", "--set", "max_steps=2", "--set", "eval_interval=2",
                           "--set", "eval_batches=2", "--set", "save_interval=2", "--set", f"out_dir={run}")
    assert code == 0, err
    evals = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines() if '"eval"' in l]
    assert evals and all(0 < e["val_bpb"] < 20 for e in evals)
    ckpt = run / "checkpoints" / "step-00000002"
    assert (ckpt / "tokenizer.json").read_bytes() == (tok_dir / "tokenizer.json").read_bytes()
    code, _, err = run_cli(capsys, "convert", "to-hf", ckpt, tmp_path / "hf")
    assert code == 0, err
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["eos_token_id"] == 0
    ours = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    slow = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf", use_fast=False)
    fast = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    want = ours.encode(SAMPLE).ids
    assert slow.encode(SAMPLE) == fast.encode(SAMPLE) == want and slow.eos_token_id == 0
    assert slow.decode(want) == SAMPLE


def test_text_and_jsonl_files(capsys, tmp_path):
    (tmp_path / "in" / "deep").mkdir(parents=True)
    (tmp_path / "in" / "a.txt").write_text("the cat sat on the mat. " * 50, encoding="utf-8")
    (tmp_path / "in" / "deep" / "b.jsonl").write_text(
        "\n".join(json.dumps({"body": f"the dog and the cat {i}"}) for i in range(40)) + "\n", encoding="utf-8")
    (tmp_path / "in" / "ignored.csv").write_text("x,y\n", encoding="utf-8")
    code, out, err = run_cli(capsys, "tokenizer", "train", "--input", tmp_path / "in", "--text-key", "body",
                             "--vocab-size", "300", "--out", tmp_path / "tok")
    assert code == 0, err
    report = json.loads((tmp_path / "tok" / "tokenizer-train.json").read_text())
    assert report["documents"] == 41 and report["padded_to"] == 320 and report["held_out"] == []
    assert [Path(f).name for f in report["corpus"]["files"]] == ["a.txt", "b.jsonl"]
    tok = Tokenizer.from_file(str(tmp_path / "tok" / "tokenizer.json"))
    assert 257 < tok.get_vocab_size() <= 320 and tok.token_to_id("Ġcat") is not None
    # an earlier tokenizer output is replaced without --overwrite
    code, _, err = run_cli(capsys, "tokenizer", "train", "--input", tmp_path / "in" / "a.txt",
                           "--vocab-size", "300", "--out", tmp_path / "tok")
    assert code == 0, err
    assert json.loads((tmp_path / "tok" / "tokenizer-train.json").read_text())["documents"] == 1


def _bad_jsonl(d: Path) -> Path:
    (d / "bad.jsonl").write_text('{"text": "fine"}\n{"text": broken\n', encoding="utf-8")
    return d / "bad.jsonl"


def _no_key(d: Path) -> Path:
    (d / "nokey.jsonl").write_text('{"content": "text under another name"}\n', encoding="utf-8")
    return d / "nokey.jsonl"


def _empty(d: Path) -> Path:
    (d / "empty").mkdir()
    (d / "empty" / "blank.txt").write_text("  \n\n", encoding="utf-8")
    (d / "empty" / "blank.jsonl").write_text('{"text": ""}\n', encoding="utf-8")
    return d / "empty"


@pytest.mark.parametrize("make, args, needles", [
    (_empty, ["--vocab-size", "300"], ["no text to train on", "2 empty"]),
    (None, ["--vocab-size", "256"], ["vocab_size", "at least 257", "256 byte tokens and <|endoftext|>"]),
    (None, ["--vocab-size", "-3"], ["vocab_size", "at least 257"]),
    (None, ["--min-frequency", "0"], ["min_frequency"]),
    (_bad_jsonl, [], ["bad.jsonl:2", "malformed json line"]),
    (_no_key, [], ["nokey.jsonl:1", "'text'", "content", "--text-key"]),
    (lambda d: d / "missing.txt", [], ["input not found", "missing.txt"]),
    (lambda d: d / "in.txt", ["--source", "bundled"], ["not both"]),
    (None, ["--source", "nowhere"], ["unknown --source 'nowhere'"]),
    (None, ["--set", "gutenberg.workers=2"], ["unknown config key 'gutenberg.workers'"]),
])
def test_bad_input_is_one_line_and_writes_nothing(capsys, tmp_path, make, args, needles):
    (tmp_path / "in.txt").write_text("some text", encoding="utf-8")
    inputs = ["--input", make(tmp_path)] if make else []
    code, _, err = run_cli(capsys, "tokenizer", "train", *inputs, *args, "--out", tmp_path / "tok")
    assert_one_line_error(code, err, *needles)
    assert not (tmp_path / "tok").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tok")]


def test_out_dir_with_other_files_is_refused_and_kept(capsys, tmp_path):
    out = tmp_path / "tok"
    out.mkdir()
    (out / "notes.txt").write_text("mine", encoding="utf-8")
    code, _, err = run_cli(capsys, "tokenizer", "train", "--vocab-size", "300", "--out", out)
    assert_one_line_error(code, err, str(out), "not empty", "not a trained tokenizer", "--overwrite")
    assert [p.name for p in out.iterdir()] == ["notes.txt"] and (out / "notes.txt").read_text() == "mine"
    (tmp_path / "in.txt").write_text("some text", encoding="utf-8")
    code, _, err = run_cli(capsys, "tokenizer", "train", "--input", tmp_path, "--out", tmp_path / "sub")
    assert_one_line_error(code, err, "inside the input")
