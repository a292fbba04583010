"""The LitGPT route end to end: `phiforge litgpt prepare` gives LitGPT phiforge's exact batches,
`phiforge litgpt pretrain` trains and reports in phiforge's run format, and a RedPajama-format fixture flows
through both trainers (and `phiforge study` with its report).

These need the optional extra (litgpt, litdata); CI installs it, so they run there. A LitGPT run spends most of
its time in torch.compile (LitGPT always compiles), about a minute on 2 CPU cores.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import litdata  # noqa: F401  the litgpt extra, which `make test` installs: a broken install fails here
import litgpt  # noqa: F401
import pytest
import torch
import yaml

from conftest import assert_one_line_error, run_cli

pytestmark = pytest.mark.slow  # multi-process or end-to-end: left out of the quick subset (-m "not slow")

T, MB = 32, 4
TINY = {"preset": "tiny", "vocab_size": 50304, "max_seq_len": 64}  # GPT-2 vocabulary rows, 64-token context


def events(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def lit_dir(tmp_path_factory):
    """A RedPajama-format fixture (tests/data_fixtures.py: bundled books, stdlib sources, pydoc topics) through
    `phiforge litgpt prepare --data redpajama`, which runs phiforge's own `prepare redpajama` into OUT/phiforge."""
    from phiforge.cli import main
    from data_fixtures import make_redpajama

    root = tmp_path_factory.mktemp("rp")
    make_redpajama(root / "raw", layout="1T", max_bytes=150_000, sources=("book", "github", "wikipedia", "arxiv"))
    out = root / "lit"
    assert main(["litgpt", "prepare", "--data", "redpajama", "--out", str(out), "--seq-len", str(T),
                 "--micro-batch-size", str(MB), "--epochs", "2",
                 "--prepare-args", f"--input {root / 'raw'} --val-fraction 0.1 --workers 1 "
                 "--weights book=40,github=30,wikipedia=20,arxiv=10"]) == 0
    return out


@pytest.fixture(scope="module")
def redpajama_dir(lit_dir):
    """The phiforge token dataset the LitGPT data was cut from."""
    return lit_dir / "phiforge"


def test_litgpt_reads_phiforges_batches(redpajama_dir, lit_dir):
    from litgpt.data import LitData

    from phiforge.data.loader import PackedLoader, eval_batches
    from phiforge.litgpt.datamodule import PhiforgeLitData

    m = json.loads((lit_dir / "litgpt-data.json").read_text())
    assert m["seq_len"] == T and m["splits"]["train"]["epochs"] == 2
    assert m["prepared"]["corpus"] == "redpajama"
    for workers in (0, 1):  # 1: `litgpt pretrain`'s default, a worker building batches ahead as phiforge's thread
        dm = PhiforgeLitData(data_path=lit_dir, split_names=("train", "val"), num_workers=workers)
        dm.connect(batch_size=MB, max_seq_length=T)
        dm.setup()
        loader = PackedLoader(redpajama_dir, "train", T, MB, seed=0)
        n = loader.batches_per_epoch + 3  # into the second epoch
        for i, batch in enumerate(itertools.islice(dm.train_dataloader(), n)):
            x, y = loader.next_batch()
            assert torch.equal(batch[:, :-1].long(), x) and torch.equal(batch[:, 1:].long(), y), (workers, i)
        assert i == n - 1 and loader.epoch == 1
    val = eval_batches(redpajama_dir, "val", T, MB, 1000)
    got = list(dm.val_dataloader())
    assert len(got) == len(val)
    for (x, y), batch in zip(val, got):
        assert torch.equal(batch[:, :-1].long(), x) and torch.equal(batch[:, 1:].long(), y)
    stock = LitData(data_path=lit_dir, split_names=("train", "val"), num_workers=0)  # stock LitData reads it too
    stock.connect(batch_size=MB, max_seq_length=T)
    stock.setup()
    assert next(iter(stock.train_dataloader())).shape == (MB, T + 1)


def test_litgpt_reads_phiforges_mixture_batches(tmp_path, redpajama_dir):
    """With a source mixture (phiforge's loader samples sources by weight), LitGPT still gets phiforge's batches."""
    MIX = "github=3,wikipedia=2,arxiv=1"
    from phiforge.cli import main
    from phiforge.data.loader import PackedLoader, eval_batches
    from phiforge.litgpt.datamodule import PhiforgeLitData

    out = tmp_path / "mix"
    assert main(["litgpt", "prepare", "--from-dataset", str(redpajama_dir), "--out", str(out), "--seq-len", str(T),
                 "--micro-batch-size", str(MB), "--seed", "3", "--mixture", MIX, "--eval-batches", "5"]) == 0
    dm = PhiforgeLitData(data_path=out, split_names=("train", "val"), num_workers=0)
    dm.connect(batch_size=MB, max_seq_length=T)
    dm.setup()
    mix = {"github": 3.0, "wikipedia": 2.0, "arxiv": 1.0}  # the validation split of the fixture has no book
    loader = PackedLoader(redpajama_dir, "train", T, MB, seed=3, mixture=mix)
    for batch in itertools.islice(dm.train_dataloader(), 50):
        x, y = loader.next_batch()
        assert torch.equal(batch[:, :-1].long(), x) and torch.equal(batch[:, 1:].long(), y)
    val = eval_batches(redpajama_dir, "val", T, MB, 5, mixture=mix)
    got = list(dm.val_dataloader())
    assert len(got) == len(val) == 5
    assert all(torch.equal(b[:, :-1].long(), x) for (x, _), b in zip(val, got))


def test_prepare_refuses_what_it_cannot_do(capsys, tmp_path, redpajama_dir):
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    code, _, err = run_cli(capsys, "litgpt", "prepare", "--from-dataset", redpajama_dir, "--out", tmp_path / "busy",
                           "--seq-len", 32)
    assert_one_line_error(code, err, "not empty")
    code, _, err = run_cli(capsys, "litgpt", "prepare", "--from-dataset", redpajama_dir, "--data", "gutenberg",
                           "--out", tmp_path / "x", "--seq-len", 32)
    assert_one_line_error(code, err, "prepared from 'redpajama'")
    code, _, err = run_cli(capsys, "litgpt", "prepare", "--out", tmp_path / "x", "--seq-len", 32)
    assert_one_line_error(code, err, "--from-dataset")
    code, _, err = run_cli(capsys, "litgpt", "prepare", "--from-dataset", tmp_path / "nope", "--out", tmp_path / "x",
                           "--seq-len", 32)
    assert_one_line_error(code, err, "not found")


def test_litgpt_pretrain_end_to_end(capsys, tmp_path, redpajama_dir, lit_dir):
    """The CI run of `phiforge litgpt pretrain`: tiny Phi-2-family model, phiforge init, RedPajama fixture."""
    from phiforge.model_files import load_checkpoint, resolve_checkpoint, save_checkpoint
    from phiforge.data.loader import eval_batches
    from phiforge.model import Phi2, Phi2Config
    from phiforge.train.validation import evaluate

    torch.manual_seed(0)
    init = Phi2(Phi2Config.from_preset(TINY["preset"], **{k: v for k, v in TINY.items() if k != "preset"}))
    save_checkpoint(init, tmp_path / "init", tokenizer_dir=redpajama_dir)
    cfg = {"model": TINY, "init_from": str(tmp_path / "init"), "data": {"dir": str(lit_dir), "seq_len": T},
           "optim": {"lr": 3e-3, "warmup_steps": 2, "weight_decay": 0.0}, "micro_batch_size": MB, "max_steps": 12,
           "eval_interval": 6, "eval_batches": 4, "log_interval": 2, "out_dir": str(tmp_path / "run"), "echo": False}
    (tmp_path / "lit.yaml").write_text(yaml.safe_dump(cfg))
    code, out, err = run_cli(capsys, "litgpt", "pretrain", "--config", tmp_path / "lit.yaml")
    assert code == 0, err + out
    assert out.startswith("done: 12 steps, 1,536 tokens")
    run = tmp_path / "run"
    ev = events(run)
    assert ev[0]["event"] == "start" and ev[0]["trainer"] == "litgpt" and ev[-1]["event"] == "end"
    trains = [e for e in ev if e["event"] == "train"]
    evals = [e for e in ev if e["event"] == "eval"]
    assert [e["step"] for e in trains] == [2, 4, 6, 8, 10, 12]
    assert [e["step"] for e in evals] == [0, 6, 12]
    assert all(e["tokens"] == e["step"] * MB * T for e in ev if "tokens" in e and e["event"] != "end")
    assert all(e["tokens_per_s"] > 0 and e["loss"] > 0 for e in trains)
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 0.3  # it learns
    # same weights, same validation windows: LitGPT's initial validation is phiforge's (printed to 3 decimals)
    ours = evaluate(init.eval(), eval_batches(redpajama_dir, "val", T, MB, 4))["val_loss"]
    assert abs(evals[0]["val_loss"] - ours) <= 6e-4
    # the result is a phiforge checkpoint too (converted from LitGPT's lit_model.pth)
    assert (run / "latest").read_text().strip() == "step-00000012"
    assert (run / "litgpt" / "final" / "lit_model.pth").is_file()
    final = load_checkpoint(resolve_checkpoint(run))
    assert final.cfg.to_dict() == init.cfg.to_dict()
    vl = evaluate(final, eval_batches(redpajama_dir, "val", T, MB, 4))["val_loss"]
    assert vl == pytest.approx(evals[-1]["val_loss"], rel=1e-4)
    code, out, err = run_cli(capsys, "generate", "--checkpoint", run, "--prompt", "def main", "--max-new-tokens", "5",
                             "--temperature", "0")
    assert code == 0 and out.startswith("def main"), err


def test_pretrain_checks_before_running(capsys, tmp_path, lit_dir):
    base = ["litgpt", "pretrain", "--set", f"data.dir={lit_dir}", "--set", "model.preset=tiny",
            "--set", f"out_dir={tmp_path / 'r'}"]
    code, _, err = run_cli(capsys, *base, "--set", "data.seq_len=64", "--set", "model.max_seq_len=64",
                           "--set", "model.vocab_size=50304")
    assert_one_line_error(code, err, "seq_len 32", "--seq-len 64")
    code, _, err = run_cli(capsys, *base, "--set", f"data.seq_len={T}", "--set", "model.moe.num_experts=4")
    assert_one_line_error(code, err, "moe", "LitGPT")
    code, _, err = run_cli(capsys, *base, "--set", "optim.schedule=wsd")
    assert_one_line_error(code, err, "cosine")


def _study_cli(capsys, config: Path, *extra) -> tuple[str, dict]:
    code, out, err = run_cli(capsys, "study", "--config", config, *extra)
    assert code == 0, err + out
    return out, json.loads((config.parent / "report" / "results.json").read_text())


def test_study_seeds_on_redpajama_fixture(capsys, tmp_path, redpajama_dir):
    """dense, MoE parallel and LitGPT, 2 seeds: per seed one init and one data order for every route, per-seed
    numbers and aggregates, the paired comparison, and a rerun that skips what finished."""
    import statistics

    study = {
        "name": "fixture", "title": "fixture study", "data": {"dataset": str(redpajama_dir)}, "seeds": [3, 5],
        "work_dir": str(tmp_path / "work"), "report_dir": str(tmp_path / "report"),
        "train": {"model": TINY, "data": {"seq_len": T}, "micro_batch_size": MB, "max_steps": 8,
                  "optim": {"lr": 3e-3, "warmup_steps": 2, "weight_decay": 0.0}, "eval_interval": 4,
                  "eval_batches": 2, "log_interval": 2},
        "routes": [{"name": "dense", "trainer": "phiforge"},
                   {"name": "moe", "trainer": "phiforge", "set": ["model.moe={num_experts: 4, top_k: 2, "
                                                                   "position: parallel}"]},
                   {"name": "litgpt", "trainer": "litgpt"}],
        "samples": {"prompts": ["import os"], "max_new_tokens": 6},
    }
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(study))
    out, res = _study_cli(capsys, tmp_path / "study.yaml")
    assert "[6/6] litgpt/seed-5" in out and "ETA" in out
    routes = res["routes"]
    assert set(routes) == {"dense", "moe", "litgpt"} and all(set(r["seeds"]) == {"3", "5"} for r in routes.values())
    starts = {s: [r["seeds"][s]["val_loss_start"] for r in routes.values()] for s in ("3", "5")}
    for s, vals in starts.items():  # one init per seed: step 0 is the same function (zero-output experts)
        assert max(vals) - min(vals) < 1e-3, (s, vals)
    assert abs(starts["3"][0] - starts["5"][0]) > 1e-4  # and the seeds differ
    from phiforge.model_files import load_checkpoint, resolve_checkpoint
    from phiforge.evaluation import score_dataset

    for name in ("dense", "moe"):  # evaluate_route: the trainer's last validation on the same windows, and
        for s, rec in routes[name]["seeds"].items():  # phiforge eval's bpb of the whole validation split
            last = rec["curve"][-1]
            assert rec["tokens"] == 8 * MB * T and rec["eval"]["val_bpb_windows"] == pytest.approx(last["val_bpb"], rel=1e-5)
            model = load_checkpoint(resolve_checkpoint(tmp_path / "work" / "runs" / name / f"seed-{s}"))
            model.eval_context = T
            assert rec["val_bpb"] == pytest.approx(score_dataset(model, redpajama_dir, "val").bpb, rel=1e-6)
            assert 0.0 <= rec["cloze_acc"] <= 1.0
    for name, r in routes.items():
        vals = [r["seeds"][s]["val_bpb"] for s in ("3", "5")]
        assert r["aggregates"]["val_bpb"]["mean"] == pytest.approx(statistics.mean(vals))
        assert r["aggregates"]["val_bpb"]["sd"] == pytest.approx(statistics.stdev(vals))
        accs = [r["seeds"][s]["cloze_acc"] for s in ("3", "5")]
        assert r["aggregates"]["cloze_acc"]["mean"] == pytest.approx(statistics.mean(accs))
    row = next(x for x in res["significance"] if x["route"] == "moe" and x["metric"] == "val_bpb")
    diffs = [routes["moe"]["seeds"][s]["val_bpb"] - routes["dense"]["seeds"][s]["val_bpb"] for s in ("3", "5")]
    assert row["mean_diff"] == pytest.approx(statistics.mean(diffs))
    assert row["exceeds_2se"] == (abs(statistics.mean(diffs)) > 2 * statistics.stdev(diffs) / 2 ** 0.5)
    manifests = [json.loads((tmp_path / "work" / "data" / "litdata" / f"seed-{s}" / "litgpt-data.json").read_text())
                 for s in (3, 5)]
    assert [m["seed"] for m in manifests] == [3, 5]  # LitGPT reads each seed's phiforge order
    report = (tmp_path / "report" / "report.md").read_text()
    assert "| dense | 3 |" in report and "import os" in report and "Which differences are real" in report
    assert sorted(p.name for p in (tmp_path / "report" / "metrics" / "moe").iterdir()) == ["seed-3.jsonl",
                                                                                         "seed-5.jsonl"]

    # an interrupted study: the record of dense/seed-5 is gone, so only that run trains again
    state_path = tmp_path / "work" / "study-state.json"
    state = json.loads(state_path.read_text())
    del state["runs"]["dense/seed-5"]
    state_path.write_text(json.dumps(state))
    kept = (tmp_path / "work" / "runs" / "moe" / "seed-5" / "metrics.jsonl").stat().st_mtime_ns
    out, res2 = _study_cli(capsys, tmp_path / "study.yaml")
    assert "6 runs (3 route(s) x 2 seed(s)), 1 to run" in out and out.count("skipped") == 5
    assert (tmp_path / "work" / "runs" / "moe" / "seed-5" / "metrics.jsonl").stat().st_mtime_ns == kept
    assert res2["routes"]["dense"]["seeds"]["5"]["val_bpb"] == routes["dense"]["seeds"]["5"]["val_bpb"]  # exact


def test_study_checks_compare_like_with_like():
    """LitGPT is checked on loss gap and speed; an MoE variant with the dense model's active parameters on loss."""
    from types import SimpleNamespace

    from phiforge.study.results import _checks

    def route(trainer, loss, tps, params=100, active=100, tokens=1000):
        return {"trainer": trainer, "val_loss": loss, "steady_tokens_per_s": tps, "params": params,
                "active_params": active, "tokens": tokens}

    study = SimpleNamespace(reference_route=SimpleNamespace(name="dense"), max_val_gap=0.02)
    routes = {"dense": route("phiforge", 5.0, 110), "moe": route("phiforge", 4.9, 90, params=150, active=101),
              "wide": route("phiforge", 4.0, 50, params=150, active=150), "litgpt": route("litgpt", 5.2, 100)}
    checks = {c["check"]: c["pass"] for c in _checks(study, routes)}
    assert checks == {"final val loss: moe <= dense at equal active parameters and tokens": True,
                      "final val loss: dense vs litgpt within 2% at equal tokens": False,  # 4% apart
                      "tokens/s: dense >= litgpt": True}
    routes["moe"]["val_loss"], routes["litgpt"]["val_loss"], routes["litgpt"]["steady_tokens_per_s"] = 5.01, 5.05, 120
    assert [c["pass"] for c in _checks(study, routes)] == [False, True, False]
