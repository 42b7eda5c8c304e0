"""`bertforge eval`: flags from EvalConfig."""
from pathlib import Path

from pipeline.cli.common import add_config_args, config_from_args, print_json
from pipeline.evaluate import EvalConfig


def add_parser(sub):
    p = sub.add_parser("eval", help="score an artifact (PyTorch or ONNX) on a GLUE dev split")
    add_config_args(p, EvalConfig)
    p.add_argument("--out", default=None, help="JSON file for the metrics (default: MODEL/eval-TASK-SPLIT.json)")
    p.add_argument("--verify", action="store_true", help="check every file's sha256 against bertforge.json first")
    p.add_argument("--record-dev", action="store_true",
                   help="write the dev score into the artifact's manifest, naming the score it had as 'selection' "
                        "(for a model whose checkpoint was kept on rows carved from train, e.g. a budget search's "
                        "student: bench and report read the manifest's dev score)")
    p.set_defaults(func=run)


def run(args):
    if args.verify:
        from pipeline.artifacts import verify_artifact

        verify_artifact(args.model, sha256=True)
    from pipeline.evaluate import evaluate
    from pipeline.inference import dump

    cfg = config_from_args(EvalConfig, args)
    if args.record_dev:
        from pipeline.artifacts import read_manifest
        from pipeline.errors import BertforgeError

        if cfg.split is not None or read_manifest(cfg.model) is None:
            raise BertforgeError("--record-dev scores the dev split (no --split) of a bertforge artifact (bertforge.json)")
    result = evaluate(cfg.model, cfg.task, cfg.glue_dir, cfg.split, cfg.max_length, cfg.batch_size)
    if args.record_dev:
        from pipeline.evaluate import score_dev_once

        score_dev_once(cfg.model, cfg.task, dev=result.metrics)  # scored above: recorded, not scored again
    out = args.out or (Path(cfg.model) / f"eval-{result.task}-{result.split}.json" if Path(cfg.model).is_dir() else None)
    if out:
        dump(result.as_dict(), out)
    print_json(result.as_dict())
