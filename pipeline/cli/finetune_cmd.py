from pipeline.cli.common import add_glue_dir, add_loop, add_task, loop_config, print_json


def add_parser(sub):
    p = sub.add_parser("finetune", help="fine-tune a model on a GLUE task (a teacher)")
    add_task(p)
    p.add_argument("--model", required=True, help="hub id, model folder, or all-MiniLM-L6-v2 (packaged, offline)")
    add_glue_dir(p)
    p.add_argument("--train-file", default=None, help="TSV in the task's layout instead of GLUE train")
    p.add_argument("--max-train-examples", type=int, default=None)
    p.add_argument("--max-length", type=int, default=None, help="default 64 (single sentence) / 128 (pairs)")
    p.add_argument("--out", required=True)
    add_loop(p, epochs=3, lr=5e-5)
    p.set_defaults(func=run)


def run(args):
    from pipeline.finetune import FinetuneConfig, finetune

    cfg = FinetuneConfig(task=args.task, model=args.model, out=args.out, glue_dir=args.glue_dir,
                         train_file=args.train_file, max_train_examples=args.max_train_examples,
                         max_length=args.max_length, num_threads=args.threads, loop=loop_config(args))
    manifest = finetune(cfg, resume=args.resume)
    print_json({"out": args.out, "dev": manifest.metrics["dev"], "wall_s": manifest.wall_s})
