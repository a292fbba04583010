"""Data layer: Gutenberg cleaning, tokenization, the shard format, the loaders, `prepare` and `data inspect`."""

import json
import shutil

import numpy as np
import pytest
import torch

from phiforge.data.gutenberg import clean_book, decode_bytes, normalise, read_text_file, strip_gutenberg
from phiforge.data.loader import PackedLoader, eval_batches
from phiforge.data.prepare import text_chunks, tokenize_document
from phiforge.data.shards import DatasetWriter, ShardWriter, open_token_dataset, token_dtype
from phiforge.data.sources import BUNDLED_DIR, BundledGutenberg, choose_val_ids
from phiforge.errors import ConfigError, DataError
from phiforge.tokenizer import EOT, EOT_ID, builtin_tokenizer

from conftest import assert_one_line_error, run_cli

AUSTEN = ["pg105_persuasion", "pg121_northanger_abbey", "pg1342_pride_and_prejudice", "pg141_mansfield_park",
          "pg158_emma", "pg161_sense_and_sensibility"]


# ---------------------------------------------------------------------------------------------- cleaning


def test_strips_real_gutenberg_header_licence_and_footer():
    raw = read_text_file(BUNDLED_DIR / "pg2701_moby_dick_raw.txt.gz")
    assert raw.startswith("\ufeff") and "\r\n" in raw and "*** START OF THIS PROJECT GUTENBERG" in raw
    r = clean_book(raw)
    assert r.start_marker.startswith("*** START OF THIS PROJECT GUTENBERG EBOOK MOBY DICK")
    assert r.end_marker.startswith("End of Project Gutenberg's Moby Dick")
    assert 500 < r.header_chars < 1000 and r.footer_chars > 15_000
    # the book starts at its title page (the "Produced by" credit line is dropped) ...
    assert r.text.startswith("MOBY DICK; OR THE WHALE\n\nBy Herman Melville\n")
    assert "CHAPTER 1. Loomings." in r.text[:60_000] and "ETYMOLOGY." in r.text[:5_000]
    # ... and ends with the Epilogue's last words
    assert r.text.endswith("only found another\norphan.\n")
    assert "\r" not in r.text and "\ufeff" not in r.text and "\n\n\n\n" not in r.text
    for boilerplate in ("START OF THIS PROJECT GUTENBERG", "END OF THIS PROJECT GUTENBERG", "Project Gutenberg-tm",
                        "gutenberg.org", "Produced by", "FULL LICENSE", "Foundation", "donations", "Title: Moby"):
        assert boilerplate not in r.text, boilerplate
    # the one remaining mention is the book's own transcriber's note
    assert r.text.count("Gutenberg") == 1 and r.text.index("Gutenberg") < 1_000
    assert len(r.text) + r.header_chars + r.footer_chars == len(normalise(raw))


@pytest.mark.parametrize("name", AUSTEN)
def test_austen_books_only_normalised(name):
    raw = read_text_file(BUNDLED_DIR / f"{name}.txt.gz")
    r = clean_book(raw)
    assert not r.had_markers and r.header_chars == 0 and r.footer_chars == 0
    assert r.text == normalise(raw)
    # normalisation is light: same text apart from trailing blanks and runs of 3+ blank lines
    assert r.text.split() == raw.split()


def test_normalise():
    assert normalise("\ufeffa\r\nb\rc  \n\n\n\n\n\nd\t\n") == "a\nb\nc\n\n\nd\n"
    assert normalise("Cafe\u0301") == "Caf\u00e9\n"  # NFC
    assert normalise("\n\n  \n") == ""


def test_marker_variants():
    body = "Chapter 1\n\nIt was a dark night.\n\nThe end.\n"

    def book(head, tail):
        return normalise(head + "\n\n" + body + "\n\n" + tail)

    modern = book("The Project Gutenberg eBook of X\n\nTitle: X\n\n*** START OF THE PROJECT GUTENBERG EBOOK X ***\n\n"
                  "Produced by Someone and the Online Distributed\nProofreading Team at http://www.pgdp.net",
                  "*** END OF THE PROJECT GUTENBERG EBOOK X ***\n\nUpdated editions will replace the previous one")
    old = book("**The Project Gutenberg Etext of X**\n*** START OF THIS PROJECT GUTENBERG EBOOK X ***\n"
               "**Welcome To The World of Free Plain Vanilla Electronic Texts**\nsmall print here\n"
               "*END*THE SMALL PRINT! FOR PUBLIC DOMAIN ETEXTS*Ver.04.29.93*END*\n\nThis etext was prepared by Y.",
               "End of the Project Gutenberg EBook of X\n\n*** END OF THIS PROJECT GUTENBERG EBOOK X ***\nlicence")
    small_print_at_bottom = book("The Project Gutenberg Etext of X",
                                 "End of Project Gutenberg Etext of X\n\n**START**THE SMALL PRINT!**\nlegal\n"
                                 "*END*THE SMALL PRINT! FOR PUBLIC DOMAIN ETEXTS*END*")
    lowercase = book("*** start of this project gutenberg ebook x ***", "end of this project gutenberg ebook x")
    for text in (modern, old, lowercase):
        assert strip_gutenberg(text).text == body, text
    assert strip_gutenberg(small_print_at_bottom).text.endswith(body)
    assert strip_gutenberg(normalise(body)).text == body  # no markers: kept whole


def test_bad_text_inputs(tmp_path):
    with pytest.raises(DataError, match="empty file"):
        decode_bytes(b"  \n", "x.txt")
    with pytest.raises(DataError, match="binary"):
        decode_bytes(b"\x00\x01\x02abc", "x.bin")
    assert decode_bytes("caf\u00e9".encode("cp1252"), "old.txt") == "caf\u00e9"
    bad = tmp_path / "broken.txt.gz"
    bad.write_bytes(b"\x1f\x8b\x08\x00garbage")
    with pytest.raises(DataError, match="broken.txt.gz"):
        read_text_file(bad)
    with pytest.raises(DataError, match="file not found"):
        read_text_file(tmp_path / "nope.txt")


# ---------------------------------------------------------------------------------------------- tokenizing


def test_chunked_tokenization_equals_whole_text():
    tok = builtin_tokenizer()
    text = clean_book(read_text_file(BUNDLED_DIR / "pg2701_moby_dick_raw.txt.gz")).text[:200_000]
    chunks = text_chunks(text, 4_000)
    assert len(chunks) > 40 and "".join(chunks) == text and max(map(len, chunks)) <= 4_000
    assert tokenize_document(tok, text, EOT_ID, chunk_chars=4_000).tolist() == tok.encode(text).ids + [EOT_ID]
    # awkward whitespace, digits, contractions, unicode, one long "word", cut every few characters
    tricky = ("It's  'twas\n\n\n  indented\tline 12345 678\n" * 30 + "x" * 500 + " caf\u00e9 \u2014 na\u00efve\n\n")
    for size in (7, 16, 64):
        got = tokenize_document(tok, tricky, EOT_ID, chunk_chars=size).tolist()
        assert got == tok.encode(tricky).ids + [EOT_ID], size


def test_literal_eot_in_text_is_not_a_document_boundary():
    tok = builtin_tokenizer()
    ids = tokenize_document(tok, f"before {EOT} after", EOT_ID).tolist()
    assert ids.count(EOT_ID) == 1 and ids[-1] == EOT_ID
    assert tok.decode(ids[:-1]) == f"before {EOT} after"


# ---------------------------------------------------------------------------------------------- shards


def _synthetic(path, train_docs=((1000,), (2500,), (700,)), val_docs=((900,),), vocab=50257, shard_tokens=1000):
    """A dataset of documents with tokens 0,1,2,... (mod vocab-1), each ending in EOT."""
    eot = vocab - 1
    w = DatasetWriter(path, {"name": "synthetic", "vocab_size": vocab, "eot_id": eot}, shard_tokens=shard_tokens)
    start = 0
    for split, docs in (("train", train_docs), ("val", val_docs)):
        for i, (n,) in enumerate(docs):
            toks = np.append((np.arange(start, start + n - 1) % eot), eot)
            start += n
            w.add(split, toks, id=f"{split}{i}", title=f"doc {i}", source="synth")
    return w.finish()


def test_shard_writer_rolls_over_and_reader_streams(tmp_path):
    index = _synthetic(tmp_path / "ds")
    files = sorted(p.name for p in (tmp_path / "ds").iterdir())
    assert files == ["documents.jsonl", "index.json", "train-00000.bin", "train-00001.bin", "train-00002.bin",
                     "train-00003.bin", "train-00004.bin", "val-00000.bin"]  # 4200 train tokens at 1000 per shard
    train = index["splits"]["train"]
    assert [s["tokens"] for s in train["shards"]] == [1000, 1000, 1000, 1000, 200]
    assert [s["documents"] for s in train["shards"]] == [1, 1, 0, 1, 0]  # docs counted where they start
    assert train["tokens"] == 4200 and train["documents"] == 3
    assert index["version"] == 2 and index["documents"]["count"] == 4 and "sources" in train
    assert all(s["source"] == "synth" for s in train["shards"])
    ds = open_token_dataset(tmp_path / "ds")
    assert [d["offset"] for d in ds.iter_documents()] == [0, 1000, 3500, 0]  # from documents.jsonl
    ds.verify()
    assert ds.dtype == np.dtype("<u2") and (tmp_path / "ds" / "train-00000.bin").stat().st_size == 2000
    stream = ds.stream("train")
    assert stream.total == 4200
    assert stream.read(990, 20).tolist() == list(range(990, 999)) + [50256] + list(range(1000, 1010))
    on_disk = np.fromfile(tmp_path / "ds" / "train-00001.bin", dtype="<u2")
    assert on_disk[0] == 1000 and on_disk.dtype.byteorder in "<="  # headerless little-endian


def test_large_vocab_uses_uint32(tmp_path):
    assert token_dtype(50257) == np.uint16 and token_dtype(65535) == np.uint16 and token_dtype(65536) == np.uint32
    index = _synthetic(tmp_path / "big", vocab=100_000, train_docs=((70_000,),), val_docs=((10,),),
                       shard_tokens=10**6)
    assert index["dtype"] == "uint32"
    ds = open_token_dataset(tmp_path / "big")
    assert ds.stream("train").read(69_990, 10).tolist()[-2:] == [69_998, 99_999]
    with pytest.raises(DataError, match="out of range"):
        ShardWriter(tmp_path, "x", np.uint16).add(np.array([70_000]))


def test_dataset_errors_name_the_path(tmp_path):
    with pytest.raises(DataError, match=f"data directory not found: {tmp_path / 'nope'}"):
        open_token_dataset(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"no index.json in .*empty; run `phiforge prepare"):
        open_token_dataset(tmp_path / "empty")
    good = tmp_path / "good"
    _synthetic(good)

    def broken(name):
        d = tmp_path / name
        shutil.copytree(good, d)
        return d

    d = broken("corrupt")
    (d / "index.json").write_text("{not json")
    with pytest.raises(DataError, match=r"corrupt dataset index .*corrupt/index.json"):
        open_token_dataset(d)
    d = broken("wrongshape")
    index = json.loads((d / "index.json").read_text())
    index["splits"]["train"]["shards"][0].pop("tokens")
    (d / "index.json").write_text(json.dumps(index))
    with pytest.raises(DataError, match=r"corrupt dataset index .*wrongshape/index.json"):
        open_token_dataset(d)
    d = broken("newer")
    index["version"] = 99
    (d / "index.json").write_text(json.dumps(index))
    with pytest.raises(DataError, match="version 99"):
        open_token_dataset(d)
    d = broken("missing")
    (d / "train-00002.bin").unlink()
    with pytest.raises(DataError, match=r"shard .*missing/train-00002.bin .* is missing"):
        open_token_dataset(d)
    d = broken("truncated")
    shard = d / "val-00000.bin"
    data = shard.read_bytes()
    shard.write_bytes(data[:-10])
    with pytest.raises(DataError, match=r"shard .*truncated/val-00000.bin has 1790 bytes, the index says 900 tokens"):
        open_token_dataset(d)
    shard.write_bytes(data[:-2] + b"\x01\x02")  # same size, other content
    ds = open_token_dataset(d)
    with pytest.raises(DataError, match=r"checksum mismatch in shard .*truncated/val-00000.bin"):
        ds.verify()
    with pytest.raises(DataError, match="no 'test' split"):
        ds.stream("test")


# ---------------------------------------------------------------------------------------------- loaders


def test_loader_batches_are_shifted_windows(tmp_path):
    _synthetic(tmp_path / "ds")
    ld = PackedLoader(tmp_path / "ds", "train", seq_len=64, batch_size=4, seed=1)
    assert ld.tokens_per_batch == 256 and ld.n_windows == (4200 - 1) // 64
    x, y = ld.next_batch()
    assert x.shape == y.shape == (4, 64) and x.dtype == y.dtype == torch.long
    assert torch.equal(x[:, 1:], y[:, :-1])
    stream = ld.stream
    for row, w in zip(x, ld.epoch_order(0)[:4]):
        assert row.tolist() == stream.read(int(w) * 64, 64).tolist()
    # one epoch visits every window once
    order = ld.epoch_order(0)
    assert sorted(order.tolist()) == list(range(ld.n_windows))


def test_loader_exact_resume_through_epochs(tmp_path):
    _synthetic(tmp_path / "ds")
    a = PackedLoader(tmp_path / "ds", "train", seq_len=32, batch_size=5, seed=7)
    per_epoch = a.batches_per_epoch
    for _ in range(per_epoch - 2):
        a.next_batch()
    state = json.loads(json.dumps(a.state_dict()))  # survives JSON
    assert all(isinstance(v, int) for v in state.values())
    expected = [a.next_batch() for _ in range(per_epoch + 3)]  # crosses into epochs 1 and 2
    assert a.epoch == 2
    b = PackedLoader(tmp_path / "ds", "train", seq_len=32, batch_size=5, seed=7)
    b.load_state_dict(state)
    for (x1, y1), (x2, y2) in zip(expected, (b.next_batch() for _ in range(per_epoch + 3))):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert b.state_dict() == a.state_dict()
    # epochs are reshuffled, and the seed matters
    assert not np.array_equal(a.epoch_order(0), a.epoch_order(1))
    other = PackedLoader(tmp_path / "ds", "train", seq_len=32, batch_size=5, seed=8)
    assert not np.array_equal(other.epoch_order(0), a.epoch_order(0))
    with pytest.raises(DataError, match="seq_len=32"):
        PackedLoader(tmp_path / "ds", "train", seq_len=16, batch_size=5, seed=7).load_state_dict(state)
    with pytest.raises(DataError, match="seed=7"):
        other.load_state_dict(state)


def test_ranks_are_disjoint_and_cover_the_epoch(tmp_path):
    _synthetic(tmp_path / "ds")
    loaders = [PackedLoader(tmp_path / "ds", "train", seq_len=16, batch_size=4, seed=3, rank=r, world_size=2)
               for r in range(2)]
    seen = [set(), set()]
    for r, ld in enumerate(loaders):
        for _ in range(ld.batches_per_epoch):
            x, _ = ld.next_batch()
            seen[r].update(int(row[0]) * 100_000 + int(row[1]) for row in x)  # window identity by its first tokens
        assert set(ld.epoch_order(0).tolist()).isdisjoint(loaders[1 - r].epoch_order(0).tolist())
    assert seen[0] and seen[1] and seen[0].isdisjoint(seen[1])
    both = np.concatenate([ld.epoch_order(0) for ld in loaders])
    assert len(both) == 2 * (loaders[0].n_windows // 2) and len(set(both.tolist())) == len(both)
    with pytest.raises(ConfigError, match="rank"):
        PackedLoader(tmp_path / "ds", "train", seq_len=16, batch_size=4, rank=2, world_size=2)


def test_resume_on_another_world_size_repeats_nothing(tmp_path):
    _synthetic(tmp_path / "ds")
    one = PackedLoader(tmp_path / "ds", "train", seq_len=16, batch_size=4, seed=5)
    for _ in range(3):
        one.next_batch()  # 12 windows of epoch 0 consumed
    used = set(one.epoch_order(0)[:12].tolist())
    rest = set()
    for r in range(2):
        ld = PackedLoader(tmp_path / "ds", "train", seq_len=16, batch_size=4, seed=5, rank=r, world_size=2)
        ld.load_state_dict(one.state_dict())
        assert ld.position == 6
        rest.update(ld.epoch_order(0)[ld.position :].tolist())
    assert used.isdisjoint(rest)


def test_loader_errors(tmp_path):
    _synthetic(tmp_path / "ds", val_docs=((40,),))
    with pytest.raises(DataError, match="fewer than one window"):
        PackedLoader(tmp_path / "ds", "val", seq_len=64, batch_size=1)
    with pytest.raises(DataError, match="too few for batch size 8"):
        PackedLoader(tmp_path / "ds", "val", seq_len=8, batch_size=8)
    with pytest.raises(ConfigError, match="seq_len"):
        PackedLoader(tmp_path / "ds", "train", seq_len=0, batch_size=1)
    with pytest.raises(DataError, match="no index.json"):
        PackedLoader(tmp_path, "train", seq_len=8, batch_size=1)


def test_eval_batches_are_deterministic_and_consecutive(tmp_path):
    _synthetic(tmp_path / "ds")
    a = eval_batches(tmp_path / "ds", "val", 32, 4, 3)
    b = eval_batches(tmp_path / "ds", "val", 32, 4, 3)
    assert len(a) == 3 and all(x.shape == (4, 32) for x, _ in a)
    assert all(torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(a, b))
    flat = torch.cat([x for x, _ in a]).flatten().tolist()
    stream = open_token_dataset(tmp_path / "ds").stream("val")
    assert flat == stream.read(0, 12 * 32).tolist()  # consecutive windows from the start of the split
    # a split too small for max_batches gives the full batches it has (900 tokens -> 28 windows -> 7 batches)
    assert len(eval_batches(tmp_path / "ds", "val", 32, 4, 100)) == 7
    assert [x.shape[0] for x, _ in eval_batches(tmp_path / "ds", "val", 300, 8, 5)] == [2]


# ---------------------------------------------------------------------------------------------- prepare / CLI


def test_prepared_bundled_dataset(gutenberg_dir):
    ds = open_token_dataset(gutenberg_dir)
    ds.verify()
    index = ds.index
    assert index["format"] == "phiforge-tokens" and index["version"] == 2 and index["dtype"] == "uint16"
    assert index["tokenizer"]["vocab_size"] == 50257 and index["tokenizer"]["eot_id"] == EOT_ID
    assert index["prepared"]["val"] == {"method": "default", "ids": ["105"]}
    docs = ds.documents  # documents.jsonl
    assert sorted(d["id"] for d in docs) == sorted(BundledGutenberg().ids())
    val = [d for d in docs if d["split"] == "val"]
    train = [d for d in docs if d["split"] == "train"]
    assert [d["title"] for d in val] == ["Persuasion"] and "105" not in {d["id"] for d in train}  # no leak
    for split, members in (("train", train), ("val", val)):
        info = index["splits"][split]
        assert info["tokens"] == sum(d["tokens"] for d in members) == ds.stream(split).total
        assert info["documents"] == len(members)
        stream = ds.stream(split)
        for d in members:  # every document sits at its offset and ends with EOT
            assert stream.read(d["offset"] + d["tokens"] - 1, 1)[0] == EOT_ID
        tokens = np.concatenate(ds.arrays(split))
        assert int((tokens == EOT_ID).sum()) == len(members)
    assert 1_100_000 < index["splits"]["train"]["tokens"] < 1_300_000
    assert 100_000 < index["splits"]["val"]["tokens"] < 130_000
    moby = next(d for d in docs if d["id"] == "2701")
    assert moby["removed_header_chars"] > 0 and moby["removed_footer_chars"] > 15_000
    # the val stream is Persuasion, decoded
    tok = builtin_tokenizer()
    assert tok.decode(ds.stream("val").read(0, 12).tolist()).startswith("Persuasion")


# sha256 of what the code before the PrepareConfig refactor wrote for the bundled books (default options): the
# shards, documents.jsonl without the later "bytes" field, and index.json (canonical JSON, no phiforge_version,
# its documents checksum that of the file without "bytes")
BEFORE = {"train-00000.bin": "f6fe4683c6af5ebbca304289623d7d0d042497e33a8b7392a9053ba876b01d74",
          "val-00000.bin": "55a5b6bd8769dd5b5403af3b9ad9c13778820c480433815d9254f94824ec26ef",
          "documents.jsonl": "a779cb23b3ef2e59c2f632b3d5b29a118fee4cb1b147ca4a0eb9107c9335a3dc",
          "index.json": "b5c0ecdb3ce0395c0231a65d58d9ee08fa1cd4b3d77043f0cf2d9f7fa4153808"}


def test_bundled_output_is_unchanged_apart_from_document_bytes(gutenberg_dir):
    import hashlib

    def sha(data: bytes) -> str:
        return hashlib.sha256(data).hexdigest()

    for name in ("train-00000.bin", "val-00000.bin"):
        assert sha((gutenberg_dir / name).read_bytes()) == BEFORE[name], name
    records = [json.loads(line) for line in (gutenberg_dir / "documents.jsonl").read_text().splitlines()]
    assert all(isinstance(r.pop("bytes"), int) for r in records)
    without = b"".join(json.dumps(r, ensure_ascii=False, separators=(",", ":")).encode() + b"\n" for r in records)
    assert sha(without) == BEFORE["documents.jsonl"]
    index = json.loads((gutenberg_dir / "index.json").read_text())
    index["prepared"].pop("phiforge_version")
    index["documents"]["sha256"] = sha(without)
    assert sha(json.dumps(index, sort_keys=True).encode()) == BEFORE["index.json"]


def test_document_bytes_and_tokens_one_document_at_a_time(gutenberg_dir):
    from data_fixtures import cleaned_documents

    ds = open_token_dataset(gutenberg_dir)
    texts = {i: text for i, _, text, _ in cleaned_documents(BundledGutenberg())}
    records = {d["id"]: d for d in ds.iter_documents()}
    for i, text in texts.items():  # the UTF-8 size of exactly the text that was tokenized
        assert records[i]["bytes"] == len(text.encode("utf-8")) and records[i]["chars"] == len(text)
    assert records["141"]["bytes"] > records["141"]["chars"]  # Mansfield Park has a non-ASCII character
    docs = ds.iter_document_tokens("train")
    assert iter(docs) is docs  # a generator: one document read at a time
    seen = []
    tok = builtin_tokenizer()
    for record, tokens in docs:
        assert record["split"] == "train" and tokens.dtype == np.int64 and len(tokens) == record["tokens"]
        assert tokens[-1] == EOT_ID and EOT_ID not in tokens[:-1]
        assert tok.decode(tokens[:50].tolist()) == texts[record["id"]][:len(tok.decode(tokens[:50].tolist()))]
        seen.append(record["id"])
    assert seen == [d["id"] for d in ds.iter_documents() if d["split"] == "train"] and len(seen) == 6
    assert [r["id"] for r, _ in ds.iter_document_tokens("val")] == ["105"]
    with pytest.raises(DataError, match="no 'test' split"):
        next(ds.iter_document_tokens("test"))


def test_val_selection():
    src = BundledGutenberg()
    assert choose_val_ids(src) == (["105"], "default")
    assert choose_val_ids(src, val_books=2) == (["105", "121"], "val-books")
    assert choose_val_ids(src, val_ids=["2701", " 158"]) == (["2701", "158"], "val-ids")
    with pytest.raises(DataError, match="not in source 'bundled'"):
        choose_val_ids(src, val_ids=["99999"])
    with pytest.raises(DataError, match="leaves no training data"):
        choose_val_ids(src, val_books=7)


def test_cli_inspect(capsys, gutenberg_dir):
    code, out, _ = run_cli(capsys, "data", "inspect", gutenberg_dir, "--verify")
    assert code == 0, out
    assert "checksums: ok" in out and "Persuasion" in out and "gutenberg" in out and "100.0%" in out
    assert "sample (train, first 60 tokens): 'EMMA" in out


def test_cli_data_dir_without_index(capsys, tmp_path):
    code, _, err = run_cli(capsys, "data", "inspect", tmp_path)
    assert_one_line_error(code, err, "no index.json", str(tmp_path))
    code, _, err = run_cli(capsys, "data", "inspect", tmp_path / "missing")
    assert_one_line_error(code, err, "data directory not found", str(tmp_path / "missing"))


def test_prepare_refuses_foreign_dirs_and_bad_options(capsys, tmp_path):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    code, _, err = run_cli(capsys, "prepare", "gutenberg", "--source", "bundled", "--out", foreign)
    assert_one_line_error(code, err, "not a phiforge dataset", str(foreign))
    assert (foreign / "notes.txt").read_text() == "keep me"
    code, _, err = run_cli(capsys, "prepare", "gutenberg", "--source", "nosuch", "--out", tmp_path / "x")
    assert_one_line_error(code, err, "unknown --source 'nosuch'", "bundled")
    code, _, err = run_cli(capsys, "prepare", "gutenberg", "--val-ids", "1,2", "--out", tmp_path / "x")
    assert_one_line_error(code, err, "--val-ids 1,2 not in source")
    assert not (tmp_path / "x").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]  # no temporary directories left behind


def test_prepare_replaces_an_existing_dataset(capsys, tmp_path, monkeypatch):
    """Re-running over a dataset swaps in the new one; extra files in it make prepare refuse."""
    from phiforge.data import sources

    # two small books keep this fast: rewrite the manifest to list Persuasion and Northanger Abbey only
    root = tmp_path / "books"
    root.mkdir()
    lines = (BUNDLED_DIR / "MANIFEST.tsv").read_text().splitlines()
    keep = [lines[0]] + [l for l in lines[1:] if l.split("\t")[1] in ("105", "121")]
    (root / "MANIFEST.tsv").write_text("\n".join(keep) + "\n")
    for l in keep[1:]:
        shutil.copy(BUNDLED_DIR / l.split("\t")[0], root)
    monkeypatch.setattr(sources.BundledGutenberg.__init__, "__defaults__", (root,))
    out = tmp_path / "ds"
    code, stdout, err = run_cli(capsys, "prepare", "gutenberg", "--out", out, "--shard-tokens", "50000")
    assert code == 0, err
    assert "train: 1 book(s)" in stdout and "val: 1 book(s)" in stdout
    first = open_token_dataset(out).index
    assert len(first["splits"]["train"]["shards"]) == 3  # 105k tokens at 50k per shard
    code, _, err = run_cli(capsys, "prepare", "gutenberg", "--out", out, "--val-ids", "121")
    assert code == 0, err
    second = open_token_dataset(out)
    second.verify()
    assert second.index["prepared"]["val"]["ids"] == ["121"] and len(second.index["splits"]["train"]["shards"]) == 1
    assert sorted(p.name for p in out.iterdir()) == ["documents.jsonl", "index.json", "prepare-report.json",
                                                     "tokenizer.json", "train-00000.bin", "val-00000.bin"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["books", "ds"]
    (out / "my-notes.txt").write_text("x")
    code, _, err = run_cli(capsys, "prepare", "gutenberg", "--out", out)
    assert_one_line_error(code, err, "also holds other files", "my-notes.txt")


# ---------------------------------------------------------------------------------------------- issue 21


def checksums(root):
    import hashlib

    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_verify_checks_the_tokenizer_against_the_index(capsys, gutenberg_dir, tmp_path):
    """Issue 21, item 6: `data inspect --verify` compares tokenizer.json with the sha256 the index recorded, and a
    dataset without tokenizer.json is never decoded with GPT-2's in its place."""
    from phiforge.tokenizer import train_byte_level_bpe

    ds = tmp_path / "ds"
    shutil.copytree(gutenberg_dir, ds)
    other = train_byte_level_bpe(["a small corpus of words, words and more words"] * 20, vocab_size=300)
    (ds / "tokenizer.json").write_text(other.to_str())
    before = checksums(ds)
    code, _, err = run_cli(capsys, "data", "inspect", ds, "--verify")
    assert_one_line_error(code, err, f"{ds / 'tokenizer.json'} is not the tokenizer that made the tokens of {ds}",
                          "index.json records")
    (ds / "tokenizer.json").unlink()
    code, _, err = run_cli(capsys, "data", "inspect", ds, "--verify")
    assert_one_line_error(code, err, f"dataset {ds} has no tokenizer.json")
    code, out, err = run_cli(capsys, "data", "inspect", ds)  # without --verify: no sample decoded with GPT-2's
    assert code == 0, err
    assert "sample: skipped" in out and "EMMA" not in out
    assert {k: v for k, v in checksums(ds).items()} == {k: v for k, v in before.items() if k != "tokenizer.json"}


def test_verify_finds_token_ids_beyond_the_vocabulary(capsys, tmp_path):
    """Issue 21, item 8: a shard with ids >= the index's vocabulary (checksums intact) fails --verify naming it."""
    ds = tmp_path / "ds"
    w = DatasetWriter(ds, {"name": "synthetic", "vocab_size": 1000, "eot_id": 999}, shard_tokens=100)
    for i in range(3):
        w.add("train", np.append(np.arange(150) + 900 * (i == 2), 999), id=str(i))  # doc 2: ids 900..1049
    w.add("val", np.array([1, 2, 999]), id="v")
    w.finish()
    shards = [s["file"] for s in json.loads((ds / "index.json").read_text())["splits"]["train"]["shards"]]
    hits = [(f, np.flatnonzero(np.fromfile(ds / f, dtype="<u2") >= 1000)) for f in shards]
    name, at = next((f, h) for f, h in hits if len(h))  # the first out-of-range id, found independently
    before = checksums(ds)
    code, _, err = run_cli(capsys, "data", "inspect", ds, "--verify")
    assert_one_line_error(code, err, f"shard {ds / name} holds token id 1000 (token {at[0]} of the shard)",
                          "at or above the vocabulary of 1000")
    assert checksums(ds) == before
    assert open_token_dataset(ds).split_tokens("train") == 3 * 151  # the index itself is consistent
