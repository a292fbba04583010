import json
import shutil

import numpy as np
import pytest
import torch

from phiforge.data.gutenberg import clean_book, decode_bytes, read_text_file
from phiforge.data.loader import PackedLoader, eval_batches
from phiforge.data.prepare import BUNDLED_DIR, text_chunks, tokenize_document
from phiforge.data.shards import open_token_dataset
from phiforge.errors import DataError
from phiforge.tokenizer import EOT_ID, builtin_tokenizer

from conftest import assert_one_line_error, run_cli


def test_strips_real_gutenberg_header_licence_and_footer():
    raw = read_text_file(BUNDLED_DIR / "pg2701_moby_dick_raw.txt.gz")
    assert raw.startswith("\ufeff") and "\r\n" in raw
    r = clean_book(raw)
    assert r.had_markers and r.header_chars > 0 and r.footer_chars > 10_000
    assert r.text.startswith("MOBY DICK; OR THE WHALE")
    assert r.text.rstrip().endswith("only found another\norphan.")
    assert "\r" not in r.text and "\ufeff" not in r.text
    for licence_words in ("START OF THIS PROJECT GUTENBERG", "Project Gutenberg-tm", "Produced by", "END OF THIS"):
        assert licence_words not in r.text


def test_clean_austen_book_is_kept_whole():
    raw = read_text_file(BUNDLED_DIR / "pg105_persuasion.txt.gz")
    r = clean_book(raw)
    assert not r.had_markers
    assert r.text.startswith("Persuasion") and r.text.rstrip().endswith("Finis")
    assert len(r.text) > 0.99 * len(raw.strip())


def test_bad_text_inputs(tmp_path):
    with pytest.raises(DataError, match="empty file"):
        decode_bytes(b"  \n", "x.txt")
    with pytest.raises(DataError, match="binary"):
        decode_bytes(b"\x00\x01\x02abc", "x.bin")
    assert decode_bytes("caf\u00e9".encode("cp1252"), "old.txt") == "caf\u00e9"  # encoding fallback
    bad = tmp_path / "broken.txt.gz"
    bad.write_bytes(b"\x1f\x8b\x08\x00garbage")
    with pytest.raises(DataError, match="broken.txt.gz"):
        read_text_file(bad)


def test_chunked_tokenization_equals_whole_text():
    tok = builtin_tokenizer()
    text = clean_book(read_text_file(BUNDLED_DIR / "pg121_northanger_abbey.txt.gz")).text[:120_000]
    assert len(text_chunks(text, target_chars=5_000)) > 10
    whole = tok.encode(text).ids + [EOT_ID]
    assert tokenize_document(tok, text, EOT_ID).tolist() == whole


def test_prepared_index_and_validation_holdout(gutenberg_dir):
    ds = open_token_dataset(gutenberg_dir)
    ds.verify()
    docs = ds.index["documents"]
    assert len(docs) == 7
    val = [d for d in docs if d["split"] == "val"]
    assert [d["title"] for d in val] == ["Persuasion"]
    for split in ("train", "val"):
        info = ds.index["splits"][split]
        assert info["tokens"] == sum(d["tokens"] for d in docs if d["split"] == split)
        assert info["documents"] == sum(1 for d in docs if d["split"] == split)
    # documents end with <|endoftext|>: the val split holds exactly one
    val_tokens = np.concatenate(ds.arrays("val"))
    assert (val_tokens == EOT_ID).sum() == 1 and val_tokens[-1] == EOT_ID
    assert ds.dtype == np.uint16 and ds.vocab_size == 50257


def test_loader_exact_resume(gutenberg_dir):
    a = PackedLoader(gutenberg_dir, "train", seq_len=64, batch_size=4, seed=7)
    for _ in range(5):
        a.next_batch()
    state = json.loads(json.dumps(a.state_dict()))  # must survive JSON
    expected = [a.next_batch() for _ in range(6)]
    b = PackedLoader(gutenberg_dir, "train", seq_len=64, batch_size=4, seed=7)
    b.load_state_dict(state)
    for (x1, y1), (x2, y2) in zip(expected, (b.next_batch() for _ in range(6))):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    x, y = expected[0]
    assert torch.equal(x[:, 1:], y[:, :-1])  # targets are inputs shifted by one


def test_loader_epochs_differ_and_seeds_matter(gutenberg_dir):
    a = PackedLoader(gutenberg_dir, "val", seq_len=512, batch_size=8, seed=0)
    per_epoch = a.per_rank // 8
    first = [a.next_batch()[0] for _ in range(per_epoch)]
    second = a.next_batch()[0]
    assert a.epoch == 1 and not torch.equal(first[0], second)
    other = PackedLoader(gutenberg_dir, "val", seq_len=512, batch_size=8, seed=1).next_batch()[0]
    assert not torch.equal(first[0], other)


def test_ranks_never_share_windows(gutenberg_dir):
    seen = []
    for rank in range(2):
        ld = PackedLoader(gutenberg_dir, "val", seq_len=256, batch_size=4, seed=3, rank=rank, world_size=2)
        seen.append(set(ld._epoch_order().tolist()))
    assert seen[0] and seen[1] and not (seen[0] & seen[1])


def test_eval_batches_are_deterministic(gutenberg_dir):
    a = eval_batches(gutenberg_dir, "val", 128, 4, 3)
    b = eval_batches(gutenberg_dir, "val", 128, 4, 3)
    assert len(a) == 3 and all(torch.equal(x1, x2) for (x1, _), (x2, _) in zip(a, b))


def test_dataset_errors(gutenberg_dir, tmp_path):
    with pytest.raises(DataError, match="not found"):
        open_token_dataset(tmp_path / "nope")
    with pytest.raises(DataError, match="no index.json"):
        open_token_dataset(tmp_path)
    bad = tmp_path / "bad"
    shutil.copytree(gutenberg_dir, bad)
    (bad / "index.json").write_text("{not json")
    with pytest.raises(DataError, match="corrupt dataset index"):
        open_token_dataset(bad)
    shutil.rmtree(bad)
    shutil.copytree(gutenberg_dir, bad)
    shard = bad / "val-00000.bin"
    data = shard.read_bytes()
    shard.write_bytes(data[:-10])
    with pytest.raises(DataError, match="val-00000.bin"):
        open_token_dataset(bad)
    shard.write_bytes(data[:-2] + b"\x01\x02")  # same size, different content
    ds = open_token_dataset(bad)
    with pytest.raises(DataError, match="checksum mismatch in shard .*val-00000.bin"):
        ds.verify()


def test_cli_data_dir_without_index(capsys, tmp_path):
    code, _, err = run_cli(capsys, "data", "inspect", tmp_path)
    assert_one_line_error(code, err, "no index.json", str(tmp_path))


def test_cli_inspect(capsys, gutenberg_dir):
    code, out, _ = run_cli(capsys, "data", "inspect", gutenberg_dir, "--verify")
    assert code == 0 and "checksums: ok" in out and "EMMA" in out and "1,193,563" in out


def test_prepare_refuses_foreign_dir_and_replaces_dataset(capsys, tmp_path):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    code, _, err = run_cli(capsys, "prepare", "gutenberg", "--source", "bundled", "--out", foreign)
    assert_one_line_error(code, err, "not a phiforge dataset")
    assert (foreign / "notes.txt").read_text() == "keep me"
    code, _, err = run_cli(capsys, "prepare", "gutenberg", "--source", "mirror", "--out", tmp_path / "x")
    assert_one_line_error(code, err, "unknown --source 'mirror'")
