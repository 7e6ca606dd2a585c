"""Durability for atomic writes: fsync a file or a directory entry by path.

Every writer that publishes by rename (training checkpoints, model-store pulls, vector-index snapshots) needs the
data of the new files and the directory entries that name them on disk before the rename is relied on; otherwise a
crash right after the rename can leave a name pointing at empty or partial files."""

from __future__ import annotations

import os
from pathlib import Path


def fsync_path(path: Path | str) -> None:
    """fsync one file or directory (a directory: its entries, e.g. after a rename into it)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path: Path) -> None:
    """fsync every direct child of ``path`` and then ``path`` itself."""
    for f in [*path.iterdir(), path]:
        fsync_path(f)
