"""`bertforge quantize`: flags from QuantizeConfig."""
from pipeline.cli.common import add_config_args, config_from_args, print_json
from pipeline.quantize import QuantizeConfig


def add_parser(sub):
    p = sub.add_parser("quantize", help="int8 (ONNX Runtime or neural-compressor) or fp16 quantization")
    add_config_args(p, QuantizeConfig)
    p.set_defaults(func=run)


def run(args):
    from pipeline.quantize import quantize

    m = quantize(config_from_args(QuantizeConfig, args))
    aware = m.params.get("accuracy_aware")
    print_json({"out": args.out, "precision": m.precision, "dev": m.metrics.get("dev"),
                "source_dev": m.metrics.get("source_dev"), "agreement": m.params.get("agreement_with_source"),
                "excluded_nodes": aware["excluded_nodes"] if aware else None, "size_bytes": m.size_bytes})
