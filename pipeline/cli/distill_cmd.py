"""`bertforge distill`: TinyBERT transformer distillation (general or task stage) and its baselines."""
from pipeline.cli.common import add_glue_dir, add_loop, add_task, loop_config, print_json
from pipeline.distill import METHODS


def add_parser(sub):
    p = sub.add_parser(
        "distill", help="distil a teacher into a smaller student (TinyBERT general or task distillation)",
        description="General stage: --teacher PRETRAINED --corpus FILE. Task stage: --teacher FINETUNED --task T; "
                    "runs intermediate-layer then prediction-layer distillation with the paper's per-task schedule.")
    p.add_argument("--stage", choices=["general", "task"], required=True)
    p.add_argument("--method", choices=list(METHODS), default="tinybert",
                   help="tinybert: intermediate + prediction layers; pred-only: prediction layer only; "
                        "labels-only: the student trained on gold labels, no teacher signal")
    p.add_argument("--teacher", required=True, help="general: pretrained encoder; task: fine-tuned classifier folder")
    p.add_argument("--out", required=True)
    s = p.add_argument_group("student (choose one)")
    s.add_argument("--student-config", default=None,
                   help="tinybert-4l-312d | tinybert-6l-768d | CONFIG.json (random weights)")
    s.add_argument("--student", default=None, help="pretrained student folder or hub id (e.g. a general TinyBERT)")
    s.add_argument("--init-from-teacher", default=None, metavar="LAYERS",
                   help="copy teacher layers: a count (3: spread uniformly) or a list (2,4,6)")
    p.add_argument("--mapping", default="uniform", help="uniform | top | bottom | teacher layers like 3,6,9,12")
    add_task(p, required=False)
    add_glue_dir(p)
    p.add_argument("--train-file", default=None, help="task stage: TSV in the task's layout (e.g. augmented data)")
    p.add_argument("--corpus", default=None, help="general stage: text file, one text per line")
    p.add_argument("--max-train-examples", type=int, default=None)
    p.add_argument("--max-length", type=int, default=None, help="default 64 single sentence / 128 pairs; general 128")
    w = p.add_argument_group("losses")
    for name in ("embedding", "hidden", "attention", "prediction"):
        w.add_argument(f"--{name}-weight", type=float, default=1.0)
    w.add_argument("--temperature", type=float, default=1.0, help="prediction-layer soft cross-entropy temperature")
    w.add_argument("--no-teacher-cache", action="store_true", help="recompute the teacher's logits every epoch")
    w.add_argument("--method-option", action="append", default=[], metavar="KEY=VALUE",
                   help="a setting only the chosen method reads (repeatable)")
    t = p.add_argument_group("task stage schedule (defaults: the TinyBERT paper)")
    t.add_argument("--intermediate-epochs", type=int, default=None, help="default 20; 10 mnli/qqp/qnli; 50 cola")
    t.add_argument("--intermediate-lr", type=float, default=5e-5)
    t.add_argument("--prediction-epochs", type=int, default=3, help="also the labels-only epochs")
    t.add_argument("--prediction-lr", type=float, default=3e-5)
    add_loop(p, epochs=3, lr=1e-4)  # --epochs / --learning-rate: general stage
    p.set_defaults(func=run)


def _method_options(items: list[str]) -> dict:
    from pipeline.errors import BertforgeError

    opts = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise BertforgeError(f"--method-option {item!r} is not KEY=VALUE")
        opts[key] = value
    return opts


def run(args):
    from pipeline.distill import distill
    from pipeline.distill.config import DistillConfig, LossWeights
    from pipeline.distill.students import StudentSpec

    cfg = DistillConfig(
        stage=args.stage, teacher=args.teacher, out=args.out, method=args.method,
        student=StudentSpec(config=args.student_config, pretrained=args.student, init_from_teacher=args.init_from_teacher),
        mapping=args.mapping,
        weights=LossWeights(args.embedding_weight, args.hidden_weight, args.attention_weight, args.prediction_weight),
        temperature=args.temperature, task=args.task, glue_dir=args.glue_dir, train_file=args.train_file,
        corpus=args.corpus, max_train_examples=args.max_train_examples, max_length=args.max_length,
        intermediate_epochs=args.intermediate_epochs, intermediate_lr=args.intermediate_lr,
        prediction_epochs=args.prediction_epochs, prediction_lr=args.prediction_lr,
        cache_teacher=not args.no_teacher_cache, method_options=_method_options(args.method_option),
        num_threads=args.threads, loop=loop_config(args),
    )
    manifest = distill(cfg, resume=args.resume)
    print_json({"out": args.out, "stage": args.stage, "method": args.method, "dev": manifest.metrics.get("dev"),
                "num_parameters": manifest.num_parameters, "wall_s": manifest.wall_s})
