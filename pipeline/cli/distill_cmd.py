"""`bertforge distill`: TinyBERT transformer distillation (general or task stage) and its baselines; flags
from DistillConfig (method options: `--kd-alpha`, `--theseus-slope`, `--early-exit-thresholds`, ...)."""
import dataclasses

from pipeline.cli.common import (add_config_args, add_resume, add_tracking, config_from_args, configure_tracking, parse_value,
                                 print_json)
from pipeline.distill.config import DistillConfig
from pipeline.errors import BertforgeError

# the DistillConfig section each method's options live in
OPTION_SECTIONS = {"kd": "kd", "theseus": "theseus", "early-exit": "early_exit"}


def add_parser(sub):
    p = sub.add_parser(
        "distill", help="distil a teacher into a smaller student (TinyBERT general or task distillation)",
        description="General stage: --teacher PRETRAINED --corpus FILE. Task stage: --teacher FINETUNED --task T; "
                    "runs intermediate-layer then prediction-layer distillation with the paper's per-task schedule.")
    add_config_args(p, DistillConfig, groups={"student": "student (choose one)", "weights": "losses",
                                              "kd": "kd method", "theseus": "theseus method",
                                              "early_exit": "early-exit method",
                                              "loop": "training (--epochs / --learning-rate: general stage)"})
    p.add_argument("--method-option", action="append", default=[], metavar="KEY=VALUE",
                   help="a setting of the chosen method's section (repeatable), e.g. alpha=0.5 for kd")
    add_resume(p)
    add_tracking(p)
    p.set_defaults(func=run)


def with_method_options(cfg: DistillConfig, items: list[str]) -> DistillConfig:
    """`--method-option KEY=VALUE` into the chosen method's typed section."""
    if not items:
        return cfg
    section = OPTION_SECTIONS.get(cfg.method)
    if section is None:
        raise BertforgeError(f"method {cfg.method} has no options")
    options = getattr(cfg, section)
    names = [f.name for f in dataclasses.fields(options)]
    values = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise BertforgeError(f"--method-option {item!r} is not KEY=VALUE")
        if key not in names:
            raise BertforgeError(f"method {cfg.method} has no option {key}; its options: {', '.join(names)}")
        values[key] = parse_value(type(options), key, raw)
    return dataclasses.replace(cfg, **{section: dataclasses.replace(options, **values)})


def run(args):
    from pipeline.distill import distill

    configure_tracking(args)
    cfg = with_method_options(config_from_args(DistillConfig, args), args.method_option)
    manifest = distill(cfg, resume=args.resume)
    print_json({"out": args.out, "stage": args.stage, "method": args.method, "dev": manifest.metrics.get("dev"),
                "num_parameters": manifest.num_parameters, "wall_s": manifest.wall_s})
