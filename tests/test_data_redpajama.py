"""RedPajama layouts -> per-source shards, the mixture loader (exact resume, ranks, proportions), format v2."""

import json

import numpy as np
import pytest
import torch

from data_fixtures import make_redpajama
from phiforge.data.loader import FeistelOrder, PackedLoader, eval_batches
from phiforge.data.prepare import prepare
from phiforge.data.redpajama import DEFAULT_WEIGHTS, RedPajamaSource, classify, parse_weights
from phiforge.data.shards import open_token_dataset
from phiforge.errors import ConfigError, DataError
from phiforge.tokenizer import EOT_ID

from conftest import assert_one_line_error, run_cli

SOURCES = ["arxiv", "book", "c4", "common_crawl", "github", "stackexchange", "wikipedia"]


def _same(a, b):
    return all(torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(a, b))


# ---------------------------------------------------------------------------------------------- prepare


def test_redpajama_1t_fixture_to_per_source_shards(redpajama_dir, redpajama_fixture):
    ds = open_token_dataset(redpajama_dir)
    ds.verify()
    idx = ds.index
    assert idx["version"] == 2 and idx["prepared"]["corpus"] == "redpajama"
    assert idx["mixture"]["weights"] == DEFAULT_WEIGHTS  # the fixture has every default source
    train = idx["splits"]["train"]
    assert sorted(train["sources"]) == SOURCES
    # every shard holds one source; a split's shards are grouped source by source in the fixed order
    order = [s["source"] for s in train["shards"]]
    assert order == sorted(order, key=SOURCES.index)
    for src in SOURCES:
        stream = ds.source_stream("train", src)
        assert stream.total == train["sources"][src]["tokens"]
    # documents.jsonl: ids are file:line, the github documents are real stdlib sources, offsets and EOTs line up
    docs = list(ds.iter_documents())
    assert len(docs) == idx["documents"]["count"] == sum(i["documents"] for i in idx["splits"].values())
    gh = [d for d in docs if d["source"] == "github"]
    assert gh and all(d["id"].startswith("github/filtered_0.jsonl:") for d in gh)
    streams = {s: ds.stream(s) for s in ds.splits()}
    for d in docs[::7]:
        assert streams[d["split"]].read(d["offset"] + d["tokens"] - 1, 1)[0] == EOT_ID
    # validation is held out by document: no id in both splits, ~10% of documents
    val = {d["id"] for d in docs if d["split"] == "val"}
    assert val and val.isdisjoint(d["id"] for d in docs if d["split"] == "train")
    assert 0.03 < len(val) / len(docs) < 0.2
    rep = json.loads((redpajama_dir / "prepare-report.json").read_text())
    assert rep["kept"]["documents"] == len(docs) and rep["read"]["units"] == 7 and not rep["removed"]


def test_sample_and_v2_layouts_and_quality_filter(tmp_path):
    make_redpajama(tmp_path / "sample", "sample", max_bytes=20_000, sources=("book", "common_crawl", "github"))
    src = RedPajamaSource(tmp_path / "sample")
    assert [(u.key, u.source) for u in src.units()] == [
        ("book_sample.jsonl", "book"), ("cc_2019-30_sample.jsonl", "common_crawl"),
        ("github_sample.jsonl", "github")]
    make_redpajama(tmp_path / "v2", "v2", max_bytes=30_000, sources=("common_crawl",))
    v2 = RedPajamaSource(tmp_path / "v2")
    (unit,) = v2.units()
    assert unit.key == "documents/2023-06/0000/en_head.json.gz" and unit.source == "common_crawl"
    n_docs = sum(1 for _ in v2.read(unit))
    # the hook sees the record and its quality signals (from quality_signals/, line by line)
    seen = []

    def keep_long(record, signals):
        seen.append(signals["quality_signals"]["rps_doc_word_count"][0][2])
        return None if signals["quality_signals"]["rps_doc_word_count"][0][2] >= 300 else "short"

    import phiforge.data.redpajama as rp

    rp.QUALITY_FILTERS["test-long"] = keep_long
    try:
        out = tmp_path / "v2out"
        prepare(RedPajamaSource(tmp_path / "v2", quality_filter="test-long"), out, None, val_fraction=0.3,
                workers=0)
    finally:
        del rp.QUALITY_FILTERS["test-long"]
    rep = json.loads((out / "prepare-report.json").read_text())
    dropped = rep["removed"]["quality filter: short"]["count"]
    assert len(seen) == n_docs and dropped == sum(1 for w in seen if w < 300) and dropped > 0
    assert rep["kept"]["documents"] == n_docs - dropped
    assert rep["read"]["documents"] == n_docs  # the filtered ones were read too
    # the built-in rule set runs on 1T documents too (from the text, no signals)
    assert rp.rpv2_basic({"text": "word " * 10}, None) == "word count"
    assert rp.rpv2_basic({"text": "A fine sentence with words. " * 30}, None) is None


def test_classify_and_weights():
    from pathlib import Path

    assert classify(Path("common_crawl/2019-30/en_head_0000.json.gz.dedup.classifier.jsonl.zst")) == \
        ("common_crawl", False)
    assert classify(Path("cc_2020-05_sample.jsonl")) == ("common_crawl", False)
    assert classify(Path("wikipedia_sample.jsonl")) == ("wikipedia", False)
    assert classify(Path("documents/2023-06/0000/en_head.json.gz")) == ("common_crawl", True)
    with pytest.raises(DataError, match="cannot tell which RedPajama source misc/x.jsonl"):
        classify(Path("misc/x.jsonl"))
    assert parse_weights("book=1,github=3") == {"book": 1.0, "github": 3.0}
    with pytest.raises(DataError, match="--weights"):
        parse_weights("book=-1")


def test_output_does_not_depend_on_worker_count(tmp_path, redpajama_fixture, redpajama_dir):
    out = tmp_path / "w0"
    prepare(RedPajamaSource(redpajama_fixture), out, None, val_fraction=0.1, shard_tokens=4000, workers=0,
            mixture=dict(DEFAULT_WEIGHTS))
    names = sorted(p.name for p in out.iterdir() if p.name != "prepare-report.json")
    assert names == sorted(p.name for p in redpajama_dir.iterdir() if p.name != "prepare-report.json")
    for name in names:
        assert (out / name).read_bytes() == (redpajama_dir / name).read_bytes(), name


def test_cli_inspect_shows_sources_and_mixture(capsys, redpajama_dir):
    code, out, err = run_cli(capsys, "data", "inspect", redpajama_dir)
    assert code == 0, err
    assert "format phiforge-tokens v2" in out and "validation by fraction: 0.1 of the documents" in out
    for src in SOURCES:
        assert src in out
    assert "common_crawl" in out and "67.0%" in out and "sample (train, first 60 tokens)" in out


def test_cli_redpajama_errors(capsys, tmp_path):
    code, _, err = run_cli(capsys, "prepare", "redpajama", "--input", tmp_path / "nope", "--out", tmp_path / "o")
    assert_one_line_error(code, err, "--input", "is not a directory")
    (tmp_path / "empty").mkdir()
    code, _, err = run_cli(capsys, "prepare", "redpajama", "--input", tmp_path / "empty", "--out", tmp_path / "o")
    assert_one_line_error(code, err, "no RedPajama files", str(tmp_path / "empty"))
    code, _, err = run_cli(capsys, "prepare", "redpajama", "--input", tmp_path, "--out", tmp_path / "o",
                           "--weights", "book")
    assert_one_line_error(code, err, "--weights: cannot read 'book'")


def test_mixture_recorded_for_the_sources_the_dataset_holds(capsys, tmp_path):
    """A dataset with 3 of the 7 default sources records their weights only, renormalised, and says so; the
    loader, validation and `litgpt prepare --mixture index` use it as it is."""
    raw = make_redpajama(tmp_path / "raw", "1T", max_bytes=15_000, sources=("book", "github", "wikipedia"))
    out = tmp_path / "ds"
    code, stdout, err = run_cli(capsys, "prepare", "redpajama", "--input", raw, "--out", out, "--val-fraction", "0.2",
                                "--workers", "0")
    assert code == 0, err
    index = open_token_dataset(out).index
    assert index["mixture"]["weights"] == pytest.approx({"github": 100 / 3, "wikipedia": 100 / 3, "book": 100 / 3})
    note = "mixture: common_crawl, c4, arxiv, stackexchange not in this dataset, left out"
    assert note in stdout and any(n.startswith(note) for n in json.loads((out / "prepare-report.json").read_text())
                                  ["notes"])
    ld = PackedLoader(out, "train", seq_len=16, batch_size=8, seed=0, mixture="index")
    for _ in range(5):
        ld.next_batch()
    assert sorted(ld.sources) == ["book", "github", "wikipedia"] and sum(ld.consumed) == 40
    assert len(eval_batches(out, "val", 16, 2, 2, mixture="index")) == 2
    # weights naming a source the input lacks, and leaving one out
    prepare(RedPajamaSource(raw), tmp_path / "w", None, val_fraction=0.2, workers=0, mixture={"book": 1, "c4": 3},
            summary=print)
    assert open_token_dataset(tmp_path / "w").index["mixture"]["weights"] == {"book": 4.0}  # c4's weight too
    printed = capsys.readouterr().out
    assert "mixture: c4 not in this dataset" in printed and "github, wikipedia have no weight and are not sampled" in printed
    code, _, err = run_cli(capsys, "litgpt", "prepare", "--from-dataset", out, "--out", tmp_path / "lit", "--seq-len",
                           16, "--mixture", "index", "--eval-batches", 1)
    assert code == 0, err
    assert json.loads((tmp_path / "lit" / "litgpt-data.json").read_text())["mixture"] == \
        pytest.approx(index["mixture"]["weights"])


def _docs_file(path, n):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"text": f"Document {i}. " + "Words and more words. " * 20}) + "\n"
                            for i in range(n)))


def test_small_sample_holds_out_one_document(capsys, tmp_path):
    """The default --val-fraction 0.001 holds out nothing from 5 documents: one is held out instead (the one with
    the smallest hash), the summary says so, and a rerun gives the same dataset."""
    from phiforge.data.prepare import _fraction

    _docs_file(tmp_path / "rp" / "book" / "b.jsonl", 5)
    ids = [f"book/b.jsonl:{n}" for n in range(1, 6)]
    assert min(map(_fraction, ids)) >= 0.001  # the fraction alone leaves the val split empty
    want = min(ids, key=_fraction)
    runs = []
    for name in ("a", "b"):
        out = tmp_path / name
        code, stdout, err = run_cli(capsys, "prepare", "redpajama", "--input", tmp_path / "rp", "--out", out,
                                    "--workers", "0")
        assert code == 0, err
        assert f"held out one document ({want}) so that the val split is not empty" in stdout
        ds = open_token_dataset(out)
        assert [d["id"] for d in ds.iter_documents() if d["split"] == "val"] == [want]
        assert ds.index["prepared"]["val"] == {"method": "fraction", "fraction": 0.001, "held_out": [want]}
        runs.append({p.name: p.read_bytes() for p in out.iterdir() if p.name != "prepare-report.json"})
    assert runs[0] == runs[1]
    code, stdout, err = run_cli(capsys, "data", "inspect", tmp_path / "a")
    assert code == 0 and f"(and {want}, so that the split is not empty)" in stdout, err


def test_empty_splits_are_one_line_errors_that_say_why(capsys, tmp_path):
    from phiforge.data.prepare import _fraction

    _docs_file(tmp_path / "one" / "book" / "b.jsonl", 1)
    code, _, err = run_cli(capsys, "prepare", "redpajama", "--input", tmp_path / "one", "--out", tmp_path / "o",
                           "--workers", "0")
    assert_one_line_error(code, err, "the val split came out empty: 1 document(s) kept of 1 read",
                          "nothing removed", "needs at least 2")
    assert "report" not in err  # no pointer to a report that was not written
    _docs_file(tmp_path / "two" / "book" / "b.jsonl", 2)
    assert max(_fraction(f"book/b.jsonl:{n}") for n in (1, 2)) < 0.99
    code, _, err = run_cli(capsys, "prepare", "redpajama", "--input", tmp_path / "two", "--out", tmp_path / "o",
                           "--workers", "0", "--val-fraction", "0.99")
    assert_one_line_error(code, err, "the train split came out empty", "2 document(s) kept", "--val-fraction")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one", "two"]  # nothing left behind


# ---------------------------------------------------------------------------------------------- mixture loader


def test_mixture_loader_exact_resume(redpajama_dir):
    a = PackedLoader(redpajama_dir, "train", seq_len=32, batch_size=4, seed=11, mixture="index")
    for _ in range(7):
        a.next_batch()
    state = json.loads(json.dumps(a.state_dict()))  # survives JSON (train_state.json)
    assert state["order"] == "mixture" and sum(state["consumed"].values()) == 28
    expected = [a.next_batch() for _ in range(40)]  # long enough for small sources to start new epochs
    b = PackedLoader(redpajama_dir, "train", seq_len=32, batch_size=4, seed=11, mixture="index")
    b.load_state_dict(state)
    got = [b.next_batch() for _ in range(40)]
    assert _same(expected, got) and b.state_dict() == a.state_dict()
    # the state refuses another mixture, and a plain loader refuses a mixture state
    other = PackedLoader(redpajama_dir, "train", seq_len=32, batch_size=4, seed=11, mixture={"book": 1, "c4": 1})
    with pytest.raises(DataError, match="mixture"):
        other.load_state_dict(state)
    plain = PackedLoader(redpajama_dir, "train", seq_len=32, batch_size=4, seed=11)
    with pytest.raises(DataError, match="order 'mixture'"):
        plain.load_state_dict(state)


def test_mixture_ranks_split_the_global_batch_and_resume_across_world_sizes(redpajama_dir):
    one = PackedLoader(redpajama_dir, "train", seq_len=16, batch_size=8, seed=2, mixture="index")
    ranks = [PackedLoader(redpajama_dir, "train", seq_len=16, batch_size=4, seed=2, rank=r, world_size=2,
                          mixture="index") for r in range(2)]
    for _ in range(5):
        x, _ = one.next_batch()
        x0, _ = ranks[0].next_batch()
        x1, _ = ranks[1].next_batch()
        assert torch.equal(x[0::2], x0) and torch.equal(x[1::2], x1)  # global samples dealt round-robin
    assert ranks[0].state_dict() == ranks[1].state_dict()
    # 1 rank -> 2 ranks: continue where the global stream stopped
    state = one.state_dict()
    nxt = one.next_batch()[0]
    moved = [PackedLoader(redpajama_dir, "train", seq_len=16, batch_size=4, seed=2, rank=r, world_size=2,
                          mixture="index") for r in range(2)]
    for ld in moved:
        ld.load_state_dict(state)
    assert torch.equal(moved[0].next_batch()[0], nxt[0::2]) and torch.equal(moved[1].next_batch()[0], nxt[1::2])


def test_mixture_samples_sources_by_weight(redpajama_dir):
    ds = open_token_dataset(redpajama_dir)
    weights = {"common_crawl": 67, "c4": 15, "github": 4.5, "wikipedia": 4.5, "book": 4.5, "arxiv": 2.5,
               "stackexchange": 2}
    ld = PackedLoader(redpajama_dir, "train", seq_len=16, batch_size=50, seed=0, mixture=weights)
    for _ in range(120):  # 6000 samples
        ld.next_batch()
    counts = dict(zip(ld.sources, ld.consumed))
    total = sum(counts.values())
    for src, w in weights.items():
        assert abs(counts[src] / total - w / 100) < 0.02, (src, counts[src] / total)
    # common_crawl is small here, so it has cycled through several epochs of its own windows
    assert counts["common_crawl"] > ds.source_tokens("train")["common_crawl"] // 16
    with pytest.raises(DataError, match="source\\(s\\) nosuch"):
        PackedLoader(redpajama_dir, "train", seq_len=16, batch_size=4, mixture={"nosuch": 1, "book": 1})
    with pytest.raises(ConfigError, match="weight"):
        PackedLoader(redpajama_dir, "train", seq_len=16, batch_size=4, mixture={"book": -1})


def test_source_windows_come_from_their_source_and_epochs_cover_them(redpajama_dir):
    ds = open_token_dataset(redpajama_dir)
    ld = PackedLoader(redpajama_dir, "train", seq_len=16, batch_size=16, seed=4, mixture={"arxiv": 1})
    n = ld.source_windows[0]
    stream = ds.source_stream("train", "arxiv")
    seen = []
    for _ in range(-(-n // 16)):
        x, _ = ld.next_batch()
        seen.extend(x.tolist())
    windows = {tuple(stream.read(w * 16, 16).tolist()) for w in range(n)}
    assert {tuple(r) for r in seen[:n]} == windows  # the first epoch of arxiv visits each window once


def test_eval_batches_with_mixture(redpajama_dir):
    plain = eval_batches(redpajama_dir, "val", 16, 4, 2)
    assert _same(plain, eval_batches(redpajama_dir, "val", 16, 4, 2))
    mixed = eval_batches(redpajama_dir, "val", 16, 4, 3, mixture={"c4": 1, "common_crawl": 1})
    ds = open_token_dataset(redpajama_dir)
    rows = torch.cat([x for x, _ in mixed]).tolist()
    c4 = ds.source_stream("val", "c4")
    cc = ds.source_stream("val", "common_crawl")
    assert len(rows) == 12 and rows[0] == c4.read(0, 16).tolist() and rows[1] == cc.read(0, 16).tolist()


# ---------------------------------------------------------------------------------------------- scalable order


def test_feistel_order_is_a_permutation_and_resumes_exactly(tmp_path):
    for n in (1, 2, 3, 17, 1000, 4097):
        f = FeistelOrder(n, (5, 1))
        assert sorted(f[np.arange(n)].tolist()) == list(range(n))
    assert FeistelOrder(1000, (5, 1))[np.arange(20)].tolist() != FeistelOrder(1000, (5, 2))[np.arange(20)].tolist()
    from test_data import _synthetic

    _synthetic(tmp_path / "ds")
    kw = dict(seq_len=16, batch_size=4, seed=3, shuffle="feistel")
    ranks = [PackedLoader(tmp_path / "ds", "train", rank=r, world_size=2, **kw) for r in range(2)]
    orders = [ld.epoch_order(0) for ld in ranks]
    assert set(orders[0].tolist()).isdisjoint(orders[1].tolist())
    a = PackedLoader(tmp_path / "ds", "train", **kw)
    assert sorted(a.epoch_order(0).tolist()) == list(range(a.n_windows))
    for _ in range(a.batches_per_epoch - 1):
        a.next_batch()
    state = a.state_dict()
    assert state["order"] == "feistel"
    exp = [a.next_batch() for _ in range(a.batches_per_epoch + 2)]
    b = PackedLoader(tmp_path / "ds", "train", **kw)
    b.load_state_dict(state)
    assert _same(exp, [b.next_batch() for _ in range(len(exp))])
    # the default stays the explicit permutation for datasets of up to 2^22 windows: old states still load
    old = PackedLoader(tmp_path / "ds", "train", seq_len=16, batch_size=4, seed=3)
    assert old.shuffle == "permutation" and "order" not in old.state_dict()
    with pytest.raises(DataError, match="order 'feistel'"):
        old.load_state_dict(state)


def test_reads_version_1_datasets(tmp_path):
    """A dataset written by the previous format (documents inline, no per-shard source) still opens and loads."""
    from test_data import _synthetic

    _synthetic(tmp_path / "ds")
    d = tmp_path / "ds"
    idx = json.loads((d / "index.json").read_text())
    docs = [json.loads(l) for l in (d / "documents.jsonl").read_text().splitlines()]
    idx.update(version=1, documents=docs)
    for info in idx["splits"].values():
        info.pop("sources")
        for s in info["shards"]:
            s.pop("source")
    (d / "documents.jsonl").unlink()
    (d / "index.json").write_text(json.dumps(idx))
    ds = open_token_dataset(d)
    ds.verify()
    assert ds.version == 1 and ds.n_documents == 4 and ds.documents == docs
    assert list(ds.sources("train")) == [""]
    ld = PackedLoader(d, "train", seq_len=32, batch_size=2, seed=1)
    state = {k: v for k, v in ld.state_dict().items()}
    assert state == {"version": 1, "epoch": 0, "position": 0, "seed": 1, "seq_len": 32, "batch_size": 2,
                     "world_size": 1, "windows": ld.n_windows}  # the old loader's state, unchanged
    ld.next_batch()


def test_train_on_the_mixture(capsys, tmp_path, redpajama_dir):
    """`phiforge train --set data.mixture=index` samples sources by the recorded weights and saves the
    per-source position for resume; a bad mixture is a one-line error."""
    model = "model={preset: tiny, vocab_size: 50304, max_seq_len: 64}"
    common = ["--set", model, "--set", f"data.dir={redpajama_dir}", "--set", "data.seq_len=32",
              "--set", "micro_batch_size=4", "--set", "max_steps=6", "--set", "eval_interval=6",
              "--set", "eval_batches=1", "--set", "save_interval=6", "--set", "optim.warmup_steps=1"]
    run = tmp_path / "mix"
    code, _, err = run_cli(capsys, "train", *common, "--set", f"out_dir={run}", "--set", "data.mixture=index")
    assert code == 0, err
    state = json.loads((run / "checkpoints" / "step-00000006" / "train_state.json").read_text())["loader"]
    weights = open_token_dataset(redpajama_dir).index["mixture"]["weights"]
    assert state["order"] == "mixture" and state["mixture"] == {k: float(v) for k, v in weights.items() if v}
    assert sum(state["consumed"].values()) == 6 * 4 and len([v for v in state["consumed"].values() if v]) >= 2
    code, _, err = run_cli(capsys, "train", *common, "--set", f"out_dir={tmp_path / 'bad'}",
                           "--set", "data.mixture=weighted")
    assert_one_line_error(code, err, "data.mixture")
    code, _, err = run_cli(capsys, "train", *common, "--set", f"out_dir={tmp_path / 'bad2'}",
                           "--set", "data.mixture={nosuch: 1}")
    assert_one_line_error(code, err, "nosuch")
