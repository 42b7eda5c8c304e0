"""`bertforge` command line: argument parsing and friendly errors only; the work is in library functions.

Each subcommand is a module here with `add_parser(subparsers)` and a `run(args)` function. Adding a
command is adding a module and its name to COMMANDS.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from pipeline.errors import BertforgeError

COMMANDS = ["finetune", "eval", "distill", "augment", "prune", "quantize", "export", "run", "serve",
            "loadtest", "bench", "report"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bertforge", description="Distil, compress, export, serve and benchmark BERT models.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        importlib.import_module(f"pipeline.cli.{name}_cmd").add_parser(sub)
    return parser


def quiet_third_party_logs() -> None:
    """torchao (pulled in by transformers' quantizers) warns at import about CUDA kernels a CPU build
    lacks, and torch's pytree about deprecations: noise on every command, not the user's concern."""
    for name in ("torchao", "torch.utils._pytree"):
        logging.getLogger(name).setLevel(logging.ERROR)


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    quiet_third_party_logs()
    args = build_parser().parse_args(argv)
    try:
        result = args.func(args)
    except BertforgeError as e:
        print(f"bertforge {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"bertforge {args.command}: interrupted (re-run with --resume to continue where it stopped)", file=sys.stderr)
        return 130
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
