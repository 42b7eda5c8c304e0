from pathlib import Path

from pipeline.cli.common import add_tracking, configure_tracking, print_json


def add_parser(sub):
    p = sub.add_parser("run", help="the whole pipeline from one YAML config into one run folder (re-run resumes)")
    p.add_argument("--config", default=None, help="YAML file (see configs/); omitted: the built-in quick-start defaults")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="override config values, e.g. --set task=mrpc distill.prediction_epochs=1 out=runs/mrpc")
    p.add_argument("--dry-run", action="store_true", help="only say which stages would be rebuilt and which skipped")
    add_tracking(p)
    p.set_defaults(func=run)


def run(args):
    from pipeline.artifacts import read_manifest
    from pipeline.run import load_run_config, plan_pipeline, run_pipeline

    cfg = load_run_config(args.config, args.set)
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
    print_json(summary)
