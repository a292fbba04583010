"""The numbers of a study's report: each (route, seed) run's metrics.jsonl and its evaluation, each route's
aggregates over seeds (mean, sd) and its curves, the comparison with the reference seed by seed (stats.py), and
the single-number checks (LitGPT parity, MoE vs dense at equal active parameters)."""

from __future__ import annotations

import json
import math
from pathlib import Path

from phiforge.model_files import read_config, resolve_checkpoint
from phiforge.study.config import CLOZE_TASK, run_key
from phiforge.study.stats import compare, describe


def read_events(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def steady_tokens_per_s(events: list[dict]) -> float | None:
    """Tokens over seconds between consecutive train events, leaving out the first interval (warm-up, compile)
    and every interval in which a validation ran (a validation at step s runs after the train event of s)."""
    trains = [e for e in events if e.get("event") == "train" and e.get("elapsed_s") is not None]
    evals = [e["step"] for e in events if e.get("event") == "eval"]
    tok = sec = 0.0
    for prev, cur in zip(trains, trains[1:]):
        if any(prev["step"] <= s < cur["step"] for s in evals):
            continue
        tok += cur["tokens"] - prev["tokens"]
        sec += cur["elapsed_s"] - prev["elapsed_s"]
    return tok / sec if sec > 0 else None


def param_counts(cfg) -> tuple[int, int]:
    """(total, active per token) parameters of a Phi2Config's model: routed experts count at top_k / num_experts."""
    from phiforge.model import MoE, Phi2
    from phiforge.model.init import on_meta

    with on_meta():
        model = Phi2(cfg)
    total = model.num_params()
    inactive = 0
    for m in model.modules():
        if isinstance(m, MoE):
            experts = sum(p.numel() for n, p in m.named_parameters(recurse=False) if n in ("w1", "b1", "w2", "b2"))
            inactive += experts - experts * m.cfg.top_k // m.cfg.num_experts
    return total, total - inactive


def lit_gpu_memory(log: Path) -> float | None:
    import re

    if not log.is_file():
        return None
    m = re.search(r"Memory Used\s*:\s*([\d.]+) GB", log.read_text(encoding="utf-8", errors="replace"))
    return float(m.group(1)) * 1e9 / 2**30 if m else None


def _checks(study, routes: dict) -> list[dict]:
    ref = study.reference_route.name
    out = []
    if ref not in routes:
        return out
    r0 = routes[ref]
    for name, r in routes.items():
        if name == ref or r["val_loss"] is None or r0["val_loss"] is None:
            continue
        if r["trainer"] == "phiforge":
            # a variant of the reference (e.g. MoE) with as many active parameters per token should do no worse;
            # "as many" allows 1% for what routing itself adds (router, the MoE sublayer's LayerNorm)
            same_active = abs(r["active_params"] - r0["active_params"]) <= 0.01 * r0["active_params"]
            if same_active and r["params"] != r0["params"]:
                out.append({"check": f"final val loss: {name} <= {ref} at equal active parameters and tokens",
                            "value": f"{r['val_loss']:.4f} vs {r0['val_loss']:.4f} "
                                     f"({r['val_loss'] - r0['val_loss']:+.4f}); active {r['active_params'] / 1e6:.2f}M vs {r0['active_params'] / 1e6:.2f}M,"
                                     f" {r['tokens']:,} vs {r0['tokens']:,} tokens",
                            "pass": r["val_loss"] <= r0["val_loss"] and r["tokens"] == r0["tokens"]})
            continue
        gap = abs(r["val_loss"] - r0["val_loss"]) / r0["val_loss"]
        out.append({"check": f"final val loss: {ref} vs {name} within {study.max_val_gap:.0%} at equal tokens",
                    "value": f"{gap:.2%} ({r0['val_loss']:.4f} vs {r['val_loss']:.4f} at "
                             f"{r0['tokens']:,} vs {r['tokens']:,} tokens)",
                    "pass": gap <= study.max_val_gap and r0["tokens"] == r["tokens"]})
        a, b = r0["steady_tokens_per_s"], r["steady_tokens_per_s"]
        if a and b:
            out.append({"check": f"tokens/s: {ref} >= {name}", "value": f"{a:,.0f} vs {b:,.0f} ({a / b:.2f}x)",
                        "pass": a >= b})
    return out



# ---------------------------------------------------------------------------------------------
# Numbers: per (route, seed), then per route


# (key, column title, format, better): the per-run numbers the report aggregates over seeds
METRICS = (("val_bpb", "val bpb", ".4f", "lower"), ("cloze_acc", "cloze acc", ".3f", "higher"),
           ("val_loss", "val loss", ".4f", "lower"), ("steady_tokens_per_s", "tokens/s", ",.0f", "higher"),
           ("train_seconds", "train s", ".0f", "lower"), ("wall_s", "wall s", ".0f", "lower"),
           ("peak_mem_gib", "peak mem GiB", ".2f", "lower"))
COMPARED = ("val_bpb", "cloze_acc", "val_loss", "steady_tokens_per_s")  # tested against the reference, seed by seed


def summarize_run(run: Path, rec: dict, trainer: str, bytes_per_token: float | None) -> dict | None:
    """One (route, seed) run: its metrics.jsonl events plus what the study measured from outside (rec)."""
    events = read_events(run / "metrics.jsonl")
    evals = [e for e in events if e.get("event") == "eval"]
    trains = [e for e in events if e.get("event") == "train"]
    if not evals:
        return None
    end = next((e for e in reversed(events) if e.get("event") == "end"), {})
    gpu_mem = [e["peak_mem_gib"] for e in trains if e.get("peak_mem_kind") == "cuda_max_allocated"]
    if trainer == "litgpt":
        lit = lit_gpu_memory(run / "litgpt.log")
        gpu_mem = [lit] if lit is not None else []
    ev = rec.get("eval", {})
    rss = rec.get("peak_rss_gib", end.get("peak_rss_gib"))

    def bpb(e):  # LitGPT logs no val_bpb: its loss in bits over the validation windows' bytes per token
        if e.get("val_bpb") is not None or not bytes_per_token:
            return e.get("val_bpb")
        return e["val_loss"] / (math.log(2) * bytes_per_token)

    return {
        "seed": rec.get("seed"), "tokens": evals[-1].get("tokens"), "steps": evals[-1].get("step"),
        "val_bpb": ev.get("val_bpb", bpb(evals[-1])), "cloze_acc": ev.get("cloze_acc"),
        "val_loss": ev.get("val_loss", evals[-1]["val_loss"]), "val_loss_logged": evals[-1]["val_loss"],
        "val_loss_start": evals[0]["val_loss"], "eval": ev,
        "steady_tokens_per_s": steady_tokens_per_s(events),
        "train_seconds": trains[-1].get("elapsed_s") if trains else None,
        "wall_s": rec.get("wall_s", end.get("wall_s")), "eval_s": rec.get("eval_s"), "peak_rss_gib": rss,
        "peak_gpu_mem_gib": max(gpu_mem) if gpu_mem else None,
        "peak_mem_gib": max(gpu_mem) if gpu_mem else rss,
        "curve": [{"step": e["step"], "tokens": e["tokens"], "val_loss": e["val_loss"], "val_bpb": bpb(e),
                   "cloze_acc": e.get(f"task/{CLOZE_TASK}/acc"), "elapsed_s": e.get("elapsed_s")} for e in evals],
        "checkpoint": str(resolve_checkpoint(run)), "command": rec.get("command"), "init": rec.get("init"),
        "loadavg_1min": rec.get("loadavg_1min"), "finished": rec.get("finished"),
    }


def band(curves: list[list[dict]], key: str = "val_bpb") -> list[dict]:
    """Mean and sd over seeds of a curve's metric (val_bpb, cloze_acc) at each step every seed measured it at."""
    steps = set.intersection(*({p["step"] for p in c if p.get(key) is not None} for c in curves))
    out = []
    for step in sorted(steps):
        pts = [next(p for p in c if p["step"] == step) for c in curves]
        d = describe(p[key] for p in pts)
        out.append({"step": step, "tokens": pts[0]["tokens"], "mean": d["mean"], "sd": d["sd"] or 0.0, "n": d["n"]})
    return out


def summarize(study, state: dict) -> dict:
    """Route name -> label, parameters and per-seed records of every run study-state.json records as finished
    (an interrupted run is left out), plus aggregates over seeds."""
    work = Path(study.work_dir)
    bpt = state.get("data", {}).get("val_bytes_per_token")
    routes = {}
    for r in study.routes:
        seeds = {}
        for seed in study.seeds:
            rec = state.get("runs", {}).get(run_key(r.name, seed))  # recorded when it finished (and was scored)
            one = summarize_run(work / "runs" / r.name / f"seed-{seed}", rec, r.trainer, bpt) if rec else None
            if one is not None:
                seeds[seed] = one
        if not seeds:
            continue
        total, active = param_counts(read_config(Path(next(iter(seeds.values()))["checkpoint"])))
        routes[r.name] = {"label": r.label or r.name, "trainer": r.trainer, "set": r.set, "params": total,
                          "active_params": active, "init": next(iter(seeds.values()))["init"],
                          "tokens": next(iter(seeds.values()))["tokens"], "seeds": seeds,
                          "aggregates": {m[0]: describe(s[m[0]] for s in seeds.values()) for m in METRICS},
                          "band": band([s["curve"] for s in seeds.values()]),
                          "cloze_band": band([s["curve"] for s in seeds.values()], "cloze_acc")}
    return routes


def significance(study, routes: dict) -> list[dict]:
    per_seed = {n: {m: {s: rec[m] for s, rec in r["seeds"].items()} for m in COMPARED} for n, r in routes.items()}
    return compare(per_seed, study.reference_route.name, COMPARED)


def _mean(r: dict, key: str):
    a = r["aggregates"].get(key)
    return a["mean"] if a else None


def checks_on_means(study, routes: dict) -> list[dict]:
    """The single-number checks (LitGPT parity, MoE vs dense) on the means over seeds."""
    means = {n: {"trainer": r["trainer"], "params": r["params"], "active_params": r["active_params"],
                 "tokens": r["tokens"], "val_loss": _mean(r, "val_loss"),
                 "steady_tokens_per_s": _mean(r, "steady_tokens_per_s")} for n, r in routes.items()}
    return _checks(study, means)
