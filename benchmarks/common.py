"""What the benchmark scripts share: result files that travel between machines.

A results row names folders and files, and the command that made it; written as absolute paths they
describe the machine that ran it (`/work/...`, `/home/me/...`) and mean nothing on a clone. Every script
writes its JSON through `write_results`, which rewrites paths inside the repository relative to it, paths
inside the GLUE folder as `$GLUE_DIR/...`, and any other absolute path as `<external>/NAME`.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
# Top-level folders an absolute path on a Linux or macOS machine starts with; what `ABSOLUTE` looks for
# (also after a label's colon, as in `masked-lm:/work/...`; a URL's `://` never matches, its next character being `/`).
_ROOTS = ("work", "root", "tmp", "home", "Users", "mnt", "data", "opt", "var", "srv", "scratch", "private", "media")
ABSOLUTE = re.compile(r"(?<![\w./~$<>-])/(?:%s)(?=/|\b)[^\s\"',;=]*" % "|".join(_ROOTS))


def _glue_dirs() -> list[Path]:
    dirs = [REPO.parent / "shared" / "glue_data"]
    if os.environ.get("GLUE_DIR"):
        dirs.insert(0, Path(os.environ["GLUE_DIR"]))
    return [d.resolve() for d in dirs]


def portable_path(path: str | Path, repos: tuple[Path, ...] = ()) -> str:
    """`path` as a results file may record it. `repos`: more checkouts whose paths count as the repository's
    (a result written from another worktree of the same project)."""
    p = Path(path)
    if not p.is_absolute():
        return p.as_posix()
    p = Path(os.path.normpath(p))
    for glue in _glue_dirs():
        if p == glue or glue in p.parents:
            return "$GLUE_DIR" + ("/" + p.relative_to(glue).as_posix() if p != glue else "")
    for root in (REPO, *repos):
        if p == root or root in p.parents:
            return p.relative_to(root).as_posix() or "."
    return f"<external>/{p.name}"


def portable_text(text: str, repos: tuple[Path, ...] = ()) -> str:
    """`text` (a command line, a note) with every absolute path in it made portable."""
    # The checkout and the GLUE folder may sit under any top-level folder (CI clones into /check/...),
    # so their own prefixes are looked for too, not only the usual roots.
    known = sorted({str(p) for p in (REPO, *repos, *_glue_dirs())}, key=len, reverse=True)
    pattern = re.compile(r"(?<![\w./~$<>-])(?:%s|/(?:%s))(?=/|\b)[^\s\"',;=]*"
                         % ("|".join(map(re.escape, known)), "|".join(_ROOTS)))
    return pattern.sub(lambda m: portable_path(m.group(0), repos), text)


def portable(obj: Any, repos: tuple[Path, ...] = ()) -> Any:
    """A JSON-able value with every string in it made portable."""
    if isinstance(obj, str):
        return portable_text(obj, repos)
    if isinstance(obj, dict):
        return {k: portable(v, repos) for k, v in obj.items()}
    if isinstance(obj, list):
        return [portable(v, repos) for v in obj]
    return obj


def command_line() -> str:
    """The command that runs this script, as a user types it from the repository root."""
    return portable_text(shlex.join(["python", Path(sys.argv[0]).as_posix(), *sys.argv[1:]]))


def write_results(path: str | Path, obj: Any, indent: int = 2) -> None:
    """Write `obj` as JSON with no absolute machine paths in it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(portable(obj), indent=indent) + "\n")


def git_commit() -> str | None:
    """The commit the results were made from, with `+dirty` when the working tree had changes."""
    import subprocess

    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    commit = head.stdout.strip()
    return (commit + ("+dirty" if dirty.stdout.strip() else "")) if commit else None


def input_checksums(**paths: str | Path | None) -> dict[str, str | None]:
    """sha256 of each input file (for a model folder: of its weights file), keyed by a short name."""
    from pipeline.artifacts import sha256

    out = {}
    for name, path in paths.items():
        if path is None:
            out[name] = None
            continue
        p = Path(path)
        if p.is_dir():
            weights = [w for w in ("model.safetensors", "pytorch_model.bin", "model.onnx") if (p / w).is_file()]
            p = p / weights[0] if weights else p
        out[name] = sha256(p) if p.is_file() else None
    return out
