"""Atomic, checksummed snapshots of an index directory.

Layout of an index at ``ROOT``::

    ROOT/CURRENT          the name of the live snapshot ("v000003"), replaced by rename(2)
    ROOT/v000003/         manifest.json (sha256 of every file) + the files one save() wrote
    ROOT/.tmp-*/          a save in progress (or killed): ignored by readers, removed by the next save

A save writes every file into a fresh temporary directory, fsyncs the files and the directory, renames the
directory to its version name, then swaps ``CURRENT`` by writing ``CURRENT.tmp`` and renaming it over
``CURRENT`` (atomic on POSIX) and fsyncs ``ROOT``. A process killed at any point before that last rename leaves
``CURRENT`` naming the previous, complete snapshot; after it, the new one. Readers verify the checksums, so a
corrupted file is reported (one line) instead of crashing faiss or SQLite.

NOTE: one writer at a time per index directory (no lock file); readers never see a partial snapshot.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path

from cubelm.errors import CubelmError
from cubelm.fsync import fsync_path

MANIFEST = "manifest.json"
FORMAT = 1

# Test seam: called with the name of each step of a save ("files", "renamed", "committed"); a test makes it
# raise or sleep to interrupt a save between steps.
save_hook: Callable[[str], None] | None = None


def _step(name: str) -> None:
    if save_hook is not None:
        save_hook(name)


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def is_snapshot_root(root: Path) -> bool:
    return (Path(root) / "CURRENT").is_file()


def _versions(root: Path) -> list[int]:
    return sorted(int(p.name[1:]) for p in root.glob("v[0-9]*") if p.is_dir() and p.name[1:].isdigit())


def write_snapshot(root: Path, writers: dict[str, Callable[[Path], None]], manifest: dict) -> Path:
    """Write ``writers`` (file name -> function writing that file) as the new live snapshot of ``root``."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".tmp-{uuid.uuid4().hex[:12]}"
    tmp.mkdir()
    files = {}
    for name, write in writers.items():
        write(tmp / name)
        fsync_path(tmp / name)
        files[name] = _sha256(tmp / name)
    (tmp / MANIFEST).write_text(json.dumps({**manifest, "format": FORMAT, "files": files}, indent=1))
    fsync_path(tmp / MANIFEST)
    fsync_path(tmp)
    _step("files")
    final = root / f"v{(max(_versions(root), default=0) + 1):06d}"
    os.rename(tmp, final)
    fsync_path(root)
    _step("renamed")
    pointer = root / "CURRENT.tmp"
    with open(pointer, "w") as f:
        f.write(final.name)
        f.flush()
        os.fsync(f.fileno())
    os.replace(pointer, root / "CURRENT")  # the commit point
    fsync_path(root)
    _step("committed")
    _remove_stale(root, keep=final.name)
    return final


def _remove_stale(root: Path, keep: str) -> None:
    for p in root.iterdir():
        ours = p.name.startswith(".tmp-") or (p.name[:1] == "v" and p.name[1:].isdigit())
        if ours and p.is_dir() and p.name != keep:
            shutil.rmtree(p, ignore_errors=True)


def read_snapshot(root: Path) -> tuple[Path, dict]:
    """The live snapshot's directory and manifest, checksums verified."""
    root = Path(root)
    if not root.exists():
        raise CubelmError(f"no index at {root}; build one with `cubelm rag ingest --index {root}`")
    try:
        name = (root / "CURRENT").read_text().strip()
    except OSError:
        raise CubelmError(f"{root} is not a cubelm index (no CURRENT file)") from None
    snap = root / name
    try:
        manifest = json.loads((snap / MANIFEST).read_text())
        files = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError):
        raise CubelmError(f"{snap / MANIFEST} is missing or corrupt; rebuild the index") from None
    if manifest.get("format") != FORMAT:
        raise CubelmError(f"{root}: index format {manifest.get('format')} is not {FORMAT}; rebuild the index")
    for fname, digest in files.items():
        path = snap / fname
        if not path.is_file():
            raise CubelmError(f"{path} is missing; the index is damaged, rebuild it")
        if _sha256(path) != digest:
            raise CubelmError(f"{path} is corrupt (checksum mismatch); rebuild the index")
    return snap, manifest
