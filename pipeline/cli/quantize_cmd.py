from pipeline.cli.common import add_glue_dir, print_json


def add_parser(sub):
    p = sub.add_parser("quantize", help="int8 (ONNX Runtime or neural-compressor) or fp16 quantization")
    p.add_argument("--model", required=True, help="ONNX artifact (dynamic/static/fp16) or PyTorch artifact (inc-*)")
    p.add_argument("--out", required=True)
    p.add_argument("--mode", choices=["dynamic", "static", "fp16", "inc-dynamic", "inc-static"], default="dynamic")
    p.add_argument("--task", default=None, help="default: the model's config.finetuning_task")
    add_glue_dir(p)
    p.add_argument("--tolerance", type=float, default=None,
                   help="accuracy-aware: allowed relative dev-score drop (0.01 = 1%%); sensitive nodes stay float")
    p.add_argument("--per-channel", action="store_true")
    p.add_argument("--calibration-examples", type=int, default=256)
    p.add_argument("--calibration-method", choices=["minmax", "entropy", "percentile"], default="minmax")
    p.add_argument("--eval-examples", type=int, default=None, help="dev examples scored (default: all)")
    p.add_argument("--max-length", type=int, default=None)
    p.set_defaults(func=run)


def run(args):
    from pipeline.quantize import QuantizeConfig, quantize

    cfg = QuantizeConfig(model=args.model, out=args.out, mode=args.mode, task=args.task, glue_dir=args.glue_dir,
                         per_channel=args.per_channel, calibration_examples=args.calibration_examples,
                         calibration_method=args.calibration_method, tolerance=args.tolerance,
                         eval_examples=args.eval_examples, max_length=args.max_length)
    m = quantize(cfg)
    aware = m.params.get("accuracy_aware")
    print_json({"out": args.out, "precision": m.precision, "dev": m.metrics.get("dev"),
                "source_dev": m.metrics.get("source_dev"), "agreement": m.params.get("agreement_with_source"),
                "excluded_nodes": aware["excluded_nodes"] if aware else None, "size_bytes": m.size_bytes})
