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

COMMANDS = ["finetune", "eval", "distill", "augment", "prune", "trim-vocab", "quantize", "export", "run", "serve",
            "loadtest", "bench", "report"]


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The CLI's parser; with `only`, just that command's (its module alone is imported: `bertforge serve`
    then never imports torch through the training commands)."""
    parser = argparse.ArgumentParser(prog="bertforge", description="Distil, compress, export, serve and benchmark BERT models.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS if only is None else [only]:
        try:
            module = importlib.import_module(f"pipeline.cli.{name.replace('-', '_')}_cmd")
        except ModuleNotFoundError as e:
            if e.name and e.name.split(".")[0] in ("pipeline", "serving"):
                raise
            # a slim install (bertforge[serve]) lacks torch and the training stack: say so when used
            stub = sub.add_parser(name, help=f"(needs `pip install bertforge[all]`: {e.name} is not installed)",
                                  add_help=False, prefix_chars="\0")  # takes any arguments, to say what is missing
            stub.add_argument("args", nargs="*")
            stub.set_defaults(func=_needs_full_install(name, e.name))
            continue
        module.add_parser(sub)
    return parser


def _needs_full_install(command: str, missing: str):
    def fail(args):
        raise BertforgeError(f"needs the full install (`pip install bertforge[all]`): {missing} is not installed")
    return fail


def quiet_third_party_logs() -> None:
    """torchao (pulled in by transformers' quantizers) warns at import about CUDA kernels a CPU build
    lacks, and torch's pytree about deprecations: noise on every command, not the user's concern."""
    for name in ("torchao", "torch.utils._pytree"):
        logging.getLogger(name).setLevel(logging.ERROR)


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    quiet_third_party_logs()
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(argv[0] if argv and argv[0] in COMMANDS else None).parse_args(argv)
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
