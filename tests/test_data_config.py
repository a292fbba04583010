"""Data preparation as an API: PrepareConfig through the training config loader (YAML, flags, --set,
--print-config), the study and `litgpt prepare` calling it, and the one Gutenberg source registry."""

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from phiforge.data.corpora import (CORPORA, GUTENBERG_SOURCES, GutenbergPrepareConfig, RedPajamaPrepareConfig,
                                   config_yaml, load_prepare_config, parse_flags, prepare_corpus)
from phiforge.data.shards import open_token_dataset
from phiforge.errors import PhiforgeError

from conftest import assert_one_line_error, run_cli

ROOT = Path(__file__).resolve().parents[1]
DOCS = b"".join(json.dumps({"text": f"Document {i}. " + "Some words here. " * 30}).encode() + b"\n"
                for i in range(12))

# a value for every key of each corpus (as the flag's text; None: a switch) and what the config holds then
COMMON = {"out": ("o", "o"), "tokenizer_dir": ("t", "t"), "shard_tokens": ("1_000", 1000), "workers": ("3", 3),
          "near_dup_threshold": ("0.7", 0.7), "checkpoint_seconds": ("5", 5.0), "restart": (None, True),
          "progress": (None, True), "task_count": ("4", 4), "task_index": ("2", 2)}
VALUES = {
    "gutenberg": {**COMMON, "dedup": ("exact", "exact"), "source": ("mirror", "mirror"), "val_books": ("2", 2),
                  "mirror": ("m", "m"), "catalog": ("c.csv", "c.csv"), "language": ("en,fr", ["en", "fr"]),
                  "type": ("Text", ["Text"]), "ids": ("1-100", "1-100"), "parquet": ("a.parquet", ["a.parquet"]),
                  "catalog_filter": (None, True), "mirror_url": ("http://x", "http://x"),
                  "url_template": ("{mirror}/{id}", "{mirror}/{id}"), "cache": ("cc", "cc"),
                  "rate_limit": ("2", 2.0), "retries": ("1", 1)},
    "redpajama": {**COMMON, "input": ("in", "in"), "sources": ("book,github", ["book", "github"]),
                  "weights": ("book=1,github=3", {"book": 1.0, "github": 3.0}), "val_fraction": ("0.2", 0.2),
                  "quality_filter": ("rpv2-basic", "rpv2-basic"), "dedup": ("none", "none")},
}
ALONE = {"val_ids": ("105,121", ["105", "121"]), "download": ("1342", None)}  # exclusive with keys above


def _flag(key):
    return "--" + key.replace("_", "-")


@pytest.mark.parametrize("corpus", ["gutenberg", "redpajama"])
def test_every_flag_is_a_config_key_and_print_config_is_a_valid_config(capsys, tmp_path, corpus):
    import dataclasses

    keys = {f.name for f in dataclasses.fields(CORPORA[corpus])}
    assert set(VALUES[corpus]) | (set(ALONE) if corpus == "gutenberg" else set()) == keys  # all of them tried
    argv = []
    for key, (text, _) in VALUES[corpus].items():
        argv += [_flag(key)] + ([text] if text is not None else [])
    code, out, err = run_cli(capsys, "prepare", corpus, *argv, "--print-config")
    assert code == 0, err
    printed = yaml.safe_load(out)
    assert set(printed) == keys
    for key, (_, want) in VALUES[corpus].items():
        assert printed[key] == want, key
    # the output is itself a valid --config file that loads to the same config
    (tmp_path / "c.yaml").write_text(out)
    cfg = load_prepare_config(corpus, tmp_path / "c.yaml")
    assert config_yaml(cfg) == out
    code, again, err = run_cli(capsys, "prepare", corpus, "--config", tmp_path / "c.yaml", "--print-config")
    assert code == 0 and again == out, err
    # parse_flags (a study's prepare_args, litgpt --prepare-args) reads the same flags to the same config
    assert load_prepare_config(corpus, flags=parse_flags(corpus, argv)) == cfg
    if corpus == "gutenberg":
        code, out, err = run_cli(capsys, "prepare", corpus, "--val-ids", "105,121", "--print-config")
        assert code == 0 and yaml.safe_load(out)["val_ids"] == ["105", "121"], err
        code, out, err = run_cli(capsys, "prepare", corpus, "--download", "1342", "--print-config")
        assert code == 0 and yaml.safe_load(out)["ids"] == "1342", err


def test_file_then_flags_then_set(capsys, tmp_path):
    (tmp_path / "p.yaml").write_text("workers: 1\nval_books: 2\nshard_tokens: 5000\nout: from-file\n")
    code, out, err = run_cli(capsys, "prepare", "gutenberg", "--config", tmp_path / "p.yaml", "--workers", "2",
                             "--val-ids", "105", "--set", "shard_tokens=7000", "--print-config")
    assert code == 0, err
    cfg = yaml.safe_load(out)
    assert cfg["workers"] == 2 and cfg["shard_tokens"] == 7000 and cfg["out"] == "from-file"
    assert cfg["val_ids"] == ["105"] and cfg["val_books"] is None  # the flag replaces the file's other choice
    assert parse_flags("gutenberg", ["--val-ids=105", "--restart", "--parquet", "a", "b"]) == \
        {"val_ids": "105", "restart": True, "parquet": ["a", "b"]}
    download = load_prepare_config("gutenberg", flags={"download": "1342,2701"})
    assert (download.source, download.ids, download.download) == ("download", "1342,2701", None)


def test_bad_config_values_are_one_line_errors_before_any_work(capsys, tmp_path):
    inp = tmp_path / "rp"
    (inp / "book").mkdir(parents=True)
    (inp / "book" / "b.jsonl").write_bytes(DOCS)
    out = tmp_path / "ds"
    cases = [
        (["--near-dup-threshold", "5"], "--near-dup-threshold (near_dup_threshold)", "got 5"),
        (["--workers", "abc"], "'workers' must be an integer", "abc"),
        (["--shard-tokens", "0"], "--shard-tokens (shard_tokens) must be at least 1"),
        (["--val-fraction", "1.5"], "--val-fraction (val_fraction) must be between 0 and 1"),
        (["--weights", "book=-1"], "--weights: cannot read 'book=-1'"),
        (["--dedup", "fuzzy"], "--dedup: unknown mode(s) fuzzy"),
        (["--set", "nosuch=1"], "unknown config key 'nosuch'"),
        (["--sources", "book", "--weights", "github=1"], "none of the weighted sources (github) is in the input"),
    ]
    for extra, *needles in cases:
        code, _, err = run_cli(capsys, "prepare", "redpajama", "--input", inp, "--out", out, *extra)
        assert_one_line_error(code, err, *needles)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["rp"], extra  # no .ds.partial, no ds
    code, _, err = run_cli(capsys, "prepare", "redpajama", "--out", out)
    assert_one_line_error(code, err, "give --input DIR")
    code, _, err = run_cli(capsys, "prepare", "redpajama", "--input", inp, "--out", out, "--set", "weights={book: x}")
    assert_one_line_error(code, err, "--weights (weights): each source needs a number >= 0")
    gutenberg = [(["--val-books", "0"], "--val-books (val_books) must be at least 1, got 0"),
                 (["--checkpoint-seconds", "-1"], "--checkpoint-seconds (checkpoint_seconds) must be 0 or more"),
                 (["--rate-limit", "0"], "--rate-limit (rate_limit) must be above 0"),
                 (["--retries", "-1"], "--retries (retries) must be 0 or more"),
                 (["--workers", "-2"], "--workers (workers) must be 0 (in this process) or more, got -2")]
    for extra, needle in gutenberg:
        code, _, err = run_cli(capsys, "prepare", "gutenberg", "--out", out, *extra)
        assert_one_line_error(code, err, needle)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rp"]
    (tmp_path / "bad.yaml").write_text("val_books: two\n")
    code, _, err = run_cli(capsys, "prepare", "gutenberg", "--config", tmp_path / "bad.yaml", "--out", out)
    assert_one_line_error(code, err, "'val_books' must be an integer")
    code, _, err = run_cli(capsys, "prepare", "gutenberg")
    assert_one_line_error(code, err, "give --out DIR")
    with pytest.raises(PhiforgeError, match="has no option '--nosuch'"):
        parse_flags("redpajama", ["--nosuch", "1"])
    with pytest.raises(PhiforgeError, match="does not exist"):
        load_prepare_config("wikipedia")


def test_prepare_from_a_config_file_equals_the_flags(capsys, tmp_path):
    inp = tmp_path / "rp"
    (inp / "book").mkdir(parents=True)
    (inp / "book" / "b.jsonl").write_bytes(DOCS)
    flags = ["--input", inp, "--val-fraction", "0.3", "--workers", "0", "--shard-tokens", "2000"]
    code, _, err = run_cli(capsys, "prepare", "redpajama", *flags, "--out", tmp_path / "a")
    assert code == 0, err
    cfg = RedPajamaPrepareConfig(input=str(inp), val_fraction=0.3, workers=0, shard_tokens=2000,
                                 out=str(tmp_path / "b"))
    (tmp_path / "c.yaml").write_text(config_yaml(cfg))
    code, _, err = run_cli(capsys, "prepare", "redpajama", "--config", tmp_path / "c.yaml")
    assert code == 0, err
    for name in ("documents.jsonl", "train-00000.bin", "val-00000.bin"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    index = prepare_corpus(RedPajamaPrepareConfig(input=str(inp), val_fraction=0.3, workers=0,
                                                  out=str(tmp_path / "c")), echo=None)
    assert index == open_token_dataset(tmp_path / "c").index and capsys.readouterr().out == ""


def test_study_prepares_through_the_api(capsys, tmp_path):
    from phiforge.study.config import Route, StudyConfig, StudyData
    from phiforge.study.runner import _prepare_tokens

    inp = tmp_path / "rp"
    (inp / "book").mkdir(parents=True)
    (inp / "book" / "b.jsonl").write_bytes(DOCS)
    routes = [Route(name="dense")]
    study = StudyConfig(name="t", routes=routes, data=StudyData(corpus="redpajama", prepare_args=[
        "--input", str(inp), "--val-fraction", "0.3", "--workers", "0"]))
    out = _prepare_tokens(study, tmp_path / "work")
    assert out == tmp_path / "work" / "data" / "phiforge"
    assert open_token_dataset(out).index["prepared"]["val"] == {"method": "fraction", "fraction": 0.3}
    assert "study: phiforge prepare redpajama --input" in capsys.readouterr().out
    assert _prepare_tokens(study, tmp_path / "work") == out  # the same arguments: reused
    assert "study: reusing" in capsys.readouterr().out
    bad = StudyConfig(name="t", routes=routes, data=StudyData(corpus="redpajama", prepare_args=["--input", str(inp), "--oops"]))
    with pytest.raises(PhiforgeError, match="no option '--oops'"):
        _prepare_tokens(bad, tmp_path / "work2")


def test_one_gutenberg_registry_and_no_cli_imports_outside_the_commands():
    assert list(GUTENBERG_SOURCES) == ["bundled", "mirror", "parquet", "download"]
    assert GutenbergPrepareConfig(source="parquet").source == "parquet"
    # importing the base sources registers nothing and pulls in no other source module
    code = ("import sys, phiforge.data.sources as s; assert 'phiforge.data.mirror' not in sys.modules; "
            "assert not hasattr(s, 'GUTENBERG_SOURCES')")
    subprocess.run([sys.executable, "-c", code], check=True, env={"PYTHONPATH": str(ROOT / "src")})
    src = ROOT / "src" / "phiforge"
    offenders = []
    for path in src.rglob("*.py"):
        rel = path.relative_to(src).as_posix()
        if rel in ("cli.py", "__main__.py") or rel.startswith("commands/"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            offenders += [f"{rel}: {n}" for n in names if n == "phiforge.cli" or n.startswith("phiforge.cli.")]
    assert offenders == []


def test_no_function_in_the_data_layer_is_over_100_lines():
    long = []
    for path in [*(ROOT / "src/phiforge/data").glob("*.py"), ROOT / "src/phiforge/commands/prepare.py"]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 100:
                long.append(f"{path.name}:{node.name}")
    assert long == []
