"""`phiforge study`: runs every (route, seed) of a study that has not finished yet, each in its own process,
then writes the report (the steps: phiforge.study)."""

from __future__ import annotations

import hashlib
import json
import math
import os
import shlex
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from phiforge.config import from_dict
from phiforge.errors import PhiforgeError
from phiforge.study.config import (CLOZE_TASK, Route, StudyConfig, check_routes, cloze_path, dense_key, litgpt_dict,
                                   route_train_dict, run_key, seeded, tokens_budget, train_config)

STATE = "study-state.json"
STATE_VERSION = 2


# ---------------------------------------------------------------------------------------------
# Data and initial weights


def _prepare_tokens(study: StudyConfig, work: Path) -> Path:
    from phiforge.data.corpora import load_prepare_config, parse_flags, prepare_corpus

    if study.data.dataset:
        return Path(study.data.dataset)
    out = work / "data" / "phiforge"
    stamp = work / "data" / "phiforge-prepare.json"
    want = {"corpus": study.data.corpus, "args": study.data.prepare_args, "tokenizer": study.data.tokenizer}
    if (out / "index.json").is_file() and stamp.is_file() and json.loads(stamp.read_text()) == want:
        print(f"study: reusing {out}", flush=True)
        return out
    flags = {**parse_flags(study.data.corpus, study.data.prepare_args), "out": str(out)}
    if study.data.tokenizer:
        flags["tokenizer_dir"] = str(_train_tokenizer(study, work, flags))
    cfg = load_prepare_config(study.data.corpus, flags=flags)
    print(f"study: phiforge prepare {study.data.corpus} {shlex.join(study.data.prepare_args)} --out {out}",
          flush=True)
    prepare_corpus(cfg, echo=print)
    stamp.write_text(json.dumps(want))
    return out


def _train_tokenizer(study: StudyConfig, work: Path, prepare_flags: dict) -> Path:
    """data.tokenizer: a BPE trained on the books `prepare` will read (its validation books left out)."""
    from phiforge.data.tokenizer_train import load_tokenizer_config, train_tokenizer

    out = work / "data" / "tokenizer"
    keys = {**prepare_flags, **study.data.tokenizer, "out": str(out), "overwrite": True}  # the study owns work/
    cfg = load_tokenizer_config(flags=keys)
    print(f"study: phiforge tokenizer train ({cfg.vocab_size:,} tokens) --out {out}", flush=True)
    train_tokenizer(cfg, echo=print)
    return out


def data_facts(tokens_dir: Path, base, budget: int) -> dict:
    """Sizes the report states: the training split, one epoch of training windows, and the budget in epochs."""
    from phiforge.data.loader import PackedLoader
    from phiforge.data.shards import open_token_dataset

    ds = open_token_dataset(tokens_dir)
    T, mb = base.data.seq_len, base.micro_batch_size
    loader = PackedLoader(tokens_dir, "train", T, mb, seed=0, mixture=base.data.mixture)
    epoch = loader.batches_per_epoch * mb * T
    return {"dataset": str(tokens_dir), "train_split_tokens": ds.split_tokens("train"),
            "val_split_tokens": ds.split_tokens("val"), "tokens_per_epoch": epoch, "tokens_per_run": budget,
            "epochs": budget / epoch}


def _litdata_for_seed(tokens_dir: Path, work: Path, base: dict, facts: dict) -> Path:
    """`phiforge litgpt prepare` for one seed's data order (kept when an earlier run of the study wrote it)."""
    from phiforge.litgpt.data import MANIFEST, prepare_litdata, read_manifest

    t = train_config(base)
    out = work / "data" / "litdata" / f"seed-{t.data.seed}"
    epochs = max(1, math.ceil(facts["tokens_per_run"] / facts["tokens_per_epoch"]))
    want = {"seq_len": t.data.seq_len, "micro_batch_size": t.micro_batch_size, "seed": t.data.seed}
    if (out / MANIFEST).is_file():
        m = read_manifest(out)
        if {k: m.get(k) for k in want} == want and m["splits"]["train"].get("epochs") == epochs \
                and m.get("source_dataset") == str(tokens_dir.resolve()):
            return out
    mixture = t.data.mixture
    m = prepare_litdata(tokens_dir, out, t.data.seq_len, micro_batch_size=t.micro_batch_size, seed=t.data.seed,
                        epochs=epochs, mixture=mixture, eval_batches_n=t.eval_batches if mixture else None)
    print(f"study: litdata {out}: {m['splits']['train']['windows']:,} train windows ({epochs} epoch(s))", flush=True)
    return out


def init_paths(study: StudyConfig, work: Path, trains: dict[str, dict], seed: int,
               names: list[str]) -> dict[str, tuple[Path, Path]]:
    """Route name -> (its dense init, its own init) for one seed. One dense model per dense architecture: `dense`
    for the reference's, `dense-HASH` for another; an MoE route's own init is `ROUTE`, a dense route's is its
    dense init."""
    root = work / "init" / f"seed-{seed}"
    ref_key = dense_key(trains[study.reference_route.name])
    out = {}
    for name in names:
        key = dense_key(trains[name])
        dense = root / ("dense" if key == ref_key else f"dense-{hashlib.sha256(key.encode()).hexdigest()[:8]}")
        out[name] = (dense, root / name if trains[name]["model"].get("moe") else dense)
    return out


def make_inits(study: StudyConfig, work: Path, trains: dict[str, dict], seed: int, names: list[str],
               tokens_dir: Path) -> dict[str, str]:
    """Write the initial weights of one seed for these routes; route name -> how they were made. Dense models are
    drawn with torch.manual_seed(seed); MoE routes get theirs upcycled with zero-output experts."""
    import torch

    from phiforge.model import Phi2
    from phiforge.model_files import save_checkpoint
    from phiforge.upcycle import upcycle

    paths = init_paths(study, work, trains, seed, names)
    drawn = set()
    how = {}
    for name in names:
        dense, own = paths[name]
        t = train_config(seeded(trains[name], seed))
        mcfg = t.model_config()
        if dense not in drawn:
            dense_cfg = t.model_config()
            dense_cfg.moe = None
            torch.manual_seed(seed)
            save_checkpoint(Phi2(dense_cfg), dense, tokenizer_dir=tokens_dir)
            drawn.add(dense)
        how[name] = f"dense init, seed {seed}" + ("" if dense.name == "dense" else f" (d_ff {mcfg.intermediate_size})")
        if own != dense:
            upcycle(dense, own, trains[name]["model"]["moe"], init="zero", seed=seed)
            kept = "without its MLP " if mcfg.moe.position == "replace_mlp" else ""
            how[name] += f" {kept}+ zero-output experts (upcycle)"
    return how


# ---------------------------------------------------------------------------------------------
# Running


def _config_file(study: StudyConfig, route: Route, t: dict, work: Path, lit_dir: Path | None) -> tuple[dict, Path]:
    """The config this (route, seed) runs with, validated, and where it is written."""
    path = work / "configs" / route.name / f"seed-{t['seed']}.yaml"
    if route.trainer == "phiforge":
        t = {**t, "progress_bar": False}
        t.setdefault("save_interval", 0)
        train_config(t)
        return t, path
    from phiforge.litgpt.pretrain import LitPretrainConfig

    d = litgpt_dict(t, study)
    d["data"]["dir"] = str(lit_dir)
    d["echo"] = False
    from_dict(LitPretrainConfig, d)
    return d, path


def _command(study: StudyConfig, route: Route, path: Path) -> list[str]:
    if route.trainer == "litgpt":
        return [sys.executable, "-m", "phiforge", "litgpt", "pretrain", "--config", str(path)]
    launch = [sys.executable, "-m", "phiforge"]
    if study.nproc > 1:
        launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={study.nproc}",
                  "-m", "phiforge"]
    return [*launch, "train", "--config", str(path)]


def _run_route(cmd: list[str], log_path: Path) -> dict:
    from phiforge.litgpt.pretrain import run_litgpt

    print(f"study: {' '.join(shlex.quote(c) for c in cmd)}  (log: {log_path})", flush=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    load_before = os.getloadavg()[0]
    code, out, wall, rss = run_litgpt(cmd, log_path, echo=False, env=env)
    load_after = os.getloadavg()[0]
    if code != 0:
        tail = [line for line in out.strip().splitlines() if line.strip()][-1:] or ["(no output)"]
        raise PhiforgeError(f"route failed (exit {code}): {tail[0][:300]} (log: {log_path})")
    return {"wall_s": wall, "peak_rss_gib": rss / 2**30, "command": " ".join(cmd),
            "loadavg_1min": [round(load_before, 2), round(load_after, 2)]}


def claim_study_dirs(study: StudyConfig, overwrite: bool = False, report_only: bool = False) -> None:
    """Refuse, before any work, a work_dir or report_dir that holds something else (fileio's rule), or a
    report_dir that is, holds or sits inside the runs it reports. --report-only writes only the report."""
    from phiforge.fileio import claim_output_dir, is_output_of

    work, dataset = Path(study.work_dir), study.data.dataset
    if not report_only:
        # a dataset prepared by an earlier run of this study lives in its work_dir, which is then kept
        kept = dataset and Path(dataset).resolve().is_relative_to(work.resolve()) and work.is_dir() \
            and is_output_of(work, "study-work")
        claim_output_dir(work, "study-work", [] if kept else [dataset], overwrite)
    claim_output_dir(study.report_dir, "study-report", [work / "runs", dataset], overwrite)


def read_state(work: Path) -> dict:
    """study-state.json: finished runs and the data facts (an older layout, without seeds, counts as empty)."""
    path = work / STATE
    state = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    if state.get("version") != STATE_VERSION:
        state = {}
    return {"version": STATE_VERSION, "runs": {}, **state}


def _config_hash(cfg: dict) -> str:
    return hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:16]


def _finished(state: dict, key: str, cfg: dict) -> bool:
    rec = state["runs"].get(key)
    return rec is not None and rec.get("config_sha") == _config_hash(cfg) and \
        (Path(cfg["out_dir"]) / "metrics.jsonl").is_file()


def _eta(state: dict, pending: list[str]) -> str:
    """Remaining time from the recorded durations (training + evaluation) of the same route, else of all."""
    took = {k: r["wall_s"] + r.get("eval_s", 0.0) for k, r in state["runs"].items()}
    if not took or not pending:
        return "ETA unknown" if pending else "done"
    overall = sum(took.values()) / len(took)
    left = 0.0
    for key in pending:
        same = [v for k, v in took.items() if k.split("/")[0] == key.split("/")[0]]
        left += sum(same) / len(same) if same else overall
    return f"ETA {time.strftime('%H:%M', time.localtime(time.time() + left))} (~{left / 60:.0f} min for " \
           f"{len(pending)} run(s))"


@dataclass
class _Run:
    route: Route
    seed: int
    cfg: dict  # what the trainer's --config file holds
    path: Path  # that file

    @property
    def key(self) -> str:
        return run_key(self.route.name, self.seed)


def plan_runs(study: StudyConfig, trains: dict, names: list[str], work: Path, tokens_dir: Path) -> list[_Run]:
    """Every (route, seed) run of these routes, seed after seed (an interrupted study has whole seeds)."""
    runs = []
    for seed in study.seeds:
        inits = init_paths(study, work, trains, seed, names)
        for r in study.routes:
            if r.name not in names:
                continue
            t = seeded(trains[r.name], seed)
            t["data"]["dir"] = str(tokens_dir)
            t["out_dir"] = str(work / "runs" / r.name / f"seed-{seed}")
            if study.same_init:
                t["init_from"] = str(inits[r.name][1])
            if study.cloze_every and r.trainer == "phiforge":
                t["eval_tasks"] = [{"name": CLOZE_TASK, "path": str(cloze_path(work)), "format": "cloze",
                                    "limit": study.cloze_limit}]
                t["eval_tasks_interval"] = study.cloze_every
            cfg, path = _config_file(study, r, t, work, work / "data" / "litdata" / f"seed-{seed}")
            runs.append(_Run(r, seed, cfg, path))
    return runs


def _prepare_seed(study: StudyConfig, work: Path, trains: dict, seed: int, todo: list[_Run], tokens_dir: Path,
                  facts: dict) -> dict[str, str]:
    """Initial weights of one seed (route -> how they were made) and, for a LitGPT route, its litdata."""
    names = [run.route.name for run in todo if run.seed == seed]
    how = make_inits(study, work, trains, seed, names, tokens_dir) if study.same_init else {}
    lit = [run for run in todo if run.seed == seed and run.route.trainer == "litgpt"]
    if lit:
        t = seeded(trains[lit[0].route.name], seed)
        t["data"]["dir"] = str(tokens_dir)
        _litdata_for_seed(tokens_dir, work, t, facts)
    return how


def _run_one(study: StudyConfig, run: _Run, setup) -> dict:
    """Train one (route, seed) in its own process, then score its final checkpoint."""
    from phiforge.study.evaluate import evaluate_route

    run.path.parent.mkdir(parents=True, exist_ok=True)
    run.path.write_text(yaml.safe_dump(run.cfg, sort_keys=False), encoding="utf-8")
    run_dir = Path(run.cfg["out_dir"])
    shutil.rmtree(run_dir, ignore_errors=True)  # an interrupted attempt starts over
    run_dir.mkdir(parents=True)
    rec = _run_route(_command(study, run.route, run.path), run_dir.parent / f"seed-{run.seed}.log")
    t0 = time.perf_counter()
    rec["eval"] = evaluate_route(run_dir, setup)
    rec["eval_s"] = time.perf_counter() - t0
    return rec


def _run_pending(study: StudyConfig, trains: dict, runs: list[_Run], todo: list[_Run], state: dict, work: Path,
                 tokens_dir: Path, setup) -> None:
    from phiforge.fileio import write_json_atomic

    how: dict[int, dict[str, str]] = {}
    left = [run.key for run in todo]
    for i, run in enumerate(runs, 1):
        head = f"study: [{i}/{len(runs)}] {run.key}"
        if run.key not in left:
            print(f"{head}: finished earlier ({STATE}), skipped", flush=True)
            continue
        if run.seed not in how:
            how[run.seed] = _prepare_seed(study, work, trains, run.seed, todo, tokens_dir, state["data"])
        print(f"{head}: {run.route.trainer}", flush=True)
        rec = _run_one(study, run, setup)
        rec.update(route=run.route.name, seed=run.seed, trainer=run.route.trainer,
                   init=how[run.seed].get(run.route.name, "the trainer's own init"),
                   config_sha=_config_hash(run.cfg), finished=time.strftime("%Y-%m-%d %H:%M:%S"))
        state["runs"][run.key] = rec
        write_json_atomic(work / STATE, state, indent=1)
        left.remove(run.key)
        bpb = rec["eval"].get("val_bpb")
        print(f"{head}: done in {rec['wall_s'] + rec['eval_s']:.0f} s"
              + (f", val bpb {bpb:.4f}" if bpb is not None else "") + f"; {_eta(state, left)}", flush=True)


def run_study(study: StudyConfig, only: list[str] | None = None, report_only: bool = False, overwrite: bool = False,
              reproduce: str | None = None, rerun: bool = False, readme: str | None = None) -> dict:
    """Run the study's (route, seed) runs that are not finished yet (train_runs) and write its report; returns
    the report's results. reproduce: the command shown in the report; readme: a README whose results block is
    rewritten from the report (report.write_readme)."""
    from phiforge.study.report import write_report

    trains = {r.name: route_train_dict(study, r) for r in study.routes}
    if report_only:
        claim_study_dirs(study, overwrite, report_only=True)
    else:
        train_runs(study, only, overwrite, rerun)
    return write_report(study, read_state(Path(study.work_dir)), trains, overwrite=overwrite, reproduce=reproduce,
                        readme=readme)


def train_runs(study: StudyConfig, only: list[str] | None = None, overwrite: bool = False,
               rerun: bool = False) -> dict:
    """Train and evaluate every (route, seed) of the study (of `only` routes) that has not finished yet (every one
    with `rerun`); returns study-state.json's contents."""
    from phiforge.fileio import open_output_dir

    work = Path(study.work_dir)
    trains = {r.name: route_train_dict(study, r) for r in study.routes}
    names = [r.name for r in study.routes if not only or r.name in only]
    check_routes(study, trains, names)
    claim_study_dirs(study, overwrite)
    open_output_dir(work, "study-work", overwrite=overwrite)  # claimed above, with the dataset as input
    _run_all(study, trains, names, work, rerun)
    return read_state(work)


def _run_all(study: StudyConfig, trains: dict, names: list[str], work: Path, rerun: bool) -> None:
    from phiforge.fileio import write_json_atomic
    from phiforge.study.evaluate import prepare_eval, val_bytes_per_token

    state = read_state(work)
    t_data = time.perf_counter()
    tokens_dir = _prepare_tokens(study, work)
    ref = seeded(trains[study.reference_route.name], 0)
    ref["data"]["dir"] = str(tokens_dir)
    base = train_config(ref)
    setup = prepare_eval(study, tokens_dir, work, base)
    state["data"] = {**data_facts(tokens_dir, base, tokens_budget(ref, study.nproc)),
                     "val_bytes_per_token": val_bytes_per_token(setup)}
    state["data_seconds"] = round(time.perf_counter() - t_data, 1)
    runs = plan_runs(study, trains, names, work, tokens_dir)
    todo = [run for run in runs if rerun or not _finished(state, run.key, run.cfg)]
    write_json_atomic(work / STATE, state, indent=1)
    print(f"study: {len(runs)} runs ({len(names)} route(s) x {len(study.seeds)} seed(s)), {len(todo)} to run; "
          f"{state['data']['tokens_per_run']:,} tokens per run = {state['data']['epochs']:.2f} epochs of the "
          f"training split; {_eta(state, [run.key for run in todo])}", flush=True)
    _run_pending(study, trains, runs, todo, state, work, tokens_dir, setup)
