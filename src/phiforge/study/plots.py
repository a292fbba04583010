"""The study report's PNG plots, from results.summarize()'s routes: validation bpb and gutenberg-cloze accuracy
against tokens with a band for the spread over seeds, and bars (mean ± sd over seeds) for throughput, final
gutenberg-cloze accuracy and peak memory."""

from __future__ import annotations

from pathlib import Path


def _bands(ax, routes: dict, colors: dict, key: str, ylabel: str) -> None:
    """Each route's curve r[key] (mean over seeds at each step) with a band of ± sd."""
    for n, r in routes.items():
        pts = r.get(key)
        if not pts:
            continue
        x = [p["tokens"] for p in pts]
        mean = [p["mean"] for p in pts]
        ax.plot(x, mean, marker="o", ms=3, color=colors[n], label=f"{r['label']} (n={len(r['seeds'])})")
        ax.fill_between(x, [m - p["sd"] for m, p in zip(mean, pts)], [m + p["sd"] for m, p in zip(mean, pts)],
                        color=colors[n], alpha=0.2, linewidth=0)
    ax.set_xlabel("training tokens")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "not measured", ha="center", va="center", transform=ax.transAxes)


def _bars(ax, routes: dict, colors: dict, key: str, ylabel: str, spec: str) -> None:
    """Mean ± sd bars of one metric ("not measured" on the axes when no route has it)."""
    names = [n for n in routes if routes[n]["aggregates"].get(key)]
    ax.set_ylabel(ylabel)
    if not names:
        ax.text(0.5, 0.5, "not measured", ha="center", va="center", transform=ax.transAxes)
        ax.set_xticks([])
        return
    aggs = [routes[n]["aggregates"][key] for n in names]
    bars = ax.bar([routes[n]["label"] for n in names], [a["mean"] for a in aggs],
                  yerr=[a["sd"] or 0.0 for a in aggs], capsize=4, color=[colors[n] for n in names])
    ax.bar_label(bars, labels=[format(a["mean"], spec) for a in aggs], fontsize=8, label_type="center")
    ax.tick_params(axis="x", labelrotation=20)


def write_plots(routes: dict, out: Path) -> None:
    """Write val_bpb_vs_tokens.png, cloze_acc_vs_tokens.png, tokens_per_s.png, cloze_acc.png and peak_memory.png
    into out."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {n: f"C{i}" for i, n in enumerate(routes)}

    def save(fig, name):
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)

    for key, ylabel, name in (("band", "validation bits per byte", "val_bpb_vs_tokens.png"),
                              ("cloze_band", "gutenberg-cloze accuracy", "cloze_acc_vs_tokens.png")):
        fig, ax = plt.subplots(figsize=(6.8, 4.4))
        _bands(ax, routes, colors, key, ylabel)
        save(fig, name)
    for key, ylabel, spec, name in (("steady_tokens_per_s", "steady tokens/s", ",.0f", "tokens_per_s.png"),
                                    ("cloze_acc", "gutenberg-cloze accuracy", ".3f", "cloze_acc.png"),
                                    ("peak_mem_gib", "peak memory (GiB)", ".2f", "peak_memory.png")):
        fig, ax = plt.subplots(figsize=(6.8, 4.0))
        _bars(ax, routes, colors, key, ylabel, spec)
        ax.set_title("mean ± sd over seeds", fontsize=9)
        save(fig, name)
