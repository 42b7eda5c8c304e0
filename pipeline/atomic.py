"""Writes that a kill -9 or a power cut cannot tear: a reader sees the old content or the new, never half.

The recipe is the classic one: write beside the target, flush and fsync, then rename over it (a rename
within one folder is atomic on POSIX and on Windows' `os.replace`), then fsync the folder so the rename
itself is on disk. A folder is published the same way, keeping the previous copy until the new one is
complete (see `publish_dir`).
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

COMPLETE = ".complete.json"  # written last into a published folder: its files and their sizes


def fsync_dir(folder: str | os.PathLike) -> None:
    """Make renames and new entries in `folder` durable (a no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_tree(folder: str | os.PathLike) -> None:
    """fsync every file under `folder`, then the folders themselves."""
    for root, _, files in os.walk(folder):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                os.fsync(f.fileno())
        fsync_dir(root)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode())


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int | None = 2, **kwargs) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=indent, **kwargs) + "\n")


def staging_dir(dst: str | os.PathLike) -> Path:
    """The folder beside `dst` in which its next version is written (emptied first)."""
    dst = Path(dst)
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def previous_dir(dst: str | os.PathLike) -> Path:
    dst = Path(dst)
    return dst.with_name(dst.name + ".prev")


def is_complete(folder: str | os.PathLike) -> bool:
    """Whether `folder` was finished by `publish_dir`: its marker is there and every file it lists has
    the recorded size (a half-deleted or half-copied folder fails this)."""
    marker = Path(folder) / COMPLETE
    try:
        sizes = json.loads(marker.read_text())["files"]
        return all((Path(folder) / name).stat().st_size == size for name, size in sizes.items())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def publish_dir(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """Replace folder `dst` with the finished folder `src` so that at every instant one complete copy
    exists under `dst` or `dst.prev`: `dst` moves to `dst.prev`, `src` moves to `dst`, then `dst.prev` goes.
    A kill between the two moves leaves only `dst.prev`, which `complete_candidates` falls back to.
    `src` gets a completion marker (its files and their sizes) written last."""
    src, dst = Path(src), Path(dst)
    sizes = {p.relative_to(src).as_posix(): p.stat().st_size for p in sorted(src.rglob("*"))
             if p.is_file() and p.name != COMPLETE}
    fsync_tree(src)
    atomic_write_json(src / COMPLETE, {"files": sizes})
    prev = previous_dir(dst)
    if dst.exists():
        # `dst` is complete (only ever made by the rename below), so an older `prev` may go now.
        shutil.rmtree(prev, ignore_errors=True)
        os.replace(dst, prev)
    os.replace(src, dst)
    fsync_dir(dst.parent)
    shutil.rmtree(prev, ignore_errors=True)
    return dst


def complete_candidates(dst: str | os.PathLike) -> list[Path]:
    """The complete copies of a folder published with `publish_dir`, newest first."""
    dst = Path(dst)
    return [p for p in (dst, previous_dir(dst)) if is_complete(p)]
