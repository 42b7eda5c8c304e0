"""`bertforge trim-vocab`: flags from VocabConfig."""
from pipeline.cli.common import add_config_args, config_from_args, print_json
from pipeline.vocab import VocabConfig


def add_parser(sub):
    p = sub.add_parser("trim-vocab", help="keep the word pieces a task's training rows use (smaller embeddings)")
    add_config_args(p, VocabConfig)
    p.set_defaults(func=run)


def run(args):
    from pipeline.vocab import trim_vocab_for_task

    m = trim_vocab_for_task(config_from_args(VocabConfig, args))
    print_json({"out": args.out, "vocab_before": m.params["vocab_before"], "vocab_after": m.params["vocab_after"],
                "params_before": m.params["params_before"], "params_after": m.num_parameters,
                "dev_tokens": m.metrics.get("dev_tokens")})
