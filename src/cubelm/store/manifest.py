"""A model's sha256 manifest: what ``cubelm push`` writes next to the files and ``cubelm pull`` verifies.

A pushed model is a directory (``s3://bucket/models/tiny/``, ``https://host/models/tiny/``, a local path)::

    manifest.json      {"format": "cubelm.manifest/1",
                        "files": [{"path": "config.json", "sha256": "<64 hex>", "size": 631}, ...]}
    config.json        every file the manifest lists, at its relative path ('/'-separated)
    model.safetensors
    ...

The model's digest is the sha256 of the *canonical* manifest: the same JSON with sorted keys, files sorted by
path, no whitespace (``json.dumps(sort_keys=True, separators=(",", ":"))``), so the digest names the content, not
the formatting, and a pull can be pinned to it (``--digest``). ``push`` writes the manifest last: a reader that
sees it sees every file (the commit point, like a Git ref after its objects).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from cubelm.errors import CubelmError
from cubelm.store.paths import MANIFEST_NAME

FORMAT = "cubelm.manifest/1"
CHUNK = 1 << 20  # 1 MiB reads: large enough to amortize syscalls/requests, small enough to stream a 10 GB file
_HEX64 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True, slots=True)
class FileEntry:
    path: str  # relative, '/'-separated, no '..'
    size: int
    sha256: str


@dataclass(frozen=True, slots=True)
class Manifest:
    files: tuple[FileEntry, ...]

    def canonical(self) -> bytes:
        files = [{"path": f.path, "sha256": f.sha256, "size": f.size} for f in sorted(self.files, key=_key)]
        return json.dumps({"files": files, "format": FORMAT}, sort_keys=True, separators=(",", ":")).encode()

    @property
    def digest(self) -> str:
        return hashlib.sha256(self.canonical()).hexdigest()

    @property
    def total_size(self) -> int:
        return sum(f.size for f in self.files)

    def to_json(self) -> bytes:
        """What is written to manifest.json: indented for people, the same digest as the canonical form."""
        return json.dumps(json.loads(self.canonical()), indent=1, sort_keys=True).encode() + b"\n"


def _key(f: FileEntry) -> str:
    return f.path


def parse_manifest(data: bytes, where: str) -> Manifest:
    try:
        doc = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CubelmError(f"{where}: not a JSON manifest ({e})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or not isinstance(doc.get("files"), list):
        raise CubelmError(f"{where}: not a cubelm manifest (expected {{\"format\": \"{FORMAT}\", \"files\": [...]}}; "
                          f"write one with cubelm push)")
    entries, seen = [], set()
    for item in doc["files"]:
        if not isinstance(item, dict):
            raise CubelmError(f"{where}: each entry of 'files' must be an object with path, size and sha256")
        path, size, sha = item.get("path"), item.get("size"), item.get("sha256")
        if not isinstance(path, str) or not _safe_path(path) or path == MANIFEST_NAME or path in seen:
            raise CubelmError(f"{where}: bad or repeated file path {path!r} (relative, '/'-separated, no '..')")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise CubelmError(f"{where}: {path}: size must be a non-negative integer, got {size!r}")
        if not isinstance(sha, str) or not _HEX64.fullmatch(sha):
            raise CubelmError(f"{where}: {path}: sha256 must be 64 lowercase hex digits, got {sha!r}")
        seen.add(path)
        entries.append(FileEntry(path, size, sha))
    if not entries:
        raise CubelmError(f"{where}: the manifest lists no files")
    return Manifest(tuple(sorted(entries, key=_key)))


def _safe_path(path: str) -> bool:
    p = PurePosixPath(path)
    return bool(path) and not p.is_absolute() and "\\" not in path and all(
        part not in ("", ".", "..") for part in path.split("/"))


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def build_manifest(directory: Path) -> Manifest:
    """Hash every regular file under ``directory`` (symlinks followed; the top-level manifest.json excluded)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CubelmError(f"{directory} is not a directory; pass a model directory (config.json, "
                          f"model.safetensors, tokenizer files)")
    entries = []
    for p in sorted(directory.rglob("*")):
        rel = p.relative_to(directory).as_posix()
        if not p.is_file() or rel == MANIFEST_NAME or any(part.startswith(".") for part in rel.split("/")):
            continue  # hidden files (.partial downloads, editor files) are not part of a model
        entries.append(FileEntry(rel, p.stat().st_size, sha256_file(p)))
    if not entries:
        raise CubelmError(f"{directory} holds no files; pass a model directory")
    return Manifest(tuple(entries))
