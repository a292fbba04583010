"""The study report, from results.py's numbers: report.md (setup, routes, results over seeds, which differences
are real, every run, checks, plots, sample generations), results.json, the PNG plots (plots.py), each run's
metrics.jsonl, and the README's results block."""

from __future__ import annotations

import os
import platform
import shutil
import time
from pathlib import Path

import yaml

from phiforge.config import to_dict
from phiforge.study.config import seeded, tokens_budget, train_config
from phiforge.study.plots import write_plots
from phiforge.study.results import METRICS, checks_on_means, significance, summarize


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

    from phiforge.generate import generate
    from phiforge.model_files import load_checkpoint
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
    ref = train_config(seeded(trains[study.reference_route.name], study.seeds[0]))
    results = {"study": study.name, "date": time.strftime("%Y-%m-%d"), "machine": _machine(), "seeds": study.seeds,
               "reference": study.reference_route.name, "tokens_budget": tokens_budget(seeded(
                   trains[study.reference_route.name], 0), study.nproc),
               "data": state.get("data", {}), "data_seconds": state.get("data_seconds"),
               "significance": significance(study, routes), "checks": checks_on_means(study, routes),
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
