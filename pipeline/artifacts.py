"""Artifact folders and their manifest, `bertforge.json`.

Every stage reads a folder and writes a folder. The folder opens with the standard loaders
(`from_pretrained`, optimum's ORT models); the manifest says where it came from (lineage), how it was
made (parameters, seed, package versions), what it scores, how big it is and the sha256 of each file.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import shutil
import time
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from pipeline.atomic import atomic_write_json
from pipeline.errors import BertforgeError

MANIFEST = "bertforge.json"
_VERSIONED = ("bertforge", "torch", "transformers", "onnx", "onnxruntime", "optimum", "optimum-onnx",
              "neural-compressor", "neural-compressor-pt", "numpy")


@dataclass
class Manifest:
    stage: str
    task: str | None = None
    format: str = "pytorch"  # pytorch | onnx
    precision: str = "fp32"  # fp32 | fp16 | int8
    parent: str | None = None  # path or hub id this artifact was made from
    lineage: list[dict[str, Any]] = field(default_factory=list)  # ancestors, oldest first
    params: dict[str, Any] = field(default_factory=dict)
    seed: int | None = None
    metrics: dict[str, Any] = field(default_factory=dict)  # e.g. {"dev": {"accuracy": .., "score": ..}}
    num_parameters: int | None = None
    files: list[dict[str, Any]] = field(default_factory=list)  # {"path", "bytes", "sha256"}
    size_bytes: int = 0
    wall_s: float | None = None
    created: str = ""
    versions: dict[str, str] = field(default_factory=dict)
    platform: str = ""

    @property
    def score(self) -> float | None:
        return self.metrics.get("dev", {}).get("score")


def package_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in _VERSIONED:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


sha256 = _sha256  # the public name; `_sha256` where a `sha256=` flag shadows it


def file_records(folder: Path) -> list[dict[str, Any]]:
    """Every file of an artifact but the manifest itself and working sub-folders (checkpoints)."""
    records = []
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        if not path.is_file() or rel.name == MANIFEST or rel.parts[0] in ("checkpoints", "logs"):
            continue
        if rel.parts[0] == ".checkpoints.trash" or rel.name.startswith(f".{MANIFEST}.tmp"):
            continue  # left by a kill while the checkpoints were deleted or the manifest written
        records.append({"path": rel.as_posix(), "bytes": path.stat().st_size, "sha256": _sha256(path)})
    return records


def read_manifest(folder: str | os.PathLike) -> Manifest | None:
    """The manifest of an artifact folder, or None when it has none (a folder made elsewhere)."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise BertforgeError(f"{path} is not valid JSON: {e}") from None
    known = Manifest.__dataclass_fields__
    return Manifest(**{k: v for k, v in data.items() if k in known})


def write_manifest(folder: str | os.PathLike, manifest: Manifest) -> Manifest:
    """Fill in files, sizes, versions and lineage, then write `bertforge.json` into `folder`."""
    folder = Path(folder)
    manifest.files = file_records(folder)
    manifest.size_bytes = sum(f["bytes"] for f in manifest.files)
    manifest.created = manifest.created or time.strftime("%Y-%m-%dT%H:%M:%S%z")
    manifest.versions = manifest.versions or package_versions()
    manifest.platform = manifest.platform or f"{platform.system()} {platform.machine()} {platform.processor()}".strip()
    if manifest.parent and not manifest.lineage:
        manifest.lineage = lineage_of(manifest.parent)
    atomic_write_json(folder / MANIFEST, asdict(manifest), default=str)
    return manifest


def lineage_of(parent: str) -> list[dict[str, Any]]:
    """The parent's own lineage plus the parent itself (a hub id or a folder without manifest is a root)."""
    parent_manifest = read_manifest(parent) if Path(parent).is_dir() else None
    if parent_manifest is None:
        return [{"stage": "source", "path": str(parent)}]
    entry = {"stage": parent_manifest.stage, "path": str(parent), "score": parent_manifest.score,
             "format": parent_manifest.format, "precision": parent_manifest.precision,
             "size_bytes": parent_manifest.size_bytes}
    return [*parent_manifest.lineage, entry]


def damaged_files(folder: str | os.PathLike, sha256: bool = False) -> list[tuple[str, str]]:
    """(path, what is wrong) for each file whose size (and, with `sha256`, checksum) no longer matches
    the manifest; empty for an intact folder and for one without a manifest."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    if manifest is None:
        return []
    bad = []
    for rec in manifest.files:
        path = folder / rec["path"]
        if not path.is_file():
            bad.append((rec["path"], "is missing"))
        elif path.stat().st_size != rec["bytes"]:
            bad.append((rec["path"], f"has {path.stat().st_size} bytes, the manifest says {rec['bytes']}"))
        elif sha256 and _sha256(path) != rec["sha256"]:
            bad.append((rec["path"], "has another sha256 than the manifest's"))
    return bad


def verify_files(folder: str | os.PathLike) -> list[str]:
    """Files whose size or checksum no longer matches the manifest (empty list: intact)."""
    return [path for path, _ in damaged_files(folder, sha256=True)]


def verify_artifact(folder: str | os.PathLike, sha256: bool = False) -> None:
    """Refuse a damaged artifact in one line: a file listed in `bertforge.json` missing or of another size
    (cheap: every load checks it), or with `sha256` of other content. Hub ids and folders without a
    manifest pass: there is nothing to check them against."""
    if not Path(folder).is_dir():
        return
    bad = damaged_files(folder, sha256)
    if bad:
        path, problem = bad[0]
        more = f" (and {len(bad) - 1} more file(s))" if len(bad) > 1 else ""
        raise BertforgeError(f"artifact {folder} is damaged: {path} {problem}{more}; "
                             "copy it again or rebuild it")


def prepare_output_dir(out: str | os.PathLike, overwrite: bool = True) -> Path:
    """Create `out`; refuse to write into a folder that holds something other than an artifact. An old
    manifest goes first: it no longer describes the files about to be rewritten, and loads during the
    stage would check them against it."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise BertforgeError(f"output {out} exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)
    # Export and quantization work in a `tempfile` folder inside `out` (tmp + 8 characters); one that a
    # killed earlier attempt left behind would otherwise end up among the artifact's files.
    for stale in out.iterdir():
        if stale.is_dir() and re.fullmatch(r"tmp[a-z0-9_]{8}", stale.name):
            shutil.rmtree(stale, ignore_errors=True)
    return out


def replace_dir(src: Path, dst: Path) -> None:
    """Move folder `src` to `dst`, replacing it (used to publish a finished artifact atomically-ish)."""
    if dst.exists():
        shutil.rmtree(dst)
    src.replace(dst)
