"""A study's config (the keys of studies/NAME.yaml), and what each route trains with for each seed: the shared
`train` keys with the route's overrides, the seed set, the LitGPT keys, the token budget and the dense
architecture that decides which routes share initial weights."""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path

from phiforge.config import apply_overrides, check_range, from_dict, read_yaml
from phiforge.errors import ConfigError

TRAINERS = ("phiforge", "litgpt")
CLOZE_TASK = "gutenberg-cloze"  # made once per study from its held-out books (phiforge eval make-cloze)


def cloze_path(work: Path) -> Path:
    return work / "data" / f"{CLOZE_TASK}.jsonl"



@dataclass
class StudyData:
    corpus: str = "gutenberg"  # `phiforge prepare CORPUS` (gutenberg, redpajama, ...)
    prepare_args: list[str] = field(default_factory=list)  # e.g. [--source, bundled] or [--tokenizer-dir, DIR]
    dataset: str | None = None  # a prepared phiforge dataset to use instead of running `phiforge prepare`
    # `phiforge tokenizer train` keys (e.g. {vocab_size: 4096}): train a byte-level BPE on the same books first and
    # prepare with it; {} keeps GPT-2's BPE. Gutenberg only; set train.model.vocab_size to match.
    tokenizer: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.tokenizer and self.corpus != "gutenberg":
            raise ConfigError(f"data.tokenizer trains on Gutenberg books; corpus {self.corpus} needs a tokenizer "
                              "made beforehand (prepare_args: [--tokenizer-dir, DIR])")


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
    train: dict = field(default_factory=dict)  # `phiforge train` keys shared by every route (not seed, data.seed)
    litgpt: dict = field(default_factory=dict)  # extra `phiforge litgpt pretrain` keys (devices, data.num_workers, ...)
    routes: list[Route] = field(default_factory=list)
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])  # each sets train.seed and train.data.seed
    nproc: int = 1  # processes per phiforge route (> 1: torchrun); LitGPT routes get devices = nproc
    same_init: bool = True
    work_dir: str = ""  # default runs/studies/NAME
    report_dir: str = ""  # default docs/results/NAME
    samples: Samples = field(default_factory=Samples)
    max_val_gap: float = 0.02  # the check: |phiforge dense - LitGPT| / phiforge dense final val loss
    reference: str = ""  # the route the others are compared with (default: the first phiforge route)
    larger_study: str = ""  # a study config of the same comparison at scale; the README section links it
    # > 0: phiforge routes also score the first cloze_limit gutenberg-cloze items while training (eval_tasks), at
    # the validations on a multiple of cloze_every steps: the accuracy-over-tokens plot
    cloze_every: int = 0
    cloze_limit: int = 100

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
        check_range("cloze_every", self.cloze_every, 0, note=" (0: no cloze curve while training)")
        check_range("cloze_limit", self.cloze_limit, 1)
        if not self.seeds or len(set(self.seeds)) != len(self.seeds) or min(self.seeds) < 0:
            raise ConfigError(f"seeds must be a non-empty list of distinct integers >= 0, got {self.seeds}")
        for key, section in (("train.seed", self.train), ("train.data.seed", self.train.get("data") or {})):
            if "seed" in section:
                raise ConfigError(f"{key} is set by the study's `seeds` (each seed sets train.seed and "
                                  "train.data.seed): remove it")
        self.work_dir = self.work_dir or f"runs/studies/{self.name}"
        self.report_dir = self.report_dir or f"docs/results/{self.name}"

    @property
    def reference_route(self) -> Route:
        if self.reference:
            return next(r for r in self.routes if r.name == self.reference)
        return next((r for r in self.routes if r.trainer == "phiforge"), self.routes[0])

    def label(self, name: str) -> str:
        r = next(r for r in self.routes if r.name == name)
        return r.label or r.name


def load_study(path: str | Path, sets: list[str] | None = None) -> StudyConfig:
    data = read_yaml(path)
    apply_overrides(data, sets or [])
    return from_dict(StudyConfig, data)


def run_key(route: str, seed: int) -> str:
    return f"{route}/seed-{seed}"


# ---------------------------------------------------------------------------------------------
# Configs per route and seed


def route_train_dict(study: StudyConfig, route: Route) -> dict:
    """The shared `train` section with the route's overrides applied (phiforge TrainConfig keys)."""
    d = copy.deepcopy(study.train)
    apply_overrides(d, route.set)
    return d


def seeded(train: dict, seed: int) -> dict:
    """A route's train keys for one seed: the initial weights (seed) and the data order (data.seed)."""
    d = copy.deepcopy(train)
    d["seed"] = seed
    d.setdefault("data", {})["seed"] = seed
    return d


def train_config(d: dict):
    """A route's train keys as the TrainConfig `phiforge train` runs with (checked)."""
    from phiforge.train.config import TrainConfig

    return from_dict(TrainConfig, d)


_SHARED = ("model", "init_from", "optim", "micro_batch_size", "grad_accum_steps", "max_steps", "eval_interval",
           "eval_batches", "log_interval", "out_dir", "device", "precision", "seed")


def litgpt_dict(train: dict, study: StudyConfig) -> dict:
    """LitPretrainConfig keys for a route, from its phiforge TrainConfig keys plus study.litgpt."""
    d = {k: copy.deepcopy(v) for k, v in train.items() if k in _SHARED}
    d["data"] = {"seq_len": train.get("data", {}).get("seq_len", 256)}
    d["devices"] = study.nproc
    for k, v in copy.deepcopy(study.litgpt).items():
        if k == "data":
            d["data"].update(v)
        else:
            d[k] = v
    return d


def tokens_budget(train: dict, nproc: int = 1) -> int:
    t = train_config(train)
    return t.max_steps * t.micro_batch_size * t.grad_accum_steps * nproc * t.data.seq_len


def check_routes(study: StudyConfig, trains: dict[str, dict], names: list[str]) -> None:
    """The routes that are about to run, checked before any work: each config is valid, all share one token
    budget with the reference, and LitGPT routes are dense."""
    budgets = {n: tokens_budget(seeded(trains[n], 0), study.nproc)
               for n in dict.fromkeys([study.reference_route.name, *names])}
    if len(set(budgets.values())) != 1:
        raise ConfigError(f"routes must share one token budget, got {budgets}")
    for r in study.routes:
        if r.name in names and r.trainer == "litgpt" and train_config(trains[r.name]).model_config().moe is not None:
            raise ConfigError(f"route {r.name}: LitGPT cannot train phiforge's MoE")


def dense_key(train: dict) -> str:
    """The dense architecture of a route's model (its MoE left out), as a comparable string."""
    mcfg = train_config(train).model_config()
    mcfg.moe = None
    return json.dumps(mcfg.to_dict(), sort_keys=True)
