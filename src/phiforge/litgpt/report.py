"""The study report: numbers from each route's RUN/metrics.jsonl, PNG plots, sample generations, report.md."""

from __future__ import annotations

import json
import math
import os
import platform
import shutil
import time
from pathlib import Path

import yaml

from phiforge.config import to_dict


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


def _params(ckpt: Path) -> tuple[int, int]:
    """(total, active per token) parameters of a checkpoint's model: MoE experts count at top_k / num_experts."""
    import torch

    from phiforge.checkpoint import read_config
    from phiforge.model import MoE, Phi2
    from phiforge.model.init import on_meta

    cfg = read_config(ckpt)
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


def summarize(study, state: dict) -> dict:
    from phiforge.checkpoint import resolve_checkpoint

    work = Path(study.work_dir)
    routes = {}
    for r in study.routes:
        run = work / "runs" / r.name
        events = read_events(run / "metrics.jsonl")
        if not events:
            continue
        evals = [e for e in events if e.get("event") == "eval"]
        trains = [e for e in events if e.get("event") == "train"]
        end = next((e for e in reversed(events) if e.get("event") == "end"), {})
        outer = state.get("routes", {}).get(r.name, {})
        ckpt = resolve_checkpoint(run)
        total, active = _params(ckpt)
        gpu_mem = [e["peak_mem_gib"] for e in trains if e.get("peak_mem_kind") == "cuda_max_allocated"]
        if r.trainer == "litgpt":
            lit = _lit_gpu_memory(run / "litgpt.log")
            gpu_mem = [lit] if lit is not None else []
        final = evals[-1] if evals else {}
        routes[r.name] = {
            "label": r.label or r.name, "trainer": r.trainer, "set": r.set,
            "params": total, "active_params": active,
            "tokens": final.get("tokens"), "steps": final.get("step"),
            "val_loss": final.get("val_loss"), "val_ppl": math.exp(final["val_loss"]) if final else None,
            "val_loss_start": evals[0]["val_loss"] if evals else None,
            "steady_tokens_per_s": steady_tokens_per_s(events),
            "train_seconds": trains[-1].get("elapsed_s") if trains else None,
            "wall_s": outer.get("wall_s", end.get("wall_s")),
            "peak_rss_gib": outer.get("peak_rss_gib", end.get("peak_rss_gib")),
            "peak_gpu_mem_gib": max(gpu_mem) if gpu_mem else None,
            "curve": [{"step": e["step"], "tokens": e["tokens"], "val_loss": e["val_loss"],
                       "elapsed_s": e.get("elapsed_s")} for e in evals],
            "throughput": [{"step": e["step"], "tokens": e["tokens"], "tokens_per_s": e.get("tokens_per_s"),
                            "elapsed_s": e.get("elapsed_s")} for e in trains],
            "checkpoint": str(ckpt), "command": outer.get("command"), "init": outer.get("init"),
            "loadavg_1min": outer.get("loadavg_1min"),
        }
    return routes


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


def _plots(routes: dict, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    names = list(routes)
    colors = {n: f"C{i}" for i, n in enumerate(names)}

    def save(fig, name):
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        files.append(name)

    for xkey, xlabel, fname in (("tokens", "training tokens", "val_loss_vs_tokens.png"),
                                ("elapsed_s", "training wall-clock (s)", "val_loss_vs_time.png")):
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        for n in names:
            pts = [(p[xkey], p["val_loss"]) for p in routes[n]["curve"] if p[xkey] is not None]
            if pts:
                ax.plot(*zip(*pts), marker="o", ms=3, label=routes[n]["label"], color=colors[n])
        ax.set_xlabel(xlabel)
        ax.set_ylabel("validation loss")
        ax.grid(alpha=0.3)
        ax.legend()
        save(fig, fname)

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4.0), gridspec_kw={"width_ratios": [1, 1.6]})
    vals = [routes[n]["steady_tokens_per_s"] or 0 for n in names]
    bars = a1.bar([routes[n]["label"] for n in names], vals, color=[colors[n] for n in names])
    a1.bar_label(bars, labels=[f"{v:,.0f}" for v in vals], fontsize=8)
    a1.set_ylabel("steady tokens/s")
    a1.tick_params(axis="x", labelrotation=15)
    for n in names:
        pts = [(p["step"], p["tokens_per_s"]) for p in routes[n]["throughput"][1:] if p["tokens_per_s"]]
        if pts:
            a2.plot(*zip(*pts), marker=".", label=routes[n]["label"], color=colors[n])
    a2.set_xlabel("step")
    a2.set_ylabel("tokens/s per log interval")
    a2.grid(alpha=0.3)
    a2.legend(fontsize=8)
    save(fig, "tokens_per_s.png")

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    gpu = all(routes[n]["peak_gpu_mem_gib"] for n in names)
    key, label = ("peak_gpu_mem_gib", "peak GPU memory (GiB)") if gpu else ("peak_rss_gib", "peak RSS (GiB)")
    vals = [routes[n][key] or 0 for n in names]
    bars = ax.bar([routes[n]["label"] for n in names], vals, color=[colors[n] for n in names])
    ax.bar_label(bars, labels=[f"{v:.2f}" for v in vals], fontsize=8)
    ax.set_ylabel(label)
    ax.tick_params(axis="x", labelrotation=15)
    save(fig, "peak_memory.png")
    return files


def _fmt(v, spec: str, none: str = "-") -> str:
    return none if v is None else format(v, spec)


def write_report(study, state: dict, trains: dict, overwrite: bool = False, reproduce: str | None = None) -> dict:
    """Write report_dir in place (files of others there are kept). Refuses, writing nothing, when no route has
    run yet. reproduce: the command shown under "Reproduce" (default: one naming the study.yaml written here)."""
    from phiforge.errors import PhiforgeError
    from phiforge.fileio import open_output_dir
    from phiforge.litgpt.study import _train_config, tokens_budget

    routes = summarize(study, state)
    if not routes:
        raise PhiforgeError(f"no route of study {study.name} has run yet (no metrics under "
                            f"{Path(study.work_dir) / 'runs'}): run `phiforge study` without --report-only first")
    for r in routes.values():
        r["samples"] = _samples(study, Path(r["checkpoint"]))
    checks = _checks(study, routes)
    out = open_output_dir(study.report_dir, "study-report", [Path(study.work_dir) / "runs", study.data.dataset],
                          overwrite)
    plots = _plots(routes, out)
    (out / "metrics").mkdir(exist_ok=True)
    for name in routes:
        shutil.copyfile(Path(study.work_dir) / "runs" / name / "metrics.jsonl", out / "metrics" / f"{name}.jsonl")
    (out / "study.yaml").write_text(yaml.safe_dump(to_dict(study), sort_keys=False), encoding="utf-8")
    ref = _train_config(trains[study.reference_route.name])
    results = {"study": study.name, "date": time.strftime("%Y-%m-%d"), "machine": _machine(),
               "tokens_budget": tokens_budget(trains[study.reference_route.name], study.nproc),
               "data_seconds": state.get("data_seconds"), "checks": checks,
               "routes": {n: {k: v for k, v in r.items() if k not in ("throughput",)} for n, r in routes.items()}}
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    reproduce = reproduce or f"phiforge study --config {Path(study.report_dir) / 'study.yaml'}"
    (out / "report.md").write_text(_markdown(study, routes, checks, plots, results, ref, reproduce),
                                   encoding="utf-8")
    return results


def _markdown(study, routes: dict, checks: list[dict], plots: list[str], results: dict, ref, reproduce: str) -> str:
    m = results["machine"]
    mc = ref.model_config()
    mc.moe = None
    o = ref.optim
    T, mb, acc = ref.data.seq_len, ref.micro_batch_size, ref.grad_accum_steps
    L = [f"# {study.title or study.name}", ""]
    if study.description:
        L += [study.description.strip(), ""]
    L += ["Reproduce (writes this directory; runs and data under `" + study.work_dir + "`):", "",
          "```bash", reproduce, "```", "",
          "## Setup", "",
          "| | |", "|---|---|",
          f"| model | Phi-2 family: {mc.n_layer} layers, d={mc.n_embd}, {mc.n_head} heads (head_dim {mc.head_dim}, "
          f"rotary {mc.rotary_dim}), d_ff={mc.intermediate_size}, vocab rows {mc.vocab_size:,} |",
          f"| token budget | {results['tokens_budget']:,} tokens per route = {ref.max_steps} steps x "
          f"{mb * acc * study.nproc} sequences x {T} tokens |",
          f"| optimizer | AdamW lr {o.lr:g}, betas ({o.beta1}, {o.beta2}), eps {o.eps:g}, weight decay "
          f"{o.weight_decay:g}, grad clip {o.grad_clip:g}; cosine to {o.lr * o.min_lr_ratio:g} after "
          f"{o.warmup_steps} warmup steps |",
          f"| validation | {ref.eval_batches} batches x {mb} x {T} tokens of held-out documents, every "
          f"{ref.eval_interval} steps; the same windows for every route |",
          "| init | " + ("; ".join(f"{r['label']}: {r['init']}" for r in routes.values() if r.get("init"))
                          or "each trainer its own") + " |",
          f"| data order | the same windows in the same order for every route (`phiforge litgpt prepare`) |",
          f"| machine | {m.get('gpu') or m['cpu']} ({m['cpus']} CPUs); torch {m['torch']}"
          + (f", litgpt {m['litgpt']}, litdata {m['litdata']}" if "litgpt" in m else "") + f"; {results['date']} |",
          "", "## Results", "",
          "| route | trainer | params (active) | tokens | final val loss | val ppl | steady tokens/s | "
          "train s | wall s | peak mem GiB |",
          "|---|---|---|---|---|---|---|---|---|---|"]
    for r in routes.values():
        mem = r["peak_gpu_mem_gib"] if r["peak_gpu_mem_gib"] else r["peak_rss_gib"]
        act = f"{r['params'] / 1e6:.2f}M" + (f" ({r['active_params'] / 1e6:.2f}M)" if r["active_params"] != r["params"] else "")
        L.append(f"| {r['label']} | {r['trainer']} | {act} | {_fmt(r['tokens'], ',')} | {_fmt(r['val_loss'], '.4f')} | "
                 f"{_fmt(r['val_ppl'], ',.1f')} | {_fmt(r['steady_tokens_per_s'], ',.0f')} | "
                 f"{_fmt(r['train_seconds'], '.0f')} | {_fmt(r['wall_s'], '.0f')} | {_fmt(mem, '.2f')} |")
    mem_kind = "peak GPU memory allocated" if any(r["peak_gpu_mem_gib"] for r in routes.values()) else \
        "peak resident memory of the route's processes (wait4 ru_maxrss)"
    loads = [f"{r['label']} {r['loadavg_1min'][0]:.1f} -> {r['loadavg_1min'][1]:.1f}" for r in routes.values()
             if r.get("loadavg_1min")]
    L += ["", f"Peak memory: {mem_kind}. Steady tokens/s: training tokens over training seconds between log "
          "events, without the first interval (warm-up; LitGPT compiles its model there) and without intervals "
          "that contain a validation. train s: the trainer's own training clock; wall s: the whole process, "
          "start-up and compilation included."
          + (f" Routes ran one after another; the machine's 1-minute load average before -> after each: "
             f"{', '.join(loads)} (other work on the machine slows every route it overlaps)." if loads else ""), ""]
    if checks:
        L += ["## Checks", "", "| check | value | result |", "|---|---|---|"]
        L += [f"| {c['check']} | {c['value']} | {'PASS' if c['pass'] else 'FAIL'} |" for c in checks]
        L.append("")
    titles = {"val_loss_vs_tokens.png": "Validation loss vs tokens", "val_loss_vs_time.png":
              "Validation loss vs training wall-clock", "tokens_per_s.png": "Throughput",
              "peak_memory.png": "Peak memory"}
    L += ["## Plots", ""]
    for p in plots:
        L += [f"### {titles.get(p, p)}", "", f"![{titles.get(p, p)}]({p})", ""]
    s = study.samples
    L += ["## Samples", "", f"Each final checkpoint (LitGPT's converted with `convert from-litgpt`), "
          f"temperature {s.temperature}, top-k {s.top_k}, seed {s.seed}, {s.max_new_tokens} new tokens.", ""]
    for r in routes.values():
        L += [f"**{r['label']}**", ""]
        for smp in r["samples"]:
            text = (smp["prompt"] + smp["completion"]).replace("\n", " ").strip()
            L += [f"> {text}", ""]
    L += ["## Files", "", "`results.json` (every number above), `metrics/<route>.jsonl` (each run's events in "
          "phiforge's format), `study.yaml` (the resolved study config).", ""]
    return "\n".join(L)
