from pathlib import Path

from pipeline.cli.common import add_glue_dir, add_task, print_json


def add_parser(sub):
    p = sub.add_parser("eval", help="score an artifact (PyTorch or ONNX) on a GLUE dev split")
    add_task(p)
    p.add_argument("--model", required=True, help="artifact folder or hub id")
    add_glue_dir(p)
    p.add_argument("--split", default=None, help="default: dev (MNLI: dev_matched)")
    p.add_argument("--max-length", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--out", default=None, help="JSON file for the metrics (default: MODEL/eval-TASK-SPLIT.json)")
    p.add_argument("--verify", action="store_true", help="check every file's sha256 against bertforge.json first")
    p.set_defaults(func=run)


def run(args):
    if args.verify:
        from pipeline.artifacts import verify_artifact

        verify_artifact(args.model, sha256=True)
    from pipeline.evaluate import evaluate
    from pipeline.inference import dump

    result = evaluate(args.model, args.task, args.glue_dir, args.split, args.max_length, args.batch_size)
    out = args.out or (Path(args.model) / f"eval-{result.task}-{result.split}.json" if Path(args.model).is_dir() else None)
    if out:
        dump(result.as_dict(), out)
    print_json(result.as_dict())
