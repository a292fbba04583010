"""Will a study fit its time budget? Runs each route of a study config for a few steps (one seed, the study's own
machinery: processes, inits, LitGPT data, evaluation) and projects the full study's time from what it measured.

Per route it measures, in one run: seconds per training step (steady, from the log intervals), the fixed cost of
a run (process start-up, compilation, checkpoint, evaluate_route: wall + evaluation - steps x step time) and the
step time relative to the reference route (the baseline, measured in the same run). The projection:

    run(route)  = fixed + max_steps x step + validations x eval_batches x step / 3 + eval_allowance
    study       = data + per-seed setup (inits, LitGPT chunks) x seeds + report (each measured)
                  + sum over routes of seeds x run(route)

eval_allowance: what `phiforge eval` (gutenberg-cloze, whole-split bpb) will add per run, an assumption until it
is plugged into phiforge/study/evaluate.py (--eval-allowance).

A validation forward costs about a third of a training step per token. Routes that cannot run here (e.g. a key
this phiforge does not have yet) are left out with --routes and projected at the reference's cost (marked
"assumed"). The machine may be shared: the JSON records the load average before and after.

    python bench/study_budget.py                                   # studies/cpu-gutenberg.yaml, 30 steps
    python bench/study_budget.py --routes dense-adamw,moe-parallel,litgpt --steps 40
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
from phiforge.study.config import load_study, route_train_dict, run_key, seeded, train_config  # noqa: E402
from phiforge.study.report import write_report  # noqa: E402
from phiforge.study.results import summarize_run  # noqa: E402
from phiforge.study.runner import train_runs  # noqa: E402


def measure(config: str, routes: list[str] | None, steps: int, work: Path) -> tuple[dict, dict, dict]:
    """Train each route `steps` steps with one seed, then write the report; (the study, its state, seconds spent
    outside the runs: data, per seed, report)."""
    seed = load_study(config).seeds[0]
    sets = [f"seeds=[{seed}]", f"train.max_steps={steps}", f"train.eval_interval={steps}", "train.log_interval=5",
            "train.optim.warmup_steps=2", f"work_dir={work}", f"report_dir={work / 'report'}"]
    study = load_study(config, sets)
    t0 = time.perf_counter()
    state = train_runs(study, routes, rerun=True)
    total = time.perf_counter() - t0
    t0 = time.perf_counter()
    write_report(study, state, {r.name: route_train_dict(study, r) for r in study.routes})
    report_s = time.perf_counter() - t0
    runs = sum(r["wall_s"] + r["eval_s"] for r in state["runs"].values())
    setup = {"data_s": state["data_seconds"], "per_seed_s": total - runs - state["data_seconds"], "report_s": report_s}
    return study, state, {k: round(v, 1) for k, v in setup.items()}


def per_route(study, state: dict, steps: int) -> dict:
    out = {}
    for r in study.routes:
        rec = state["runs"].get(run_key(r.name, study.seeds[0]))
        if rec is None:
            continue
        run = summarize_run(Path(study.work_dir) / "runs" / r.name / f"seed-{study.seeds[0]}", rec, r.trainer, None)
        tokens_per_step = run["tokens"] / steps
        step_s = tokens_per_step / run["steady_tokens_per_s"]
        out[r.name] = {"steady_tokens_per_s": round(run["steady_tokens_per_s"], 1), "step_s": round(step_s, 4),
                       "fixed_s": round(rec["wall_s"] + rec["eval_s"] - steps * step_s, 1),
                       "wall_s": round(rec["wall_s"], 1), "eval_s": round(rec["eval_s"], 1),
                       "loadavg_1min": rec["loadavg_1min"]}
    return out


def project(full, measured: dict, setup: dict, eval_allowance: float) -> dict:
    """Seconds of the full study per route (and in total) from the measured costs."""
    ref = measured[full.reference_route.name]
    routes = {}
    for r in full.routes:
        m = measured.get(r.name, {**ref, "assumed": f"as {full.reference_route.name} (not measured here)"})
        config_of = r if r.name in measured else full.reference_route  # an unmeasured route may not validate here
        t = train_config(seeded(route_train_dict(full, config_of), full.seeds[0]))
        validations = 1 + -(-t.max_steps // t.eval_interval)
        run_s = m["fixed_s"] + eval_allowance + m["step_s"] * (t.max_steps + validations * t.eval_batches / 3)
        routes[r.name] = {"run_s": round(run_s), "runs": len(full.seeds),
                          "step_vs_reference": round(m["step_s"] / ref["step_s"], 3),
                          **({"assumed": m["assumed"]} if "assumed" in m else {})}
    total = setup["data_s"] + setup["per_seed_s"] * len(full.seeds) + setup["report_s"] + \
        sum(v["run_s"] * v["runs"] for v in routes.values())
    return {"routes": routes, "setup_s": setup, "eval_allowance_s_per_run": eval_allowance,
            "total_s": round(total), "total_min": round(total / 60, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="studies/cpu-gutenberg.yaml")
    ap.add_argument("--routes", help="comma-separated routes to measure (default: all)")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--eval-allowance", type=float, default=40.0,
                    help="seconds per run that phiforge eval (cloze, whole-split bpb) will add")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "study-budget-cpu.json"))
    args = ap.parse_args()
    routes = args.routes.split(",") if args.routes else None
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="study-budget-") as tmp:
        study, state, setup = measure(args.config, routes, args.steps, Path(tmp) / "work")
        measured = per_route(study, state, args.steps)
    full = load_study(args.config)
    result = {"bench": "study_budget", "command": "python bench/study_budget.py " + " ".join(sys.argv[1:]),
              "config": args.config, "steps_measured": args.steps, "loadavg_1min": [round(load, 2),
                                                                                       round(os.getloadavg()[0], 2)],
              "date": time.strftime("%Y-%m-%d %H:%M"), "cpus": os.cpu_count(), "measured": measured,
              "projection": project(full, measured, setup, args.eval_allowance)}
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result["projection"], indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
