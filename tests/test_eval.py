"""`phiforge eval` (issue 12): bits per byte exact against transformers, sliding windows that score every token
once, prepared datasets, every bad input of item 7, make-cloze, and eval_tasks in a training run."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch

from conftest import assert_one_line_error, read_only, run_cli, snapshot
from eval_helpers import cloze_rows, gpt2_checkpoint, mc_rows, write_jsonl
from phiforge.evaluation import load_for_eval, score_dataset, score_documents
from phiforge.evaluation import scoring
from phiforge.evaluation.cloze import STOPWORDS, cloze_item
from phiforge.evaluation.scoring import window_plan
from phiforge.tokenizer import EOT_ID, builtin_tokenizer, save_tokenizer_files, train_byte_level_bpe

TEXT = "It is a truth universally acknowledged, that a single man — ünïcödé 日本 — must be in want of a wife."


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return gpt2_checkpoint(tmp_path_factory.mktemp("eval") / "ckpt")


@pytest.fixture(scope="module")
def hf_model(ckpt, tmp_path_factory):
    import transformers
    from phiforge.hf import convert_to_hf

    out = tmp_path_factory.mktemp("hf") / "hf"
    convert_to_hf(ckpt, out)
    return transformers.PhiForCausalLM.from_pretrained(out, dtype=torch.float32).eval()


def hf_nats(hf_model, tokens: list[int], begin: int, end: int, first: int) -> float:
    """Nats of tokens[first:end] by transformers, with the input tokens[begin:end-1]."""
    with torch.no_grad():
        logits = hf_model(torch.tensor([tokens[begin : end - 1]])).logits[0].double()
    logprobs = logits.log_softmax(-1)[first - begin - 1 :].gather(1, torch.tensor(tokens[first:end])[:, None])
    return -float(logprobs.sum())


def test_text_nats_match_transformers(capsys, ckpt, hf_model, tmp_path):
    (tmp_path / "t.txt").write_text(TEXT, encoding="utf-8")
    code, out, err = run_cli(capsys, "eval", "--checkpoint", ckpt, "--text", tmp_path / "t.txt", "--out",
                             tmp_path / "r.json")
    assert code == 0, err
    result = json.loads((tmp_path / "r.json").read_text())
    tokens = [EOT_ID, *builtin_tokenizer().encode(TEXT).ids]
    assert len(tokens) <= 64  # one window
    ref = hf_nats(hf_model, tokens, 0, len(tokens), 1)
    assert result["nats"] == pytest.approx(ref, rel=1e-5)
    assert result["tokens"] == len(tokens) - 1 and result["bytes"] == len(TEXT.encode("utf-8")) > len(TEXT)
    assert result["bpb"] == pytest.approx(result["nats"] / (math.log(2) * result["bytes"]), rel=1e-12)
    assert "Traceback" not in err and str(tmp_path / "t.txt") in out


@pytest.mark.parametrize("max_len, stride", [(8, 1), (8, 3), (8, 4), (8, 8), (64, 32)])
def test_window_plan_scores_every_token_once_with_full_left_context(max_len, stride):
    for n in range(1, 60):
        counts = [0] * n
        for begin, end, first in window_plan(n, max_len, stride):
            assert end - 1 - begin <= max_len and begin == max(0, end - max_len - 1)  # as much context as fits
            for p in range(first, end):
                counts[p] += 1
        assert counts == [0] + [1] * (n - 1)


def test_long_documents_score_each_token_once_and_exactly(monkeypatch, ckpt, hf_model):
    model, tok = load_for_eval(ckpt, device="cpu")
    texts = [" ".join([TEXT] * 9), TEXT + " A short one."]
    counted = []
    real = scoring.token_scores

    def counting(model, idx, where, targets, *args, **kwargs):
        counted.append(len(targets))
        return real(model, idx, where, targets, *args, **kwargs)

    monkeypatch.setattr(scoring, "token_scores", counting)
    result = score_documents(model, tok, texts, stride=24, batch_size=3)
    streams = [[EOT_ID, *tok.encode(t).ids] for t in texts]
    assert len(streams[0]) > 4 * 64  # several windows
    assert sum(counted) == result.tokens == sum(len(s) - 1 for s in streams)
    for stream, doc in zip(streams, result.documents):
        ref = sum(hf_nats(hf_model, stream, *w) for w in window_plan(len(stream), 64, 24))
        assert doc.nats == pytest.approx(ref, rel=1e-5)


def test_dataset_documents_are_scored_whole(capsys, ckpt, tmp_path):
    from phiforge.data.shards import DatasetWriter

    model, tok = load_for_eval(ckpt, device="cpu")
    texts = [TEXT * 3, "Call me Ishmael. Some years ago."]
    writer = DatasetWriter(tmp_path / "data", {"name": "gpt2", "vocab_size": 50257, "eot_id": EOT_ID})
    for i, t in enumerate(texts):
        writer.add("val", [*tok.encode(t).ids, EOT_ID], id=str(i), title=f"doc {i}", bytes=len(t.encode("utf-8")))
    writer.finish()
    save_tokenizer_files(tmp_path / "data", source_dir=ckpt)  # the tokenizer that made its tokens, as prepare does
    from_data = score_dataset(model, tmp_path / "data", "val")
    from_text = score_documents(model, tok, texts)
    assert [d.name for d in from_data.documents] == ["doc 0", "doc 1"]
    assert from_data.nats == pytest.approx(from_text.nats, rel=1e-9)
    assert (from_data.tokens, from_data.bytes) == (from_text.tokens, from_text.bytes)
    code, out, err = run_cli(capsys, "eval", "--checkpoint", ckpt, "--data", tmp_path / "data", "--split", "test")
    assert_one_line_error(code, err, "has no 'test' split")


def test_eval_data_made_by_another_tokenizer_is_refused(capsys, ckpt, tmp_path):
    """Issue 21, item 6: eval --data compares the tokenizer identities of the checkpoint and the dataset (not only
    the vocabulary size); --allow-tokenizer-mismatch scores it anyway, with a warning."""
    import hashlib

    from phiforge.data.shards import DatasetWriter

    data = tmp_path / "data"
    other = train_byte_level_bpe([TEXT] * 30, vocab_size=300)
    writer = DatasetWriter(data, {"name": "other", "vocab_size": other.get_vocab_size(), "eot_id": 0})
    writer.add("val", [*other.encode(TEXT).ids, 0], id="0", title="doc", bytes=len(TEXT.encode("utf-8")))
    writer.finish()
    (data / "tokenizer.json").write_text(other.to_str())
    before = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in data.iterdir()}
    code, out, err = run_cli(capsys, "eval", "--checkpoint", ckpt, "--data", data)
    assert_one_line_error(code, err, f"dataset {data} was made by another tokenizer than checkpoint {ckpt}",
                          "--allow-tokenizer-mismatch")
    assert out == ""
    code, out, err = run_cli(capsys, "eval", "--checkpoint", ckpt, "--data", data, "--allow-tokenizer-mismatch")
    assert code == 0, err
    assert "phiforge: warning:" in err and "tokenizer mismatch allowed" in err and "doc" in out
    assert {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in data.iterdir()} == before


BAD_TASKS = [
    ("missing.jsonl", None, "file not found", "missing.jsonl"),
    ("empty.jsonl", "", "is empty", "empty.jsonl"),
    ("field.jsonl", [{"context": "a", "choices": ["b", "c"], "label": 0}, {"context": "a", "label": 0}],
     "row 2: no field 'choices'", "field.jsonl"),
    ("one.jsonl", [{"context": "a", "choices": ["b"], "label": 0}], "row 1: 'choices' has 1 choice(s)", "one.jsonl"),
    ("label.jsonl", [{"context": "a", "choices": ["b", "c"], "label": 5}], "row 1: 'label' 5 is out of range",
     "label.jsonl"),
    ("json.jsonl", '{"context": "a", "choices": ["b", "c"], "label": 0}\n{oops\n', "line 2: malformed json line",
     "json.jsonl"),
    ("long.jsonl", [{"context": "a", "choices": ["b " * 80, "c"], "label": 0}],
     "row 1: choice 0 is 81 tokens, longer than the model's context (64)", "long.jsonl"),
]


@pytest.mark.parametrize("name, content, needle, file", BAD_TASKS, ids=[b[0] for b in BAD_TASKS])
def test_bad_task_files_are_one_line_errors(capsys, ckpt, tmp_path, name, content, needle, file):
    path = tmp_path / name
    if isinstance(content, list):
        write_jsonl(path, content)
    elif content is not None:
        path.write_text(content, encoding="utf-8")
    code, out, err = run_cli(capsys, "eval", "--checkpoint", ckpt, "--tasks", f"mc={path}", "--out",
                             tmp_path / "r.json")
    assert_one_line_error(code, err, needle, file)
    assert not (tmp_path / "r.json").exists()


def test_other_bad_inputs_are_one_line_errors(capsys, ckpt, tmp_path):
    (tmp_path / "latin1.txt").write_bytes("fine\ncaf\xe9".encode("latin-1"))
    write_jsonl(tmp_path / "mc.jsonl", mc_rows(3))
    cases = [
        (["--text", tmp_path / "latin1.txt"], ["latin1.txt line 2 is not UTF-8"]),
        (["--tasks", f"quiz={tmp_path / 'mc.jsonl'}"], ["unknown task format 'quiz'", "NAME:FORMAT=PATH"]),
        (["--tasks", f"quiz:mcq={tmp_path / 'mc.jsonl'}"], ["unknown task format 'mcq' for task 'quiz'"]),
        (["--tasks", f"mc={tmp_path / 'mc.jsonl'}", "--num-fewshot", "3"], ["3-shot needs 4 rows", "mc.jsonl"]),
        (["--text", tmp_path / "nope.txt"], ["file not found", "nope.txt"]),
    ]
    for args, needles in cases:
        code, out, err = run_cli(capsys, "eval", "--checkpoint", ckpt, *args, "--out", tmp_path / "r.json")
        assert_one_line_error(code, err, *needles)
        assert not (tmp_path / "r.json").exists()
    (tmp_path / "r.json").write_text("{}")
    code, out, err = run_cli(capsys, "eval", "--checkpoint", ckpt, "--text", tmp_path / "mc.jsonl", "--out",
                             tmp_path / "r.json")
    assert_one_line_error(code, err, "exists; pass --overwrite")
    code, out, err = run_cli(capsys, "eval", "--checkpoint", tmp_path / "none", "--tasks", f"mc={tmp_path / 'mc.jsonl'}")
    assert_one_line_error(code, err, "checkpoint directory not found")


def test_tasks_print_metrics_and_core(capsys, ckpt, tmp_path):
    write_jsonl(tmp_path / "mc.jsonl", mc_rows(12))
    write_jsonl(tmp_path / "cloze.jsonl", cloze_rows(5))
    code, out, err = run_cli(capsys, "eval", "--checkpoint", ckpt, "--tasks",
                             f"mc={tmp_path / 'mc.jsonl'},words:cloze={tmp_path / 'cloze.jsonl'}", "--out",
                             tmp_path / "r.json")
    assert code == 0, err
    r = json.loads((tmp_path / "r.json").read_text())
    mc, words = r["tasks"]["mc"], r["tasks"]["words"]
    assert mc["n"] == 12 and 0 <= mc["acc"] <= 1 and set(mc) >= {"acc_norm", "acc_bytes", "random_baseline"}
    assert words["n"] == 5 and words["ll"] < 0 and words["random_baseline"] == 0
    rb = mc["random_baseline"]
    assert r["core"] == pytest.approx(((mc["acc"] - rb) / (1 - rb) + words["acc"]) / 2)
    assert re.search(r"mc \(12 questions, 0-shot\): acc [0-9.]+, acc_norm", out) and "CORE" in out


def test_make_cloze_is_deterministic_and_filtered(capsys, gutenberg_dir, tmp_path):
    outs = []
    for name, seed in (("a.jsonl", 0), ("b.jsonl", 0), ("c.jsonl", 1)):
        code, out, err = run_cli(capsys, "eval", "make-cloze", "--data", gutenberg_dir, "--out", tmp_path / name,
                                 "--n-items", 100, "--seed", seed)
        assert code == 0, err
        outs.append((tmp_path / name).read_bytes())
    assert outs[0] == outs[1] and outs[0] != outs[2]
    rows = [json.loads(line) for line in outs[0].decode().splitlines()]
    assert len(rows) == 100 and len({(r["document"], r["sentence"]) for r in rows}) == 100
    for r in rows:
        context, target = r["text"].rsplit(" ", 1)
        assert target == r["target"] and re.fullmatch("[A-Za-z]{3,}", target) and target.lower() not in STOPWORDS
        assert target in re.findall("[A-Za-z]+", context) and 30 <= len(r["text"].split(" ")) <= 200
        assert r["document"] == "Persuasion"  # the held-out book only
    code, out, err = run_cli(capsys, "eval", "make-cloze", "--data", gutenberg_dir, "--out", tmp_path / "a.jsonl")
    assert_one_line_error(code, err, "a.jsonl exists")


def test_cloze_filter_rejects_targets_the_passage_does_not_give():
    words = " ".join(["word"] * 30)
    assert cloze_item([f"{words} Anne went out.", "She said it to Anne."]) == (f"{words} Anne went out. "
                                                                              "She said it to", "Anne")
    assert cloze_item([f"{words} Anne went out.", "She said it to Mary."]) is None  # not in the passage before
    assert cloze_item([f"{words} the end.", "She said it to the."]) is None  # a function word
    assert cloze_item(["Anne went out.", "She said it to Anne."]) is None  # too short a passage


def test_eval_tasks_during_training(capsys, gutenberg_dir, tmp_path):
    write_jsonl(tmp_path / "mc.jsonl", mc_rows(6))
    (tmp_path / "book.txt").write_text(TEXT * 4, encoding="utf-8")
    small = ["--set", "model.n_layer=2", "--set", "model.n_embd=64", "--set", "model.n_head=4",
             "--set", "model.intermediate_size=128", "--set", "data.seq_len=32", "--set", "micro_batch_size=2",
             "--set", "eval_batches=2", "--set", f"data.dir={gutenberg_dir}", "--set", "max_steps=4",
             "--set", "eval_interval=2", "--set", "log_interval=2"]
    tasks = json.dumps([f"mc={tmp_path / 'mc.jsonl'}", {"name": "book", "path": str(tmp_path / "book.txt"),
                                                        "format": "text"}])
    code, out, err = run_cli(capsys, "train", *small, "--set", f"out_dir={tmp_path / 'run'}",
                             "--set", f"eval_tasks={tasks}")
    assert code == 0, err
    evals = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["event"] == "eval"]
    assert [e["step"] for e in evals] == [0, 2, 4]
    for e in evals:
        for key in ("task/mc/acc", "task/mc/acc_norm"):  # a share of the 6 questions
            assert 0 <= e[key] <= 1 and e[key] * 6 == pytest.approx(round(e[key] * 6))
    assert evals[-1]["text/book/bpb"] < evals[0]["text/book/bpb"]  # it learns English
    assert list((tmp_path / "run" / "tensorboard").iterdir())
    # eval_tasks_interval=3: the tasks only at validations on a multiple of 3 (step 0) and the last one
    code, out, err = run_cli(capsys, "train", *small, "--set", "max_steps=5", "--set", "eval_tasks_interval=3",
                             "--set", f"out_dir={tmp_path / 'every3'}", "--set", f"eval_tasks={tasks}")
    assert code == 0, err
    evals = [json.loads(line) for line in (tmp_path / "every3" / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["event"] == "eval"]
    assert [(e["step"], "task/mc/acc" in e) for e in evals] == [(0, True), (2, False), (4, False), (5, True)]
    bad = json.dumps([f"mc={tmp_path / 'missing.jsonl'}"])
    code, out, err = run_cli(capsys, "train", *small, "--set", f"out_dir={tmp_path / 'run2'}",
                             "--set", f"eval_tasks={bad}")
    assert_one_line_error(code, err, "file not found", "missing.jsonl")
    assert not (tmp_path / "run2").exists()


def test_eval_tasks_under_fsdp_match_one_rank(tmp_path):
    """2 ranks (FSDP2, gloo) run the suite with the same forwards on every rank and get the 1-rank numbers."""
    from engine_helpers import make_synthetic, metrics, run_train

    data = make_synthetic(tmp_path / "synthetic")  # no tokenizer.json: the built-in GPT-2 BPE, hence the vocabulary
    write_jsonl(tmp_path / "mc.jsonl", [{"context": "a truth universally", "choices": ["single men", "a truth"],
                                         "label": i % 2} for i in range(4)])
    (tmp_path / "t.txt").write_text("It is a truth universally acknowledged, that a single man " * 3)
    sets = [f'eval_tasks=["mc={tmp_path / "mc.jsonl"}", "t:text={tmp_path / "t.txt"}"]', "max_steps=4",
            "eval_interval=2", "save_interval=0", "model.vocab_size=50304"]
    run_train(1, data, tmp_path / "r1", "micro_batch_size=8", *sets)
    run_train(2, data, tmp_path / "r2", "parallel.strategy=fsdp", *sets)
    one, two = ([e for e in metrics(tmp_path / r) if e["event"] == "eval"] for r in ("r1", "r2"))
    assert [e["step"] for e in one] == [e["step"] for e in two] == [0, 2, 4]
    for a, b in zip(one, two):
        assert a["task/mc/acc_norm"] == b["task/mc/acc_norm"]
        assert a["text/t/bpb"] == pytest.approx(b["text/t/bpb"], rel=1e-4)


def test_context_defaults_to_the_trained_sequence_length(capsys, ckpt, tmp_path):
    """A model trained on 32-token windows is scored in 32-token windows (it never learnt the positions beyond):
    the context comes from the checkpoint's train_state.json; --context overrides it; a model file without a
    training state uses its max_seq_len."""
    import shutil

    trained = tmp_path / "trained"
    shutil.copytree(ckpt, trained)
    (trained / "train_state.json").write_text(json.dumps({"seq_len": 32}))
    (tmp_path / "t.txt").write_text(TEXT * 3, encoding="utf-8")
    results = {}
    for name, path, extra in (("trained", trained, []), ("plain", ckpt, []), ("plain-32", ckpt, ["--context", 32]),
                              ("trained-64", trained, ["--context", 64])):
        code, out, err = run_cli(capsys, "eval", "--checkpoint", path, "--text", tmp_path / "t.txt", *extra, "--out",
                                 tmp_path / f"{name}.json")
        assert code == 0, err
        results[name] = json.loads((tmp_path / f"{name}.json").read_text())
    assert [results[n]["context"] for n in ("trained", "plain", "plain-32", "trained-64")] == [32, 64, 32, 64]
    assert results["trained"]["stride"] == 16
    assert results["trained"]["nats"] == pytest.approx(results["plain-32"]["nats"], rel=1e-12)
    assert results["plain"]["nats"] == pytest.approx(results["trained-64"]["nats"], rel=1e-12)
    assert results["plain"]["nats"] != pytest.approx(results["trained"]["nats"], rel=1e-6)  # the window matters
    code, out, err = run_cli(capsys, "eval", "--checkpoint", ckpt, "--text", tmp_path / "t.txt", "--context", 65)
    assert_one_line_error(code, err, "--context must be between 2 and the model's max_seq_len (64), got 65")


def test_out_is_never_an_input_or_inside_one(capsys, ckpt, tmp_path, gutenberg_dir):
    """Issue 21 item 7: `--out CKPT/config.json --overwrite` replaced the checkpoint's own config.json."""
    write_jsonl(tmp_path / "mc.jsonl", mc_rows(3))
    (tmp_path / "t.txt").write_text(TEXT, encoding="utf-8")
    inputs = {"ckpt": snapshot(ckpt), "data": snapshot(gutenberg_dir), "mc": (tmp_path / "mc.jsonl").read_bytes(),
              "t": (tmp_path / "t.txt").read_bytes()}
    for args, out, rel, inp in (
        (["--text", tmp_path / "t.txt"], ckpt / "config.json", "is inside", ckpt),
        (["--text", tmp_path / "t.txt"], ckpt, "is", ckpt),
        (["--data", gutenberg_dir], gutenberg_dir / "index.json", "is inside", gutenberg_dir),
        (["--tasks", f"mc={tmp_path / 'mc.jsonl'}"], tmp_path / "mc.jsonl", "is", tmp_path / "mc.jsonl"),
        (["--text", tmp_path / "t.txt"], tmp_path / "t.txt", "is", tmp_path / "t.txt"),
    ):
        code, stdout, err = run_cli(capsys, "eval", "--checkpoint", ckpt, *args, "--out", out, "--overwrite")
        assert_one_line_error(code, err, f"--out {out} {rel} the input {inp}", "refused even with --overwrite")
        assert stdout == ""  # refused before anything was evaluated
    assert inputs == {"ckpt": snapshot(ckpt), "data": snapshot(gutenberg_dir),
                      "mc": (tmp_path / "mc.jsonl").read_bytes(), "t": (tmp_path / "t.txt").read_bytes()}
    code, _, err = run_cli(capsys, "eval", "make-cloze", "--data", gutenberg_dir, "--out",
                           gutenberg_dir / "index.json", "--overwrite")
    assert_one_line_error(code, err, f"--out {gutenberg_dir / 'index.json'} is inside the input {gutenberg_dir}")
    assert snapshot(gutenberg_dir) == inputs["data"]


def test_read_only_out_is_refused_before_the_evaluation(capsys, ckpt, tmp_path):
    """Issue 21 item 14: eval found a read-only --out only after the whole evaluation."""
    (tmp_path / "t.txt").write_text(TEXT, encoding="utf-8")
    with read_only(tmp_path / "results") as folder:
        for out in (folder / "r.json", folder / "new" / "r.json"):
            code, stdout, err = run_cli(capsys, "eval", "--checkpoint", ckpt, "--text", tmp_path / "t.txt",
                                        "--out", out)
            assert_one_line_error(code, err, f"cannot write --out {out}: {folder} is not a writable folder")
            assert stdout == ""  # no table: nothing was evaluated
        assert list(folder.iterdir()) == []
