"""`phiforge study --config studies/NAME.yaml`: one architecture, one data set, one token budget, several routes.

A study trains the same Phi-2-family model on the same tokens with the same hyperparameters through each route:

    phiforge   `phiforge train` (dense, or with `model.moe` set: MoE after the MLP)
    litgpt     `litgpt pretrain`, through `phiforge litgpt pretrain`

Steps (all under work_dir, default runs/studies/NAME):
  1. data: `phiforge prepare CORPUS ...` (or an existing phiforge dataset), then `phiforge litgpt prepare`: the
     same token windows, in the same order, for LitGPT (litdata chunks).
  2. init (same_init: true): one dense model drawn with torch.manual_seed(train.seed) is every route's start;
     LitGPT gets it converted (`convert to-litgpt`), an MoE route gets it upcycled with zero-output experts
     (`convert upcycle --init zero`: the same function as the dense model at step 0).
  3. each route runs as its own process, one after another; wall time and peak RSS (the process and its
     children, from wait4) are measured from outside, the same way for every route.
  4. report_dir (default docs/results/NAME): report.md, PNG plots, results.json, each route's metrics.jsonl
     and the study config.

Throughput is "steady" tokens/s: tokens over training-loop seconds between consecutive train log events, leaving
out the first interval (warm-up, LitGPT's torch.compile) and any interval that contains a validation. Both
trainers log on the same steps, so the same intervals count for each.
"""

from __future__ import annotations

import json
import math
import os
import shlex
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from phiforge.config import apply_overrides, from_dict, read_yaml
from phiforge.errors import ConfigError, PhiforgeError

TRAINERS = ("phiforge", "litgpt")


@dataclass
class StudyData:
    corpus: str = "gutenberg"  # `phiforge prepare CORPUS` (gutenberg, redpajama, ...)
    prepare_args: list[str] = field(default_factory=list)  # e.g. [--source, bundled]
    dataset: str | None = None  # a prepared phiforge dataset to use instead of running `phiforge prepare`


@dataclass
class Route:
    name: str = ""
    trainer: str = "phiforge"  # phiforge | litgpt
    set: list[str] = field(default_factory=list)  # overrides of `train` keys for this route, e.g. model.moe.top_k=2
    label: str = ""  # shown in the report (default: name)


@dataclass
class Samples:
    prompts: list[str] = field(default_factory=lambda: ["It is a truth universally acknowledged"])
    max_new_tokens: int = 48
    temperature: float = 0.8
    top_k: int | None = 50
    seed: int = 0


@dataclass
class StudyConfig:
    name: str = ""
    title: str = ""
    description: str = ""
    data: StudyData = field(default_factory=StudyData)
    train: dict = field(default_factory=dict)  # `phiforge train` keys shared by every route
    litgpt: dict = field(default_factory=dict)  # extra `phiforge litgpt pretrain` keys (devices, data.num_workers, ...)
    routes: list[Route] = field(default_factory=list)
    nproc: int = 1  # processes per phiforge route (> 1: torchrun); LitGPT routes get devices = nproc
    same_init: bool = True
    work_dir: str = ""  # default runs/studies/NAME
    report_dir: str = ""  # default docs/results/NAME
    samples: Samples = field(default_factory=Samples)
    max_val_gap: float = 0.02  # the check: |phiforge dense - LitGPT| / phiforge dense final val loss
    reference: str = ""  # the route the others are compared with (default: the first phiforge route)

    def __post_init__(self):
        if not self.name or not self.name.replace("-", "").replace("_", "").isalnum():
            raise ConfigError(f"study name must be letters, digits, '-' and '_', got {self.name!r}")
        if not self.routes:
            raise ConfigError("a study needs at least one route")
        names = [r.name for r in self.routes]
        if len(set(names)) != len(names) or not all(names):
            raise ConfigError(f"route names must be unique and non-empty, got {names}")
        for r in self.routes:
            if r.trainer not in TRAINERS:
                raise ConfigError(f"route {r.name}: trainer must be one of {', '.join(TRAINERS)}, got '{r.trainer}'")
        if self.reference and self.reference not in names:
            raise ConfigError(f"reference '{self.reference}' is not a route ({', '.join(names)})")
        if self.nproc < 1:
            raise ConfigError("nproc must be at least 1")
        self.work_dir = self.work_dir or f"runs/studies/{self.name}"
        self.report_dir = self.report_dir or f"docs/results/{self.name}"

    @property
    def reference_route(self) -> Route:
        if self.reference:
            return next(r for r in self.routes if r.name == self.reference)
        return next((r for r in self.routes if r.trainer == "phiforge"), self.routes[0])


def load_study(path: str | Path, sets: list[str] | None = None) -> StudyConfig:
    data = read_yaml(path)
    apply_overrides(data, sets or [])
    return from_dict(StudyConfig, data)


# ---------------------------------------------------------------------------------------------
# Configs per route


def route_train_dict(study: StudyConfig, route: Route) -> dict:
    """The shared `train` section with the route's overrides applied (phiforge TrainConfig keys)."""
    import copy

    d = copy.deepcopy(study.train)
    apply_overrides(d, route.set)
    return d


def _train_config(d: dict):
    from phiforge.train.config import TrainConfig

    return from_dict(TrainConfig, d)


_SHARED = ("model", "init_from", "optim", "micro_batch_size", "grad_accum_steps", "max_steps", "eval_interval",
           "eval_batches", "log_interval", "out_dir", "device", "precision", "seed")


def litgpt_dict(train: dict, study: StudyConfig) -> dict:
    """LitPretrainConfig keys for a route, from its phiforge TrainConfig keys plus study.litgpt."""
    import copy

    d = {k: copy.deepcopy(v) for k, v in train.items() if k in _SHARED}
    d["data"] = {"seq_len": train.get("data", {}).get("seq_len", 256)}
    d["devices"] = study.nproc
    extra = copy.deepcopy(study.litgpt)
    for k, v in extra.items():
        if k == "data":
            d["data"].update(v)
        else:
            d[k] = v
    return d


def tokens_budget(train: dict, nproc: int = 1) -> int:
    t = _train_config(train)
    return t.max_steps * t.micro_batch_size * t.grad_accum_steps * nproc * t.data.seq_len


# ---------------------------------------------------------------------------------------------
# Running


def _prepare_tokens(study: StudyConfig, work: Path) -> Path:
    from phiforge.data.corpora import load_prepare_config, parse_flags, prepare_corpus

    if study.data.dataset:
        return Path(study.data.dataset)
    out = work / "data" / "phiforge"
    stamp = work / "data" / "phiforge-prepare.json"
    want = {"corpus": study.data.corpus, "args": study.data.prepare_args}
    if (out / "index.json").is_file() and stamp.is_file() and json.loads(stamp.read_text()) == want:
        print(f"study: reusing {out}", flush=True)
        return out
    flags = {**parse_flags(study.data.corpus, study.data.prepare_args), "out": str(out)}
    cfg = load_prepare_config(study.data.corpus, flags=flags)
    print(f"study: phiforge prepare {study.data.corpus} {shlex.join(study.data.prepare_args)} --out {out}",
          flush=True)
    prepare_corpus(cfg, echo=print)
    stamp.write_text(json.dumps(want))
    return out


def _make_inits(study: StudyConfig, work: Path, trains: dict[str, dict]) -> dict[str, tuple[str, str]]:
    """Route name -> (initial checkpoint, how it was made). Dense routes with the reference's architecture share
    one init; an MoE route whose dense part has that architecture gets it upcycled with zero-output experts."""
    import torch

    from phiforge.checkpoint import save_checkpoint
    from phiforge.model import Phi2
    from phiforge.upcycle import upcycle

    inits: dict[str, tuple[str, str]] = {}
    base = _train_config(trains[study.reference_route.name])
    base_dense = base.model_config()
    base_dense.moe = None
    init_root = work / "init"
    dense_dir = init_root / "dense"
    torch.manual_seed(base.seed)
    save_checkpoint(Phi2(base_dense), dense_dir, tokenizer_dir=Path(base.data.dir))
    for r in study.routes:
        t = _train_config(trains[r.name])
        mcfg = t.model_config()
        dense = t.model_config()
        dense.moe = None
        if dense.to_dict() != base_dense.to_dict():
            torch.manual_seed(t.seed)
            out = init_root / r.name
            save_checkpoint(Phi2(mcfg), out, tokenizer_dir=Path(t.data.dir))
            inits[r.name] = (str(out), f"its own init (seed {t.seed}; its architecture differs)")
        elif mcfg.moe is not None:
            out = init_root / r.name
            upcycle(dense_dir, out, trains[r.name]["model"]["moe"], init="zero", seed=t.seed)
            inits[r.name] = (str(out), f"the shared dense init (seed {base.seed}) + zero-output experts (upcycle)")
        else:
            inits[r.name] = (str(dense_dir), f"the shared dense init (seed {base.seed})")
    return inits


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


def run_study(study: StudyConfig, only: list[str] | None = None, report_only: bool = False, overwrite: bool = False,
              reproduce: str | None = None) -> dict:
    """Run the study's routes (or only some) and write its report; returns the report's results.
    reproduce: the command that reruns it, for the report (default: the resolved study.yaml the report keeps)."""
    from phiforge.fileio import open_output_dir

    work = Path(study.work_dir)
    runs = work / "runs"
    cfg_dir = work / "configs"
    trains = {r.name: route_train_dict(study, r) for r in study.routes}
    budgets = {n: tokens_budget(t, study.nproc) for n, t in trains.items()}
    if len(set(budgets.values())) != 1:
        raise ConfigError(f"routes must share one token budget, got {budgets}")
    for r in study.routes:
        if r.trainer == "litgpt" and _train_config(trains[r.name]).model_config().moe is not None:
            raise ConfigError(f"route {r.name}: LitGPT cannot train phiforge's MoE after the MLP")
    claim_study_dirs(study, overwrite, report_only)
    if not report_only:
        open_output_dir(work, "study-work", overwrite=overwrite)  # claimed above, with the dataset as input
    state_path = work / "study-state.json"
    state = json.loads(state_path.read_text()) if state_path.is_file() else {}
    if not report_only:
        cfg_dir.mkdir(parents=True, exist_ok=True)
        t_data = time.perf_counter()
        tokens_dir = _prepare_tokens(study, work)
        base = _train_config(trains[study.reference_route.name])
        for t in trains.values():
            t.setdefault("data", {})["dir"] = str(tokens_dir)
        need_lit = any(r.trainer == "litgpt" for r in study.routes if not only or r.name in only)
        lit_dir = work / "data" / "litdata"
        if need_lit:
            from phiforge.litgpt.data import prepare_litdata
            from phiforge.data.loader import PackedLoader

            loader = PackedLoader(tokens_dir, "train", base.data.seq_len, base.micro_batch_size, seed=base.data.seed)
            per_epoch = loader.batches_per_epoch * base.micro_batch_size
            windows = base.max_steps * base.micro_batch_size * base.grad_accum_steps * study.nproc
            epochs = max(1, math.ceil(windows / per_epoch))
            mixture = trains[study.reference_route.name].get("data", {}).get("mixture")  # when the trainer has one
            m = prepare_litdata(tokens_dir, lit_dir, base.data.seq_len, micro_batch_size=base.micro_batch_size,
                                seed=base.data.seed, epochs=epochs, mixture=mixture,
                                eval_batches_n=base.eval_batches if mixture else None)
            print(f"study: litdata {lit_dir}: {m['splits']['train']['windows']:,} train windows ({epochs} epoch(s))",
                  flush=True)
        state["data_seconds"] = round(time.perf_counter() - t_data, 1)
        inits = _make_inits(study, work, trains) if study.same_init else {}
        state.setdefault("routes", {})
        for r in study.routes:
            if only and r.name not in only:
                continue
            t = trains[r.name]
            run_dir = runs / r.name
            shutil.rmtree(run_dir, ignore_errors=True)
            t = {**t, "out_dir": str(run_dir)}
            if r.name in inits:
                t["init_from"] = inits[r.name][0]
            if r.trainer == "phiforge":
                t["progress_bar"] = False
                t.setdefault("save_interval", 0)
                path = cfg_dir / f"{r.name}.yaml"
                _train_config(t)  # validate before launching
                path.write_text(yaml.safe_dump(t, sort_keys=False), encoding="utf-8")
                launch = [sys.executable, "-m", "phiforge"]
                if study.nproc > 1:
                    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                              f"--nproc-per-node={study.nproc}", "-m", "phiforge"]
                cmd = [*launch, "train", "--config", str(path)]
            else:
                from phiforge.litgpt.pretrain import LitPretrainConfig

                d = litgpt_dict(t, study)
                d["data"]["dir"] = str(lit_dir)
                d["echo"] = False
                from_dict(LitPretrainConfig, d)
                path = cfg_dir / f"{r.name}.yaml"
                path.write_text(yaml.safe_dump(d, sort_keys=False), encoding="utf-8")
                cmd = [sys.executable, "-m", "phiforge", "litgpt", "pretrain", "--config", str(path)]
            run_dir.mkdir(parents=True, exist_ok=True)
            state["routes"][r.name] = {**_run_route(cmd, work / f"{r.name}.log"), "trainer": r.trainer,
                                       "init": inits.get(r.name, ("", "the trainer's own init"))[1],
                                       "finished": time.strftime("%Y-%m-%d %H:%M:%S")}
            state_path.write_text(json.dumps(state, indent=1))
    from phiforge.litgpt.report import write_report

    return write_report(study, state, trains, overwrite=overwrite, reproduce=reproduce)
