from pipeline.cli.common import add_glue_dir, add_loop, add_task, loop_config, print_json


def add_parser(sub):
    p = sub.add_parser("prune", help="structured (heads, FFN neurons) or unstructured pruning")
    add_task(p)
    p.add_argument("--model", required=True, help="PyTorch classifier artifact folder")
    p.add_argument("--out", required=True)
    add_glue_dir(p)
    p.add_argument("--heads", type=float, default=0.0, help="fraction of attention heads to remove")
    p.add_argument("--ffn", type=float, default=0.0, help="fraction of FFN neurons to remove")
    p.add_argument("--target-params", type=int, default=None,
                   help="parameter budget: remove the same fraction of heads and neurons until the model fits")
    p.add_argument("--per-layer", action="store_true", help="the same fraction in every layer (default: global ranking)")
    p.add_argument("--unstructured", type=float, default=0.0,
                   help="magnitude sparsity of encoder weights (shrinks the gzipped file only, no speed-up)")
    p.add_argument("--importance-examples", type=int, default=1024, help="training examples scoring heads and neurons")
    p.add_argument("--max-length", type=int, default=None)
    p.add_argument("--recover-epochs", type=int, default=0,
                   help="epochs of prediction-layer distillation from the unpruned model afterwards")
    p.add_argument("--max-train-examples", type=int, default=None)
    add_loop(p, epochs=1, lr=5e-5)
    p.set_defaults(func=run)


def run(args):
    from pipeline.prune import PruneConfig, prune

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    cfg = PruneConfig(model=args.model, task=args.task, out=args.out, glue_dir=args.glue_dir, heads=args.heads,
                      ffn=args.ffn, target_params=args.target_params, per_layer=args.per_layer,
                      unstructured=args.unstructured, importance_examples=args.importance_examples,
                      max_length=args.max_length, recover_epochs=args.recover_epochs,
                      max_train_examples=args.max_train_examples, loop=loop_config(args))
    m = prune(cfg, resume=args.resume)
    print_json({"out": args.out, "params_before": m.params["before"]["params"], "params_after": m.num_parameters,
                "heads": m.params["after"]["heads"], "ffn": m.params["after"]["ffn"], "dev": m.metrics["dev"],
                "dev_before_recovery": m.metrics["dev_before_recovery"]})
