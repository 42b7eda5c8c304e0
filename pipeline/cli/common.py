"""Arguments several commands share, and the flags built from a stage's config dataclass.

A stage's config dataclass (`FinetuneConfig`, `PruneConfig`, ...) is the one definition of its settings:
`add_config_args` makes one flag per field (`--max-length` for `max_length`; a nested dataclass such as
`loop` contributes its own fields), with the field's default and its `metadata["help"]`, and
`config_from_args` builds the dataclass back from the parsed arguments. Defaults cannot drift apart.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import types
import typing
from typing import Any

from pipeline.errors import BertforgeError


def _field_types(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _plain_type(tp) -> tuple[Any, bool]:
    """(the type without None, whether None is allowed) for `X | None` and `Optional[X]`."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0], True
    return tp, False


def _default(f: dataclasses.Field, defaults) -> Any:
    if defaults is not None:
        return getattr(defaults, f.name)
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def add_config_args(parser, cls, skip: tuple[str, ...] = (), prefix: str = "", dest: str = "",
                    defaults: Any = None, groups: dict[str, str] | None = None) -> None:
    """One flag per field of dataclass `cls` (recursing into dataclass fields; `groups` names an argument
    group per nested field). `prefix` goes before flag names (`--kd-alpha`), `dest` before attribute names."""
    hints = _field_types(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        default = _default(f, defaults)
        tp, optional = _plain_type(hints[f.name])
        if dataclasses.is_dataclass(tp):
            title = (groups or {}).get(f.name)
            target = parser.add_argument_group(title) if title else parser
            nested_prefix = NESTED_PREFIX.get(f.name, "")
            add_config_args(target, tp, prefix=nested_prefix, dest=f"{dest}{f.name}.",
                            defaults=None if default is dataclasses.MISSING else default)
            continue
        meta = f.metadata
        flag = meta.get("flag") or "--" + (prefix + f.name).replace("_", "-")
        kw: dict[str, Any] = {"dest": dest + f.name, "help": meta.get("help") or None}
        if meta.get("env") and os.environ.get(meta["env"]):
            default = os.environ[meta["env"]]
        if tp is bool:
            # a flag that turns a default off is named for that (`--no-eval`), one that turns it on for the setting
            kw.update(action="store_false" if default else "store_true", default=default)
            if default and kw["help"]:
                kw["help"] = f"turn off: {kw['help']}"
        else:
            item = typing.get_args(tp)[0] if typing.get_origin(tp) is list else tp
            if typing.get_origin(tp) is list:
                kw["nargs"] = "+"
            kw["type"] = item if item in (int, float) else str
            if meta.get("choices"):
                kw["choices"] = list(meta["choices"])
            if not meta.get("choices"):
                kw["metavar"] = meta.get("metavar") or f.name.upper()
            if default is dataclasses.MISSING:
                kw["required"] = True
            else:
                kw["default"] = default
                if default is not None and kw["help"] is not None:
                    kw["help"] += f" (default: {' '.join(map(str, default)) if isinstance(default, list) else default})"
        parser.add_argument(flag, **kw)


# Nested sections whose flags carry the section's name: `--kd-alpha`, `--theseus-slope`, ...
NESTED_PREFIX = {"kd": "kd-", "theseus": "theseus-", "early_exit": "early-exit-"}


def config_from_args(cls, args: argparse.Namespace, dest: str = "", skip: tuple[str, ...] = (), **given):
    """The dataclass `cls` from the attributes `add_config_args` made; `given` sets skipped fields."""
    hints = _field_types(cls)
    values = dict(given)
    for f in dataclasses.fields(cls):
        if f.name in skip or f.name in values:
            continue
        tp, _ = _plain_type(hints[f.name])
        if dataclasses.is_dataclass(tp):
            values[f.name] = config_from_args(tp, args, dest=f"{dest}{f.name}.")
        elif hasattr(args, dest + f.name):
            values[f.name] = getattr(args, dest + f.name)
    return cls(**values)


def parse_value(cls, name: str, raw: str) -> Any:
    """A `KEY=VALUE` string converted to the type of field `name` of dataclass `cls`."""
    tp, optional = _plain_type(_field_types(cls)[name])
    if optional and raw.lower() in ("none", "null", ""):
        return None
    try:
        if tp is bool:
            return raw.lower() in ("1", "true", "yes", "on")
        return tp(raw) if tp in (int, float) else raw
    except ValueError:
        raise BertforgeError(f"{name}={raw!r} is not a {tp.__name__}") from None


def add_resume(p: argparse.ArgumentParser) -> None:
    p.add_argument("--resume", action="store_true", help="continue an interrupted run from its last checkpoint")


def add_glue_dir(p: argparse.ArgumentParser) -> None:
    """For commands without a config dataclass (loadtest)."""
    from pipeline.data import GLUE_DIR_HELP

    p.add_argument("--glue-dir", default=os.environ.get("GLUE_DIR"), help=GLUE_DIR_HELP)


def print_json(obj) -> None:
    json.dump(obj, sys.stdout, indent=2)
    sys.stdout.write("\n")


def add_task(p: argparse.ArgumentParser, required: bool = True) -> None:
    """For commands without a config dataclass (eval)."""
    from pipeline.data import GLUE_TASKS

    p.add_argument("--task", required=required, help=f"GLUE task: {', '.join(GLUE_TASKS)}")


def add_tracking(p: argparse.ArgumentParser) -> None:
    """`--report-to` and `--logging-dir` of the training commands and `bertforge run` (pipeline/tracking.py)."""
    from pipeline.tracking import TrackingConfig

    add_config_args(p.add_argument_group("experiment tracking"), TrackingConfig)


def configure_tracking(args: argparse.Namespace, default_dir: str | os.PathLike | None = None) -> None:
    """Send this process's training loops where `--report-to` says (checked before any training starts)."""
    from pipeline.tracking import TrackingConfig, configure

    cfg = config_from_args(TrackingConfig, args)
    if cfg.logging_dir is None and default_dir is not None:
        cfg.logging_dir = str(default_dir)
    configure(cfg)
