"""How a stage's setting is declared: a dataclass field with its help text.

Each stage's config dataclass is the one definition of its settings. The run config composes those
dataclasses and the CLI builds its flags from them (`pipeline/cli/common.py`), so a default or a help text
lives in one place. `flag` names a CLI flag that differs from the field's name, `choices` the allowed values,
`env` an environment variable that supplies the CLI default.
"""
from __future__ import annotations

from dataclasses import MISSING, field
from typing import Any


def setting(default: Any = MISSING, help: str = "", *, factory: Any = MISSING, flag: str | None = None,
            choices: tuple | None = None, metavar: str | None = None, env: str | None = None) -> Any:
    meta = {"help": help}
    meta.update({k: v for k, v in dict(flag=flag, choices=choices, metavar=metavar, env=env).items() if v is not None})
    if factory is not MISSING:
        return field(default_factory=factory, metadata=meta)
    if default is MISSING:
        return field(metadata=meta)
    return field(default=default, metadata=meta)
