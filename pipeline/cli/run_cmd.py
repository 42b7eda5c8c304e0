from pipeline.cli.common import print_json


def add_parser(sub):
    p = sub.add_parser("run", help="the whole pipeline from one YAML config into one run folder (re-run resumes)")
    p.add_argument("--config", default=None, help="YAML file (see configs/); omitted: the built-in quick-start defaults")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="override config values, e.g. --set task=mrpc distill.prediction_epochs=1 out=runs/mrpc")
    p.set_defaults(func=run)


def run(args):
    from pipeline.run import load_run_config, run_pipeline

    cfg = load_run_config(args.config, args.set)
    made = run_pipeline(cfg)
    print_json({name: str(path) for name, path in made.items()})
