from pathlib import Path

from pipeline.cli.common import add_tracking, configure_tracking, print_json


def add_parser(sub):
    p = sub.add_parser("run", help="the whole pipeline from one YAML config into one run folder (re-run resumes)")
    p.add_argument("--config", default=None, help="YAML file (see configs/); omitted: the built-in quick-start defaults")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="override config values, e.g. --set task=mrpc distill.prediction_epochs=1 out=runs/mrpc")
    p.add_argument("--dry-run", action="store_true", help="only say which stages would be rebuilt and which skipped")
    add_tracking(p)
    b = p.add_argument_group("accuracy budget (the `budget:` section; docs/budget.md)")
    b.add_argument("--max-drop", type=float, metavar="POINTS",
                   help="search the compression settings for the fastest artifact within POINTS of the teacher")
    b.add_argument("--objective", choices=("latency", "size"), help="what the search minimises (default: latency)")
    b.add_argument("--max-latency-ms", type=float, metavar="MS", help="optional ceiling on batch-1 latency")
    b.add_argument("--max-size-mb", type=float, metavar="MB", help="optional ceiling on the model file size")
    b.add_argument("--confidence", type=float, metavar="P",
                   help="hold the budget against the drop's one-sided upper bound at confidence P (e.g. 0.9; a "
                        "paired bootstrap over the carved rows) instead of the measured drop")
    p.set_defaults(func=run)


def run(args):
    from pipeline.artifacts import read_manifest
    from pipeline.run import load_run_config, plan_pipeline, run_pipeline

    flags = {"max_drop": args.max_drop, "objective": args.objective, "max_latency_ms": args.max_latency_ms,
             "max_size_mb": args.max_size_mb, "confidence": args.confidence}
    cfg = load_run_config(args.config, [*args.set, *(f"budget.{k}={v}" for k, v in flags.items() if v is not None)])
    if args.dry_run:
        print_json(plan_pipeline(cfg))
        return
    configure_tracking(args, default_dir=Path(cfg.out) / "logs")  # every stage's runs in one tracking folder
    made = run_pipeline(cfg)
    summary = {}
    for name, path in made.items():
        manifest = read_manifest(path) if path.is_dir() else None
        summary[name] = {"path": str(path)}
        if manifest is not None:
            summary[name].update(format=manifest.format, precision=manifest.precision, dev_score=manifest.score,
                                 size_mb=round(manifest.size_bytes / 1e6, 1))
    if "report" in made:
        summary["report"]["html"] = str(made["report"] / "report.html")
    if cfg.budget.max_drop is not None:
        summary["budget"] = {"json": str(cfg.out) + "/budget/budget.json"}
    print_json(summary)
