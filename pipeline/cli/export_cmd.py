from pipeline.cli.common import add_glue_dir, print_json


def add_parser(sub):
    p = sub.add_parser("export", help="export a PyTorch classifier to ONNX, validate it, fuse it for ONNX Runtime")
    p.add_argument("--model", required=True, help="PyTorch artifact folder (teacher, student, pruned)")
    p.add_argument("--out", required=True)
    p.add_argument("--task", default=None, help="task whose dev examples validate the graph (default: the model's)")
    add_glue_dir(p)
    p.add_argument("--optimize", choices=["O2", "none"], default="O2", help="O2: onnxruntime BERT fusions")
    p.add_argument("--device", choices=["cpu", "gpu"], default="cpu", help="gpu: GPU fusions and fp16 weights")
    p.add_argument("--opset", type=int, default=None)
    p.add_argument("--atol", type=float, default=1e-4, help="largest |logit difference| allowed against PyTorch")
    p.add_argument("--validation-examples", type=int, default=256)
    p.add_argument("--max-length", type=int, default=None)
    p.add_argument("--no-eval", action="store_true", help="skip scoring the graph on the dev split")
    p.set_defaults(func=run)


def run(args):
    from pipeline.export import ExportConfig, export

    cfg = ExportConfig(model=args.model, out=args.out, task=args.task, glue_dir=args.glue_dir, optimize=args.optimize,
                       device=args.device, opset=args.opset, atol=args.atol,
                       validation_examples=args.validation_examples, max_length=args.max_length,
                       evaluate_dev=not args.no_eval)
    m = export(cfg)
    print_json({"out": args.out, "precision": m.precision, "validation": m.params["validation"],
                "fused_ops": m.params.get("fused_ops"), "dev": m.metrics.get("dev"), "size_bytes": m.size_bytes})
