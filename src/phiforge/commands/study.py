"""`phiforge study --config studies/NAME.yaml`: phiforge dense, phiforge MoE and LitGPT on one data set and token
budget; writes docs/results/NAME/report.md with plots (docs/litgpt.md)."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("study", help="train one architecture through several routes and write a results report")
    p.add_argument("--config", required=True, help="study YAML (see studies/)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="override a study key, e.g. --set train.max_steps=50 (repeatable)")
    p.add_argument("--routes", metavar="NAME,...", help="run only these routes (the report covers every route run)")
    p.add_argument("--report-only", action="store_true", help="rewrite the report from the runs already there")
    p.add_argument("--overwrite", action="store_true",
                   help="use work_dir and report_dir even if they hold something else (their contents are deleted)")
    p.set_defaults(func=run)


def run(args) -> int:
    from phiforge.litgpt.study import load_study, run_study

    study = load_study(args.config, args.sets)
    only = [r.strip() for r in args.routes.split(",") if r.strip()] if args.routes else None
    if only:
        unknown = sorted(set(only) - {r.name for r in study.routes})
        if unknown:
            from phiforge.errors import ConfigError

            raise ConfigError(f"unknown route(s) {', '.join(unknown)} (study has: "
                              f"{', '.join(r.name for r in study.routes)})")
    import shlex

    reproduce = " ".join(["phiforge study --config", shlex.quote(str(args.config)),
                          *(f"--set {shlex.quote(s)}" for s in args.sets)])
    res = run_study(study, only=only, report_only=args.report_only, overwrite=args.overwrite, reproduce=reproduce)
    for name, r in res["routes"].items():
        vl = f"{r['val_loss']:.4f}" if r["val_loss"] is not None else "n/a"
        tps = f"{r['steady_tokens_per_s']:,.0f}" if r["steady_tokens_per_s"] else "n/a"
        print(f"{name:<20} val loss {vl}  steady tokens/s {tps}  wall {r['wall_s'] or 0:.0f} s")
    for c in res["checks"]:
        print(f"{'PASS' if c['pass'] else 'FAIL'}  {c['check']}: {c['value']}")
    print(f"wrote {study.report_dir}/report.md")
    return 0
