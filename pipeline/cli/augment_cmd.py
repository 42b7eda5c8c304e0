"""`bertforge augment`: TinyBERT data augmentation of a task's training set; flags from AugmentConfig."""
from pipeline.cli.common import add_config_args, config_from_args, print_json
from pipeline.distill.augment import AugmentConfig


def add_parser(sub):
    p = sub.add_parser(
        "augment", help="augment a task's training set (TinyBERT: masked-LM and GloVe word replacement)",
        description="Writes a TSV in the task's layout (for `distill --train-file`) and OUT.json saying which "
                    "candidate source was used. Without --mlm every word takes GloVe neighbours.")
    add_config_args(p, AugmentConfig)
    p.set_defaults(func=run)


def run(args):
    from pipeline.distill.augment import augment_dataset

    manifest = augment_dataset(config_from_args(AugmentConfig, args))
    print_json({k: manifest[k] for k in ("file", "candidates", "examples_in", "examples_out", "wall_s", "examples_per_s")})
