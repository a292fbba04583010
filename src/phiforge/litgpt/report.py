"""The study report: numbers from each (route, seed) run's metrics.jsonl and its evaluation, aggregated over
seeds (mean, sd), compared with the reference seed by seed (stats.py), PNG plots (report_plots.py), sample
generations, report.md, results.json and the README's results block."""

from __future__ import annotations

import json
import math
import os
import platform
import shutil
import time
from pathlib import Path

import yaml

from phiforge.checkpoint import read_config, resolve_checkpoint
from phiforge.config import to_dict
from phiforge.litgpt.report_plots import write_plots
from phiforge.litgpt.stats import compare, describe
from phiforge.litgpt.study import CLOZE_TASK, _train_config, run_key, seeded, tokens_budget


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


def _lit_gpu_memory(log: Path) -> float | None:
    import re

    if not log.is_file():
        return None
    m = re.search(r"Memory Used\s*:\s*([\d.]+) GB", log.read_text(encoding="utf-8", errors="replace"))
    return float(m.group(1)) * 1e9 / 2**30 if m else None


def _machine() -> dict:
    import torch

    cpu = platform.processor() or ""
    try:
        for line in open("/proc/cpuinfo", encoding="utf-8"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": cpu, "cpus": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version()}
    if torch.cuda.is_available():
        info["gpu"] = f"{torch.cuda.device_count()} x {torch.cuda.get_device_name()}"
    try:
        from importlib.metadata import version

        info["litgpt"] = version("litgpt")
        info["litdata"] = version("litdata")
    except Exception:  # noqa: BLE001 - the extra is optional
        pass
    return info


def _samples(study, ckpt: Path) -> list[dict]:
    import torch

    from phiforge.checkpoint import load_checkpoint
    from phiforge.generate import generate
    from phiforge.tokenizer import eot_id, load_tokenizer

    model = load_checkpoint(ckpt)
    tok = load_tokenizer(ckpt)
    s = study.samples
    out = []
    for prompt in s.prompts:
        idx = torch.tensor([tok.encode(prompt).ids])
        with torch.no_grad():
            ids = generate(model, idx, s.max_new_tokens, temperature=s.temperature, top_k=s.top_k, seed=s.seed,
                           stop_token=eot_id(tok))
        out.append({"prompt": prompt, "completion": tok.decode(ids[0, idx.size(1):].tolist())})
    return out


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
        lit = _lit_gpu_memory(run / "litgpt.log")
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


def _checks_on_means(study, routes: dict) -> list[dict]:
    """The single-number checks (LitGPT parity, MoE vs dense) on the means over seeds."""
    means = {n: {"trainer": r["trainer"], "params": r["params"], "active_params": r["active_params"],
                 "tokens": r["tokens"], "val_loss": _mean(r, "val_loss"),
                 "steady_tokens_per_s": _mean(r, "steady_tokens_per_s")} for n, r in routes.items()}
    return _checks(study, means)


# ---------------------------------------------------------------------------------------------
# Writing


def write_report(study, state: dict, trains: dict, overwrite: bool = False, reproduce: str | None = None,
                 readme: str | None = None) -> dict:
    """Write report_dir in place (files of others there are kept). Refuses, writing nothing, when no run has
    finished yet. reproduce: the command shown under "Reproduce" (default: one naming the study.yaml written
    here); readme: a README whose results block is rewritten (write_readme)."""
    from phiforge.errors import PhiforgeError
    from phiforge.fileio import open_output_dir, write_json_atomic

    routes = summarize(study, state)
    if not routes:
        raise PhiforgeError(f"no route of study {study.name} has run yet (no metrics under "
                            f"{Path(study.work_dir) / 'runs'}): run `phiforge study` without --report-only first")
    if readme is not None:
        check_readme(readme)
    first = {n: Path(next(iter(r["seeds"].values()))["checkpoint"]) for n, r in routes.items()}
    samples = {n: _samples(study, ckpt) for n, ckpt in first.items()}
    ref = _train_config(seeded(trains[study.reference_route.name], study.seeds[0]))
    results = {"study": study.name, "date": time.strftime("%Y-%m-%d"), "machine": _machine(), "seeds": study.seeds,
               "reference": study.reference_route.name, "tokens_budget": tokens_budget(seeded(
                   trains[study.reference_route.name], 0), study.nproc),
               "data": state.get("data", {}), "data_seconds": state.get("data_seconds"),
               "significance": significance(study, routes), "checks": _checks_on_means(study, routes),
               "routes": routes}
    reproduce = reproduce or f"phiforge study --config {Path(study.report_dir) / 'study.yaml'}"
    texts = {"report.md": markdown(study, results, list(PLOT_TITLES), ref, reproduce, samples),
             "readme-section.md": readme_section(study, results, Path.cwd()),
             "study.yaml": yaml.safe_dump(to_dict(study), sort_keys=False)}
    section = readme_section(study, results, Path(readme).resolve().parent) if readme is not None else None
    out = open_output_dir(study.report_dir, "study-report", [Path(study.work_dir) / "runs", study.data.dataset],
                          overwrite)
    write_plots(routes, out)
    _copy_metrics(study, routes, out)
    write_json_atomic(out / "results.json", results, indent=1)
    for name, text in texts.items():
        (out / name).write_text(text, encoding="utf-8")
    if section is not None:
        write_readme(readme, section)
    return results


def _copy_metrics(study, routes: dict, out: Path) -> None:
    for name, r in routes.items():
        (out / "metrics" / name).mkdir(parents=True, exist_ok=True)
        for seed in r["seeds"]:
            shutil.copyfile(Path(study.work_dir) / "runs" / name / f"seed-{seed}" / "metrics.jsonl",
                            out / "metrics" / name / f"seed-{seed}.jsonl")


def _fmt(v, spec: str, none: str = "-") -> str:
    return none if v is None else format(v, spec)


def fmt_agg(agg: dict | None, spec: str) -> str:
    """'mean ± sd' (just the mean for one seed; '-' for none): the form the README test parses."""
    if agg is None:
        return "-"
    return format(agg["mean"], spec) + (f" ± {format(agg['sd'], spec)}" if agg["sd"] is not None else "")


def _millions(n: int) -> str:
    return f"{n / 1e6:.2f}M"


def _setup(study, results: dict, ref) -> list[str]:
    m, d = results["machine"], results["data"]
    mc = ref.model_config()
    mc.moe = None
    o = ref.optim
    T, mb, acc = ref.data.seq_len, ref.micro_batch_size, ref.grad_accum_steps
    epochs = (f" = {d['epochs']:.2f} epochs of the training split ({d['train_split_tokens']:,} tokens; one epoch "
              f"of {T}-token windows is {d['tokens_per_epoch']:,})") if d.get("epochs") else ""
    return ["## Setup", "", "| | |", "|---|---|",
            f"| model | Phi-2 family: {mc.n_layer} layers, d={mc.n_embd}, {mc.n_head} heads (head_dim {mc.head_dim}, "
            f"rotary {mc.rotary_dim}), d_ff={mc.intermediate_size}, vocab rows {mc.vocab_size:,} |",
            f"| token budget | {results['tokens_budget']:,} tokens per run = {ref.max_steps} steps x "
            f"{mb * acc * study.nproc} sequences x {T} tokens{epochs} |",
            f"| seeds | {', '.join(map(str, study.seeds))}: seed S sets the initial weights (train.seed) and the "
            "order of the training windows (data.seed) of every route |",
            f"| optimizer | {study.label(results['reference'])}: lr {o.lr:g}, betas ({o.beta1}, {o.beta2}), eps "
            f"{o.eps:g}, weight decay {o.weight_decay:g}, grad clip {o.grad_clip:g}; cosine to "
            f"{o.lr * o.min_lr_ratio:g} after {o.warmup_steps} warmup steps; other routes: their overrides below |",
            f"| validation | {ref.eval_batches} batches x {mb} x {T} tokens of held-out documents, every "
            f"{ref.eval_interval} steps; the same windows for every route and seed |",
            "| data order | per seed, the same windows in the same order for every route (LitGPT: `phiforge litgpt "
            "prepare` for that seed) |",
            f"| machine | {m.get('gpu') or m['cpu']} ({m['cpus']} CPUs); torch {m['torch']}"
            + (f", litgpt {m['litgpt']}, litdata {m['litdata']}" if "litgpt" in m else "") + f"; {results['date']} |",
            ""]


def _routes_table(routes: dict) -> list[str]:
    L = ["## Routes", "", "Active parameters count the routed experts at top_k / num_experts (router and "
         "LayerNorms included); `set` are the route's overrides of the shared `train` keys.", "",
         "| route | trainer | set | params | active params | init (first seed) |", "|---|---|---|---|---|---|"]
    for r in routes.values():
        sets = "<br>".join(f"`{s}`" for s in r["set"]) or "-"
        L.append(f"| {r['label']} | {r['trainer']} | {sets} | {_millions(r['params'])} | "
                 f"{_millions(r['active_params'])} ({r['active_params']:,}) | {r['init'] or '-'} |")
    return L + [""]


def _headline(routes: dict) -> list[str]:
    cols = [m for m in METRICS]
    L = ["## Results", "", "Mean ± standard deviation over seeds (n - 1).", "",
         "| route | " + " | ".join(c[1] for c in cols) + " | seeds |", "|---" * (len(cols) + 2) + "|"]
    for r in routes.values():
        L.append(f"| {r['label']} | " + " | ".join(fmt_agg(r["aggregates"][c[0]], c[2]) for c in cols)
                 + f" | {len(r['seeds'])} |")
    return L + [""]


def _metric(key: str) -> tuple:
    return next(m for m in METRICS if m[0] == key)


def exceeding(results: dict, metric: str) -> list[dict]:
    return [row for row in results["significance"] if row["metric"] == metric and row["exceeds_2se"]]


def _significance(study, results: dict) -> list[str]:
    ref = study.label(results["reference"])
    L = ["## Which differences are real", "",
         f"Each route against {ref}, seed by seed (the seeds share initial weights and data order across routes): "
         "the mean of the per-seed differences (route - reference), its standard error sd / sqrt(n), and whether "
         "|mean| > 2 SE. The unpaired column (difference of the means, Welch SE) ignores the pairing.", ""]
    for row in results["significance"]:
        _, title, spec, better = _metric(row["metric"])
        if row["metric"] not in ("val_bpb", "cloze_acc"):
            continue
        side = "lower" if row["mean_diff"] < 0 else "higher"
        verdict = "unknown with one seed" if row["exceeds_2se"] is None else \
            ("more than two standard errors" if row["exceeds_2se"] else "within two standard errors")
        L.append(f"- {study.label(row['route'])}: {title} {format(abs(row['mean_diff']), spec)} {side} than {ref} "
                 f"(better is {better}; paired over {row['n']} seeds, SE {_fmt(row['se'], spec)}): {verdict}.")
    L += ["", "| route vs " + ref + " | metric | paired diff ± SE | seeds | > 2 SE | unpaired diff ± SE | > 2 SE |",
          "|---|---|---|---|---|---|---|"]
    yes = {True: "**yes**", False: "no", None: "-"}
    for row in results["significance"]:
        _, title, spec, _ = _metric(row["metric"])
        u = row["unpaired"] or {}
        unp = f"{format(u['diff'], '+' + spec)} ± {_fmt(u.get('se'), spec)}" if u else "-"
        L.append(f"| {study.label(row['route'])} | {title} | {format(row['mean_diff'], '+' + spec)} ± "
                 f"{_fmt(row['se'], spec)} | {row['n']} | {yes[row['exceeds_2se']]} | {unp} | "
                 f"{yes[u.get('exceeds_2se')]} |")
    return L + [""]


def _per_seed(routes: dict) -> list[str]:
    cols = [m for m in METRICS]
    L = ["## Every run", "", "| route | seed | " + " | ".join(c[1] for c in cols) + " | load avg before -> after |",
         "|---" * (len(cols) + 3) + "|"]
    for r in routes.values():
        for seed, s in r["seeds"].items():
            load = "{:.1f} -> {:.1f}".format(*s["loadavg_1min"]) if s.get("loadavg_1min") else "-"
            L.append(f"| {r['label']} | {seed} | " + " | ".join(_fmt(s[c[0]], c[2]) for c in cols) + f" | {load} |")
    return L + ["", "Peak memory: peak GPU memory allocated where there is a GPU, else the peak resident memory of "
                "the run's processes (wait4 ru_maxrss). tokens/s: steady training throughput (tokens over training "
                "seconds between log events, without the first interval, where LitGPT compiles, and without "
                "intervals that contain a validation). train s: the trainer's own clock; wall s: the whole "
                "process, start-up and compilation included. Runs ran one after another; other work on the "
                "machine slows every run it overlaps (the load average column).", ""]


PLOT_TITLES = {"val_bpb_vs_tokens.png": "Validation bpb vs tokens (mean ± sd over seeds)",
               "cloze_acc_vs_tokens.png": "gutenberg-cloze accuracy vs tokens (first items, while training)",
               "tokens_per_s.png": "Throughput", "cloze_acc.png": "gutenberg-cloze accuracy (final checkpoints)",
               "peak_memory.png": "Peak memory"}


def markdown(study, results: dict, plots: list[str], ref, reproduce: str, samples: dict) -> str:
    routes = results["routes"]
    L = [f"# {study.title or study.name}", ""]
    if study.description:
        L += [study.description.strip(), ""]
    L += ["Reproduce (writes this directory; runs and data under `" + study.work_dir + "`; finished runs are "
          "skipped when it runs again):", "", "```bash", reproduce, "```", ""]
    L += _setup(study, results, ref) + _routes_table(routes) + _headline(routes)
    scope = next(iter(next(iter(routes.values()))["seeds"].values()))["eval"].get("val_bpb_on", "validation windows")
    L += [f"val bpb and val loss: each run's final checkpoint (LitGPT's converted) scored the same way, on the "
          f"{scope}. cloze acc: gutenberg-cloze accuracy (`phiforge eval`); '-' where it was not measured.", ""]
    L += _significance(study, results) + _per_seed(routes)
    if results["checks"]:
        L += ["## Checks (means over seeds)", "", "| check | value | result |", "|---|---|---|"]
        L += [f"| {c['check']} | {c['value']} | {'PASS' if c['pass'] else 'FAIL'} |" for c in results["checks"]]
        L.append("")
    L += ["## Plots", ""]
    for p in plots:
        L += [f"### {PLOT_TITLES.get(p, p)}", "", f"![{PLOT_TITLES.get(p, p)}]({p})", ""]
    s = study.samples
    L += ["## Samples", "", f"Each route's final checkpoint of seed {study.seeds[0]} (LitGPT's converted with "
          f"`convert from-litgpt`), temperature {s.temperature}, top-k {s.top_k}, seed {s.seed}, "
          f"{s.max_new_tokens} new tokens.", ""]
    for name, smps in samples.items():
        L += [f"**{routes[name]['label']}**", ""]
        L += [f"> {(x['prompt'] + x['completion']).replace(chr(10), ' ').strip()}" for x in smps] + [""]
    L += ["## Files", "", "`results.json` (every per-seed number, the aggregates and the comparisons), "
          "`metrics/<route>/seed-<S>.jsonl` (each run's events in phiforge's format), `study.yaml` (the resolved "
          "study config), `readme-section.md` (the README's results block).", ""]
    return "\n".join(L)


# ---------------------------------------------------------------------------------------------
# The README's results block


README_START = "<!-- study-results:start (written by `phiforge study --readme README.md` from results.json) -->"
README_END = "<!-- study-results:end -->"
README_COLUMNS = (("val_bpb", "val bpb"), ("cloze_acc", "cloze acc"), ("steady_tokens_per_s", "tokens/s"))


def _bpb_finding(study, results: dict) -> str:
    routes, ref = results["routes"], study.label(results["reference"])
    ranked = sorted((r for r in routes.values() if r["aggregates"]["val_bpb"]),
                    key=lambda r: r["aggregates"]["val_bpb"]["mean"])
    if not ranked:
        return "No run measured validation bpb."
    real = [f"{study.label(row['route'])} ({row['mean_diff']:+.4f})" for row in exceeding(results, "val_bpb")]
    n = max(len(r["seeds"]) for r in routes.values())
    verb = "differs" if len(real) == 1 else "differ"
    return (f"Over {n} seed{'s' if n > 1 else ''} of {results['tokens_budget']:,} tokens per run, "
            f"{ranked[0]['label']} reached the lowest validation bpb "
            f"({fmt_agg(ranked[0]['aggregates']['val_bpb'], '.4f')}); "
            + (f"{', '.join(real)} {verb} from {ref} by more than two standard errors (paired per seed)" if real
               else f"no route's bpb differs from {ref} by more than two standard errors (paired per seed)") + ".")


def _speed_cloze_finding(results: dict) -> str:
    routes = results["routes"].values()
    speed = [r for r in routes if r["aggregates"]["steady_tokens_per_s"]]
    fast = max(speed, key=lambda r: r["aggregates"]["steady_tokens_per_s"]["mean"]) if speed else None
    cloze = [r for r in routes if r["aggregates"]["cloze_acc"]]
    best = max(cloze, key=lambda r: r["aggregates"]["cloze_acc"]["mean"]) if cloze else None
    first = (f"{fast['label']} trained fastest ({fast['aggregates']['steady_tokens_per_s']['mean']:,.0f} tokens/s); "
             if fast else "Throughput was not measured (too few log intervals); ")
    second = (f"{best['label']} had the best gutenberg-cloze accuracy "
              f"({fmt_agg(best['aggregates']['cloze_acc'], '.3f')})" if best else
              "gutenberg-cloze accuracy is not measured yet")
    return f"{first}{second}."


def findings(study, results: dict) -> str:
    """Two sentences: the best route on val bpb and which routes differ from the reference beyond 2 SE; the
    fastest route and the best cloze accuracy."""
    return f"{_bpb_finding(study, results)} {_speed_cloze_finding(results)}"


def readme_section(study, results: dict, base: Path) -> str:
    """The README's results block, its links relative to `base` (the README's folder)."""
    def rel(p) -> str:
        return Path(os.path.relpath(Path(p).resolve(), base)).as_posix()

    report = rel(study.report_dir)
    L = ["| route | " + " | ".join(t for _, t in README_COLUMNS) + " | seeds |",
         "|---" * (len(README_COLUMNS) + 2) + "|"]
    for r in results["routes"].values():
        L.append(f"| {r['label']} | " + " | ".join(fmt_agg(r["aggregates"][k], _metric(k)[2]) for k, _ in
                                                  README_COLUMNS) + f" | {len(r['seeds'])} |")
    L += ["", f"![validation bpb vs tokens, mean ± sd over seeds]({report}/val_bpb_vs_tokens.png)", "",
          findings(study, results), "",
          f"Mean ± sd over seeds. Full report, with the significance tests and every run: [{report}/report.md]"
          f"({report}/report.md) (numbers: [{report}/results.json]({report}/results.json))."
          + (f" The same study at scale: [{study.larger_study}]({rel(study.larger_study)})." if study.larger_study
             else "")]
    return "\n".join(L) + "\n"


def _readme_block(text: str, path) -> tuple[int, int]:
    from phiforge.errors import PhiforgeError

    start, end = text.find(README_START), text.find(README_END)
    if start < 0 or end < start or text.count(README_START) != 1 or text.count(README_END) != 1:
        raise PhiforgeError(f"{path} has no results block: add the line '{README_START}' and, below it, "
                            f"'{README_END}' where the results go")
    return start + len(README_START), end


def check_readme(path) -> None:
    from phiforge.errors import PhiforgeError
    from phiforge.fileio import read_user_text

    _readme_block(read_user_text(path, PhiforgeError, "README"), path)


def write_readme(path, section: str) -> None:
    """Rewrite the block between README_START and README_END (nothing else)."""
    from phiforge.errors import PhiforgeError
    from phiforge.fileio import read_user_text, write_text_atomic

    text = read_user_text(path, PhiforgeError, "README")
    a, b = _readme_block(text, path)
    write_text_atomic(Path(path), text[:a] + "\n" + section + text[b:])
