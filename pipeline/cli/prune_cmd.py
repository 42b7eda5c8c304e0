"""`bertforge prune`: flags from PruneConfig."""
from pipeline.cli.common import add_config_args, add_resume, add_tracking, configure_tracking, config_from_args, print_json
from pipeline.prune import PruneConfig


def add_parser(sub):
    p = sub.add_parser("prune", help="structured (heads, FFN neurons) or unstructured pruning")
    add_config_args(p, PruneConfig, groups={"loop": "recovery training"})
    add_resume(p)
    add_tracking(p)
    p.set_defaults(func=run)


def run(args):
    from pipeline.prune import prune

    configure_tracking(args)
    m = prune(config_from_args(PruneConfig, args), resume=args.resume)
    print_json({"out": args.out, "params_before": m.params["before"]["params"], "params_after": m.num_parameters,
                "heads": m.params["after"]["heads"], "ffn": m.params["after"]["ffn"], "dev": m.metrics.get("dev"),
                "dev_before_recovery": m.metrics.get("dev_before_recovery")})
