"""`phiforge moe-report RUN_DIR [--out PNG]`: plot expert load over training from RUN_DIR/metrics.jsonl."""

from __future__ import annotations

import json
from pathlib import Path

from phiforge.errors import PhiforgeError


def register(sub) -> None:
    p = sub.add_parser("moe-report", help="plot MoE expert load and imbalance over training as a PNG")
    p.add_argument("run_dir", metavar="RUN_DIR", help="training run directory (holds metrics.jsonl)")
    p.add_argument("--out", default=None, help="PNG path (default: RUN_DIR/moe-load.png)")
    p.set_defaults(func=run)


def read_moe_events(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not Path(run_dir).is_dir():
        raise PhiforgeError(f"run directory not found: {run_dir}")
    if not path.exists():
        raise PhiforgeError(f"no metrics.jsonl in {run_dir}: not a training run directory")
    events = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:  # a line cut short by a crash
            continue
        if isinstance(rec, dict) and rec.get("event") == "moe":
            events.append(rec)
    if not events:
        raise PhiforgeError(f"{path} has no MoE metrics: the run's model has no MoE layers "
                            "(set model.moe) or it stopped before its first log step")
    return events


def plot_moe_report(events: list[dict], out: Path) -> Path:
    try:
        import matplotlib
    except ImportError:
        raise PhiforgeError("moe-report needs matplotlib: pip install 'phiforge[plot]'") from None
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    steps = [e["step"] for e in events]
    layers = sorted(events[-1]["layers"], key=int)
    fig, axes = plt.subplots(len(layers), 2, figsize=(11, 2.6 * len(layers)), squeeze=False)
    for row, layer in zip(axes, layers):
        loads = [e["layers"][layer]["load"] for e in events]  # [steps][experts]
        n_exp = len(loads[-1])
        for i in range(n_exp):
            row[0].plot(steps, [ld[i] for ld in loads], lw=1, label=f"e{i}")
        row[0].axhline(1 / n_exp, color="k", ls="--", lw=0.8)  # perfect balance
        row[0].set_ylabel(f"layer {layer}\nload share")
        row[1].plot(steps, [e["layers"][layer]["imbalance"] for e in events], color="C3", label="imbalance (max/mean)")
        dropped = [e["layers"][layer]["dropped"] for e in events]
        if any(dropped):
            twin = row[1].twinx()
            twin.plot(steps, dropped, color="C7", lw=0.8, ls=":")
            twin.set_ylabel("dropped (dotted)", color="C7")
        row[1].axhline(1.0, color="k", ls="--", lw=0.8)
    axes[0][0].set_title("expert load (share of routed tokens)")
    axes[0][1].set_title("imbalance = max load / mean load")
    if n_exp <= 16:
        axes[0][0].legend(ncol=min(8, n_exp), fontsize=7, loc="upper right")
    for ax in axes[-1]:
        ax.set_xlabel("step")
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def run(args) -> int:
    events = read_moe_events(Path(args.run_dir))
    out = plot_moe_report(events, Path(args.out) if args.out else Path(args.run_dir) / "moe-load.png")
    print(f"wrote {out} ({len(events)} log steps, {len(events[-1]['layers'])} MoE layers)")
    return 0
