"""`bertforge finetune`: flags from FinetuneConfig."""
from pipeline.cli.common import add_config_args, add_resume, add_tracking, configure_tracking, config_from_args, print_json
from pipeline.finetune import FinetuneConfig


def add_parser(sub):
    p = sub.add_parser("finetune", help="fine-tune a model on a GLUE task (a teacher)")
    add_config_args(p, FinetuneConfig, groups={"loop": "training"})
    add_resume(p)
    add_tracking(p)
    p.set_defaults(func=run)


def run(args):
    from pipeline.finetune import finetune

    configure_tracking(args)
    manifest = finetune(config_from_args(FinetuneConfig, args), resume=args.resume)
    print_json({"out": args.out, "dev": manifest.metrics["dev"], "wall_s": manifest.wall_s})
