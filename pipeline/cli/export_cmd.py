"""`bertforge export`: flags from ExportConfig."""
from pipeline.cli.common import add_config_args, config_from_args, print_json
from pipeline.export import ExportConfig


def add_parser(sub):
    p = sub.add_parser("export", help="export a PyTorch classifier to ONNX, validate it, fuse it for ONNX Runtime")
    add_config_args(p, ExportConfig)
    p.set_defaults(func=run)


def run(args):
    from pipeline.export import export

    m = export(config_from_args(ExportConfig, args))
    print_json({"out": args.out, "precision": m.precision, "validation": m.params["validation"],
                "fused_ops": m.params.get("fused_ops"), "dev": m.metrics.get("dev"), "size_bytes": m.size_bytes})
