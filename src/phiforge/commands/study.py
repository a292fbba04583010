"""`phiforge study --config studies/NAME.yaml`: several routes (phiforge dense, MoE placements, optimizers, LitGPT)
on one data set and token budget, each with several seeds; writes docs/results/NAME/report.md with plots
(docs/litgpt.md)."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("study", help="train one architecture through several routes and seeds and write a report")
    p.add_argument("--config", required=True, help="study YAML (see studies/)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="override a study key, e.g. --set train.max_steps=50 or --set seeds=[0] (repeatable)")
    p.add_argument("--routes", metavar="NAME,...", help="run only these routes (the report covers every route run)")
    p.add_argument("--rerun", action="store_true",
                   help="run (route, seed) runs again that finished earlier (default: skip them)")
    p.add_argument("--report-only", action="store_true", help="rewrite the report from the runs already there")
    p.add_argument("--readme", metavar="README.md",
                   help="also rewrite this file's results block (between its study-results markers)")
    p.add_argument("--overwrite", action="store_true",
                   help="use work_dir and report_dir even if they hold something else (their contents are deleted)")
    p.set_defaults(func=run)


def run(args) -> int:
    from phiforge.study.config import load_study
    from phiforge.study.report import fmt_agg
    from phiforge.study.runner import run_study

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
                          *([f"--routes {shlex.quote(args.routes)}"] if args.routes else []),
                          *(f"--set {shlex.quote(s)}" for s in args.sets)])
    res = run_study(study, only=only, report_only=args.report_only, overwrite=args.overwrite, reproduce=reproduce,
                    rerun=args.rerun, readme=args.readme)
    for name, r in res["routes"].items():
        a = r["aggregates"]
        print(f"{name:<20} val bpb {fmt_agg(a['val_bpb'], '.4f')}  tokens/s {fmt_agg(a['steady_tokens_per_s'], ',.0f')}"
              f"  ({len(r['seeds'])} seed(s))")
    for row in res["significance"]:
        if row["exceeds_2se"]:
            print(f"> 2 SE  {row['route']} vs {res['reference']}: {row['metric']} {row['mean_diff']:+.4g} "
                  f"(SE {row['se']:.2g}, {row['n']} seeds)")
    for c in res["checks"]:
        print(f"{'PASS' if c['pass'] else 'FAIL'}  {c['check']}: {c['value']}")
    print(f"wrote {study.report_dir}/report.md" + (f" and the results block of {args.readme}" if args.readme else ""))
    return 0
