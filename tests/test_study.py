"""`phiforge study` with seeds (issue 15): the statistics (mean, sd, paired and unpaired differences, the two
standard error rule), the report and results.json from runs on disk, the cloze column wiring, the README's
results block, and the committed README against the committed results.json. No training here: the runs are
written by the test (the end-to-end study is tests/test_litgpt_pipeline.py::test_study_seeds_...)."""

from __future__ import annotations

import json
import math
import re
import statistics
from pathlib import Path

import pytest
import torch
import yaml

from conftest import assert_one_line_error, run_cli
from phiforge.model import Phi2, Phi2Config
from phiforge.model_files import save_checkpoint
from phiforge.study import stats
from phiforge.study.report import README_END, README_START

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------
# Statistics


def test_describe_uses_n_minus_1_and_skips_missing():
    d = stats.describe([1.0, None, 2.0, 4.0])
    assert d["n"] == 3 and d["mean"] == pytest.approx(7 / 3)
    assert d["sd"] == pytest.approx(math.sqrt(((1 - 7 / 3) ** 2 + (2 - 7 / 3) ** 2 + (4 - 7 / 3) ** 2) / 2))
    assert stats.describe([5.0]) == {"mean": 5.0, "sd": None, "n": 1}
    assert stats.describe([None]) is None


def test_paired_difference_and_two_standard_errors():
    ref = {0: 3.00, 1: 3.10, 2: 2.90}
    # the same small improvement on every seed: far beyond 2 SE although the seeds spread much more
    better = {0: 2.98, 1: 3.07, 2: 2.89}
    p = stats.paired(ref, better)
    diffs = [-0.02, -0.03, -0.01]
    se = statistics.stdev(diffs) / math.sqrt(3)
    assert p["n"] == 3 and p["mean_diff"] == pytest.approx(-0.02) and p["se"] == pytest.approx(se)
    assert p["exceeds_2se"] is True
    u = stats.unpaired(ref, better)  # ignoring the pairing the same numbers are noise
    assert u["diff"] == pytest.approx(statistics.mean(better.values()) - statistics.mean(ref.values()))
    assert u["se"] == pytest.approx(math.sqrt(statistics.variance(ref.values()) / 3
                                              + statistics.variance(better.values()) / 3))
    assert u["exceeds_2se"] is False
    noisy = {0: 3.03, 1: 3.09, 2: 2.94}  # diffs +0.03, -0.01, +0.04: mean 1.3 SE from 0, inside 2 SE
    p = stats.paired(ref, noisy)
    assert 1 < p["mean_diff"] / p["se"] < 2 and p["exceeds_2se"] is False
    one = stats.paired({0: 1.0}, {0: 2.0, 1: 5.0})  # one common seed: no spread, no verdict
    assert one["n"] == 1 and one["se"] is None and one["exceeds_2se"] is None


def test_compare_rows_per_route_and_metric():
    per_seed = {"ref": {"val_bpb": {0: 2.0, 1: 2.1}, "cloze_acc": {0: None, 1: None}},
                "moe": {"val_bpb": {0: 1.9, 1: 2.05}, "cloze_acc": {0: None, 1: None}}}
    rows = stats.compare(per_seed, "ref", ["val_bpb", "cloze_acc"])
    assert [(r["route"], r["metric"]) for r in rows] == [("moe", "val_bpb")]  # no cloze numbers: no row
    assert rows[0]["mean_diff"] == pytest.approx(-0.075)


# ---------------------------------------------------------------------------------------------
# The report from runs on disk


SEEDS = [0, 1, 2]
# route -> per-seed (val_bpb, cloze_acc, steady tokens/s): moe is better on every seed, wide only on average
NUMBERS = {"dense": [(2.10, 0.20, 1000.0), (2.14, 0.22, 1010.0), (2.06, 0.21, 990.0)],
           "moe": [(2.08, 0.23, 900.0), (2.11, 0.24, 905.0), (2.05, 0.22, 880.0)],
           "wide": [(2.15, 0.19, 700.0), (2.00, 0.25, 720.0), (2.09, 0.20, 710.0)]}


def _fake_run(run: Path, bpb: float, tps: float, acc: float = 0.0) -> None:
    torch.manual_seed(0)
    save_checkpoint(Phi2(Phi2Config.from_preset("tiny", vocab_size=50304)), run / "checkpoints" / "step-00000020")
    (run / "latest").write_text("step-00000020\n")
    events = [{"event": "eval", "step": 0, "tokens": 0, "val_loss": 10.0, "val_bpb": 3.5, "elapsed_s": 0.0}]
    events += [{"event": "train", "step": s, "tokens": 64 * s, "loss": 5.0, "elapsed_s": s * 64 / tps,
                "tokens_per_s": tps} for s in (5, 10, 15, 20)]
    events += [{"event": "eval", "step": 20, "tokens": 1280, "val_loss": bpb * 2.5, "val_bpb": bpb,
                "task/gutenberg-cloze/acc": acc, "elapsed_s": 20 * 64 / tps}]  # eval_tasks' curve point
    (run / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))


def fake_study(tmp_path: Path, cloze: bool = True) -> Path:
    """A study config whose runs 'finished': checkpoints, metrics and study-state.json records with eval dicts."""
    work = tmp_path / "work"
    state = {"version": 2, "runs": {}, "data": {"tokens_per_epoch": 12800, "train_split_tokens": 12900,
                                                "tokens_per_run": 1280, "epochs": 0.1}}
    for route, rows in NUMBERS.items():
        for seed, (bpb, acc, tps) in zip(SEEDS, rows):
            _fake_run(work / "runs" / route / f"seed-{seed}", bpb, tps, acc)
            state["runs"][f"{route}/seed-{seed}"] = {
                "wall_s": 30.0 + seed, "eval_s": 2.0, "peak_rss_gib": 1.0, "loadavg_1min": [1.0, 1.5], "seed": seed,
                "init": f"dense init, seed {seed}",
                "eval": {"val_loss": bpb * 2.5, "val_bpb": bpb, **({"cloze_acc": acc} if cloze else {})}}
    (work / "study-state.json").write_text(json.dumps(state))
    _fake_run(work / "runs" / "dense" / "seed-3", 1.0, 1000.0)  # interrupted: not in study-state.json, left out
    cfg = {"name": "fake", "seeds": [*SEEDS, 3], "work_dir": str(work), "report_dir": str(tmp_path / "report"),
           "routes": [{"name": n, "label": f"{n} route"} for n in NUMBERS], "samples": {"max_new_tokens": 2},
           "larger_study": "studies/phi2-redpajama-8xh100.yaml",
           "train": {"model": {"preset": "tiny"}, "data": {"seq_len": 32}, "micro_batch_size": 2, "max_steps": 20}}
    path = tmp_path / "fake.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def readme_table(text: str) -> dict[str, dict[str, str]]:
    """The results block's table of a README: route label -> {column: cell}."""
    block = text.split(README_START, 1)[1].split(README_END, 1)[0]
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in block.splitlines()
            if line.startswith("|") and not line.startswith("|---")]
    head = rows[0]
    return {r[0]: dict(zip(head[1:], r[1:])) for r in rows[1:]}


def mean_sd(cell: str) -> tuple[float, float | None] | None:
    if cell == "-":
        return None
    m = re.fullmatch(r"([\d.,]+)(?: ± ([\d.,]+))?", cell)
    assert m, cell
    return float(m.group(1).replace(",", "")), float(m.group(2).replace(",", "")) if m.group(2) else None


def test_report_aggregates_significance_and_readme(tmp_path, capsys):
    config = fake_study(tmp_path)
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\n## Results\n\n{README_START}\nold\n{README_END}\n\nrest stays\n")
    code, out, err = run_cli(capsys, "study", "--config", config, "--report-only", "--readme", readme)
    assert code == 0, err
    res = json.loads((tmp_path / "report" / "results.json").read_text())
    for route, rows in NUMBERS.items():
        agg = res["routes"][route]["aggregates"]
        for i, key in enumerate(("val_bpb", "cloze_acc", "steady_tokens_per_s")):
            vals = [r[i] for r in rows]
            assert agg[key]["n"] == 3 and agg[key]["mean"] == pytest.approx(statistics.mean(vals))
            assert agg[key]["sd"] == pytest.approx(statistics.stdev(vals))
        assert [res["routes"][route]["seeds"][str(s)]["val_bpb"] for s in SEEDS] == [r[0] for r in rows]
        assert set(res["routes"][route]["seeds"]) == {"0", "1", "2"}
        # the curve over tokens: cloze accuracy at the one step every seed scored it (eval_tasks while training)
        [point] = res["routes"][route]["cloze_band"]
        accs = [r[1] for r in rows]
        assert point["step"] == 20 and point["mean"] == pytest.approx(statistics.mean(accs))
        assert point["sd"] == pytest.approx(statistics.stdev(accs))
    sig = {(r["route"], r["metric"]): r for r in res["significance"]}
    for route in ("moe", "wide"):
        diffs = [o[0] - d[0] for o, d in zip(NUMBERS[route], NUMBERS["dense"])]
        se = statistics.stdev(diffs) / math.sqrt(3)
        row = sig[(route, "val_bpb")]
        assert row["mean_diff"] == pytest.approx(statistics.mean(diffs)) and row["se"] == pytest.approx(se)
        assert row["exceeds_2se"] == (abs(statistics.mean(diffs)) > 2 * se)
    assert sig[("moe", "val_bpb")]["exceeds_2se"] and not sig[("wide", "val_bpb")]["exceeds_2se"]
    assert ("moe", "cloze_acc") in sig
    md = (tmp_path / "report" / "report.md").read_text()
    assert "moe route: val bpb 0.0200 lower than dense route" in md and "more than two standard errors" in md
    for png in ("val_bpb_vs_tokens.png", "cloze_acc_vs_tokens.png", "tokens_per_s.png", "cloze_acc.png",
                "peak_memory.png"):
        assert (tmp_path / "report" / png).stat().st_size > 1000 and f"({png})" in md
    text = readme.read_text()
    assert text.startswith("# x\n\n## Results\n\n") and text.endswith(f"{README_END}\n\nrest stays\n")
    table = readme_table(text)
    assert mean_sd(table["moe route"]["cloze acc"]) == pytest.approx((0.23, 0.01))
    assert "moe route (-0.0200) differs from dense route by more than two standard errors" in text
    assert "(../report/report.md)" not in text and "(report/report.md)" in text  # relative to the README


def test_missing_cloze_shows_as_dash_and_no_readme_block_is_one_line_error(tmp_path, capsys):
    config = fake_study(tmp_path, cloze=False)
    readme = tmp_path / "README.md"
    readme.write_text("# no block\n")
    code, _, err = run_cli(capsys, "study", "--config", config, "--report-only", "--readme", readme)
    assert_one_line_error(code, err, "README.md has no results block", "study-results:start")
    assert not (tmp_path / "report").exists() and readme.read_text() == "# no block\n"  # nothing written
    assert run_cli(capsys, "study", "--config", config, "--report-only")[0] == 0
    res = json.loads((tmp_path / "report" / "results.json").read_text())
    assert res["routes"]["dense"]["aggregates"]["cloze_acc"] is None
    section = (tmp_path / "report" / "readme-section.md").read_text()
    assert all(row["cloze acc"] == "-" for row in readme_table(f"{README_START}\n{section}{README_END}").values())
    assert "gutenberg-cloze accuracy is not measured yet" in section


@pytest.mark.parametrize("sets, needle", [
    (["seeds=[1, 1]"], "seeds must be a non-empty list of distinct"),
    (["seeds=[]"], "seeds must be"),
    (["train.seed=3"], "train.seed is set by the study's `seeds`"),
    (["train.data.seed=3"], "train.data.seed is set by the study's `seeds`"),
])
def test_seed_config_errors(tmp_path, capsys, sets, needle):
    config = fake_study(tmp_path)
    code, _, err = run_cli(capsys, "study", "--config", config, "--report-only", *sum((["--set", s] for s in sets), []))
    assert_one_line_error(code, err, needle)


def test_committed_readme_matches_committed_results():
    """README.md's Results block shows the numbers of docs/results/cpu-gutenberg/results.json (so they never drift)."""
    res = json.loads((ROOT / "docs" / "results" / "cpu-gutenberg" / "results.json").read_text())
    text = (ROOT / "README.md").read_text()
    table = readme_table(text)
    labels = {r["label"]: r for r in res["routes"].values()}
    assert set(table) == set(labels) and len(table) >= 3
    for label, row in table.items():
        agg = labels[label]["aggregates"]
        assert int(row["seeds"]) == len(labels[label]["seeds"])
        for col, key, places in (("val bpb", "val_bpb", 4), ("cloze acc", "cloze_acc", 3),
                                 ("tokens/s", "steady_tokens_per_s", 0)):
            shown = mean_sd(row[col])
            if agg[key] is None:
                assert shown is None, (label, col)
                continue
            assert shown[0] == pytest.approx(agg[key]["mean"], abs=0.51 * 10 ** -places), (label, col)
            assert shown[1] == pytest.approx(agg[key]["sd"], abs=0.51 * 10 ** -places), (label, col)
    links = re.findall(r"\]\(([^)]+)\)", text.split(README_START, 1)[1].split(README_END, 1)[0])
    assert links and all((ROOT / link).exists() for link in links), links


@pytest.mark.parametrize("config", ["studies/cpu-gutenberg.yaml", "studies/phi2-redpajama-8xh100.yaml"])
def test_committed_studies_compare_moe_placements_at_equal_active_parameters(config):
    """The committed studies' three MoE placements each have the dense reference's active parameters per token
    (within 1%: the router, after_mlp's LayerNorm and the k active experts' output biases) and more in total."""
    from phiforge.study.config import load_study, route_train_dict
    from phiforge.study.results import param_counts
    from phiforge.train.config import model_config_from_spec

    study = load_study(ROOT / config)
    counts = {r.name: param_counts(model_config_from_spec(route_train_dict(study, r)["model"])) for r in study.routes}
    total_ref, active_ref = counts[study.reference_route.name]
    positions = set()
    for r in study.routes:
        spec = route_train_dict(study, r)["model"]
        if "moe" not in spec:
            assert counts[r.name] == (total_ref, active_ref), r.name  # dense, Muon and LitGPT: one model
            continue
        positions.add(spec["moe"].get("position", "after_mlp"))
        total, active = counts[r.name]
        assert abs(active - active_ref) <= 0.01 * active_ref and total > 1.05 * total_ref, r.name
    assert positions == {"after_mlp", "parallel", "replace_mlp"} and len(study.seeds) >= 3


def test_cloze_every_gives_phiforge_routes_the_cloze_curve(tmp_path, gutenberg_dir):
    """cloze_every: each phiforge route scores the study's gutenberg-cloze items while training (eval_tasks at the
    validations on a multiple of cloze_every); a LitGPT route cannot and gets no such key."""
    from phiforge.config import from_dict
    from phiforge.study.config import StudyConfig, cloze_path, route_train_dict
    from phiforge.study.runner import plan_runs

    study = from_dict(StudyConfig, {
        "name": "c", "seeds": [0], "cloze_every": 50, "cloze_limit": 40, "same_init": False,
        "train": {"model": {"preset": "tiny"}, "data": {"seq_len": 32}, "max_steps": 100},
        "routes": [{"name": "dense"}, {"name": "lit", "trainer": "litgpt"}]})
    trains = {r.name: route_train_dict(study, r) for r in study.routes}
    runs = {run.route.name: run for run in plan_runs(study, trains, ["dense", "lit"], tmp_path, gutenberg_dir)}
    assert runs["dense"].cfg["eval_tasks"] == [{"name": "gutenberg-cloze", "path": str(cloze_path(tmp_path)),
                                                "format": "cloze", "limit": 40}]
    assert runs["dense"].cfg["eval_tasks_interval"] == 50
    assert "eval_tasks" not in json.dumps(runs["lit"].cfg)
