"""`bertforge augment`: TinyBERT data augmentation of a task's training set."""
from pipeline.cli.common import add_glue_dir, add_task, print_json


def add_parser(sub):
    p = sub.add_parser(
        "augment", help="augment a task's training set (TinyBERT: masked-LM and GloVe word replacement)",
        description="Writes a TSV in the task's layout (for `distill --train-file`) and OUT.json saying which "
                    "candidate source was used. Without --mlm every word takes GloVe neighbours.")
    add_task(p)
    add_glue_dir(p)
    p.add_argument("--input-file", default=None, help="TSV in the task's layout instead of GLUE train")
    p.add_argument("--out", required=True, help="the augmented TSV")
    p.add_argument("--mlm", default=None, help="masked LM (hub id or folder) for single-piece words")
    p.add_argument("--mlm-head-on", default=None, metavar="ENCODER",
                   help="no masked LM at hand: fit a masked-LM head on this frozen BERT encoder over the task's text")
    p.add_argument("--mlm-head-steps", type=int, default=600, help="training steps of that head")
    p.add_argument("--glove", default=None, help="GloVe text file (default: packaged glove.6B 50-d)")
    p.add_argument("--p", type=float, default=0.4, help="probability of replacing a candidate word")
    p.add_argument("--k", type=int, default=15, help="candidates per word")
    p.add_argument("--n", type=int, default=20, help="variants drawn per example (per side of a pair)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=256, help="masked sentence copies per masked-LM forward")
    p.add_argument("--max-length", type=int, default=128, help="word-pieces the masked LM sees")
    p.add_argument("--max-examples", type=int, default=None)
    p.add_argument("--device", default=None, help="cpu | cuda (default: cuda when available)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
    p.set_defaults(func=run)


def run(args):
    from pipeline.distill.augment import AugmentConfig, augment_dataset

    cfg = AugmentConfig(task=args.task, out=args.out, glue_dir=args.glue_dir, input_file=args.input_file, mlm=args.mlm,
                        mlm_head_on=args.mlm_head_on, mlm_head_steps=args.mlm_head_steps,
                        glove=args.glove, p=args.p, k=args.k, n=args.n, seed=args.seed, batch_size=args.batch_size,
                        max_length=args.max_length, max_examples=args.max_examples, device=args.device,
                        num_threads=args.threads)
    manifest = augment_dataset(cfg)
    print_json({k: manifest[k] for k in ("file", "candidates", "examples_in", "examples_out", "wall_s", "examples_per_s")})
