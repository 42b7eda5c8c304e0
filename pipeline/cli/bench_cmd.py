"""`bertforge bench`: flags from BenchConfig, plus the artifacts and the BERT-base baseline."""
from pathlib import Path

from pipeline.bench import BenchConfig
from pipeline.cli.common import add_config_args, config_from_args, print_json


def add_parser(sub):
    p = sub.add_parser("bench", help="latency, throughput, size, memory and cold start of artifacts, side by side")
    p.add_argument("--models", nargs="+", required=True, metavar="[NAME=]DIR",
                   help="artifact folders (PyTorch or ONNX); NAME= sets the row label (default: the folder name)")
    p.add_argument("--out", required=True, help="bench JSON file to write")
    add_config_args(p, BenchConfig)
    g = p.add_argument_group("BERT-base baseline")
    g.add_argument("--baseline", action="store_true",
                   help="add BERT-base in PyTorch fp32 and ONNX Runtime int8 (bert-base-uncased, else a same-shape random model)")
    g.add_argument("--baseline-dir", default=None, help="where the baseline artifacts are built and reused (default: beside --out)")
    g.add_argument("--baseline-model", default="bert-base-uncased", metavar="HUB_ID|DIR",
                   help="BERT-base to compare with: a fine-tuned classifier (e.g. textattack/bert-base-uncased-SST-2, "
                        "or a folder) is the accurate baseline, scored on the dev split; a base model gives speed and "
                        "size only (default: bert-base-uncased)")
    g.add_argument("--baseline-task", default=None, help="label count of the baseline (default: the first model's task, else sst2)")
    g.add_argument("--baseline-shape", nargs="+", default=None, metavar="FIELD=VALUE",
                   help="override BertConfig fields of the shape-only baseline (e.g. a small stand-in for a quick check)")
    p.add_argument("--final", default=None, help="name of the final artifact for the report (default: the last model)")
    p.add_argument("--teacher", default=None, help="name or path of the teacher (default: found from stages and lineage)")
    p.set_defaults(func=run, parser=p)


def command_line(args) -> str:
    """The command as the user would retype it (quoted in the report): every flag whose value differs from its
    default, read off the parser, so a new flag can never go missing from the record."""
    parts = ["bertforge bench"]
    for action in args.parser._actions:
        if not action.option_strings or action.dest in ("help",):
            continue
        value = getattr(args, action.dest, action.default)
        if value == action.default and action.required is False:
            continue
        flag = action.option_strings[-1]
        if value is True:
            parts.append(flag)
        elif isinstance(value, (list, tuple)):
            parts += [flag, *map(str, value)]
        else:
            parts += [flag, str(value)]
    return " ".join(parts)


def parse_shape(items: list[str] | None) -> dict | None:
    from pipeline.errors import BertforgeError

    if not items:
        return None
    shape = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not value.isdigit():
            raise BertforgeError(f"--baseline-shape takes FIELD=INTEGER pairs, got {item!r}")
        shape[key] = int(value)
    return shape


def run(args):
    from pipeline.artifacts import read_manifest
    from pipeline.bench import ArtifactSpec, benchmark_artifacts, write_bench

    cfg = config_from_args(BenchConfig, args)
    specs = [ArtifactSpec.parse(m) for m in args.models]
    if args.baseline:
        from pipeline.baseline import build_baseline

        first = read_manifest(specs[0].path)
        task = args.baseline_task or (first.task if first and first.task else "sst2")
        folder = Path(args.baseline_dir) if args.baseline_dir else Path(args.out).resolve().parent / "bert-base-baseline"
        built = build_baseline(folder, task=task, hub_id=args.baseline_model, shape=parse_shape(args.baseline_shape),
                               glue_dir=args.glue_dir, max_length=args.max_length)
        specs += [ArtifactSpec("bert-base-torch-fp32", built["torch_fp32"]), ArtifactSpec("bert-base-ort-int8", built["ort_int8"])]
    result = benchmark_artifacts(specs, cfg)
    result.update(final=args.final, teacher=args.teacher, command=command_line(args))
    write_bench(result, args.out)
    print_json({"out": args.out, "results": [{k: r[k] for k in ("artifact", "device", "batch_size", "seq_len", "p50_ms",
                                                                   "p99_ms", "throughput_seq_s")} for r in result["results"]]})
