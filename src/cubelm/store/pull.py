"""``pull``: download a model into the store once, verified, atomically; ``push``: publish one with its manifest.

A pull (KServe's storage initializer and the HF hub cache do the same, §6.1.2 "download once, reuse many"):

1. read the source's manifest -> the digest (the sha256 of the canonical manifest) names the version;
2. take ``flock`` on ``models/.locks/<name>@<digest>.lock``: a second process (another pod on the same volume)
   waits here, then finds the finished directory and downloads nothing. The kernel drops the lock when its holder
   dies, so a killed pull never blocks the next one;
3. download each file into ``models/.<name>@<digest>.partial/``, from the partial file's size on (a killed
   download resumes with a range read), hashing as the bytes arrive; a size or sha256 mismatch deletes the file
   (a resumed file is fetched once more from scratch: its old prefix may be the bad part);
4. fsync, then ``rename`` the partial directory to ``models/<name>@<digest>`` (atomic: the directory exists only
   complete and verified), then point the ``models/<name>`` symlink at it (atomic too).

NOTE: the book's "download once, reuse many" leaves out the race: on a shared (RWX) volume two pods starting
together would both download into the same path and one could load the other's half-written files. The lock plus
the rename is what makes the pattern safe. (The book also describes object storage as splitting an asset into
"objects"; in S3/GCS an object is the whole file under one key, uploaded in parts when large; ranged GETs are what
make resuming possible. Its "fusing" is FUSE-mounting a bucket (mountpoint-s3, gcsfuse): such a mount is a local
path here, pulled like any directory.) flock works on local disks and on NFSv4 (Linux maps it to byte-range locks).
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from cubelm.errors import CubelmError
from cubelm.fsync import fsync_path
from cubelm.store import paths
from cubelm.store.manifest import FileEntry, Manifest, build_manifest, parse_manifest
from cubelm.store.remote import Location, TransientError, open_location

MAX_ATTEMPTS = 4  # reads that fail midway are resumed this many times per file before the pull gives up


def _log(msg: str) -> None:
    print(f"[cubelm] {msg}", file=sys.stderr, flush=True)


def default_name(src: str) -> str:
    base = src.rstrip("/").removesuffix("/" + paths.MANIFEST_NAME).rstrip("/").rsplit("/", 1)[-1]
    name = base.partition("@")[0]  # pulling a store directory (tiny@<digest>) keeps its name
    try:
        return paths.check_name(name)
    except CubelmError:
        raise CubelmError(f"cannot name the model after {src!r}; pass --name NAME") from None


def pull_model(src: str, name: str | None = None, digest: str | None = None) -> Path:
    """Pull ``src`` into the store; returns the verified ``models/<name>@<digest>`` directory."""
    name = paths.check_name(name) if name else default_name(src)
    location = open_location(src)
    raw = location.read_manifest()
    manifest = parse_manifest(raw, f"{src}/manifest.json") if raw is not None else _local_manifest(location)
    if digest is not None and manifest.digest != digest.removeprefix("sha256:"):
        raise CubelmError(f"{src}: digest {manifest.digest} is not the pinned --digest {digest}")
    paths.check_ref_free(name)
    final = paths.version_dir(name, manifest.digest)
    with _locked(paths.lock_path(name, manifest.digest)):
        if final.is_dir():
            _log(f"{name}@{manifest.digest[:12]} is already in the store: {final}")
        else:
            _download(location, manifest, name, final)
        paths.set_ref(name, manifest.digest)
    return final


def _local_manifest(location: Location) -> Manifest:
    """A local directory without a manifest (a model trained here): hash it now, verify again while copying."""
    _log(f"{location.url} has no manifest.json: hashing its files")
    return build_manifest(location.root)


@contextmanager
def _locked(lock_file: Path):
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_file, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            _log(f"another process is pulling this model (lock {lock_file}); waiting for it")
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _download(location: Location, manifest: Manifest, name: str, final: Path) -> None:
    partial = paths.partial_dir(name, manifest.digest)
    partial.mkdir(parents=True, exist_ok=True)
    t0, fetched = time.perf_counter(), 0
    _log(f"pulling {location.url} -> {final} ({len(manifest.files)} files, {_mib(manifest.total_size)})")
    for entry in manifest.files:
        fetched += _fetch_verified(location, entry, partial / entry.path)
    (partial / paths.MANIFEST_NAME).write_bytes(manifest.to_json())
    fsync_path(partial)
    os.rename(partial, final)  # atomic: the version directory appears complete and verified, or not at all
    fsync_path(final.parent)
    dt = time.perf_counter() - t0
    _log(f"pulled {name}@{manifest.digest[:12]}: {_mib(fetched)} downloaded in {dt:.1f}s")


def _fetch_verified(location: Location, entry: FileEntry, dst: Path) -> int:
    """Download (or resume) one file and check it; returns the bytes transferred."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    have = dst.stat().st_size if dst.exists() else 0
    if have > entry.size:
        dst.unlink()
        have = 0
    fetched, sha = _fetch(location, entry, dst, have)
    if sha == entry.sha256:
        return fetched
    dst.unlink()
    if have:  # the resumed prefix may be the corrupt part: one more try from byte 0
        _log(f"{entry.path}: the resumed file does not verify; downloading it again")
        more, sha = _fetch(location, entry, dst, 0)
        fetched += more
        if sha == entry.sha256:
            return fetched
        dst.unlink()
    raise CubelmError(f"{location.url}/{entry.path}: sha256 mismatch (got {sha[:12]}..., the manifest says "
                      f"{entry.sha256[:12]}...): the file is corrupt; deleted the download")


class _Partial:
    """A partial file being appended: the bytes on disk and their running sha256 always agree (each chunk is
    written and hashed together), so a failure at any point leaves a prefix to resume from."""

    def __init__(self, dst: Path, offset: int):
        self.h = hashlib.sha256()
        if offset:
            with open(dst, "rb") as f:  # hash the prefix we keep
                while chunk := f.read(1 << 20):
                    self.h.update(chunk)
        self.out = open(dst, "ab")
        self.offset, self.fetched = offset, 0

    def restart(self) -> None:
        self.out.truncate(0)  # append mode: the next write lands at byte 0
        self.h, self.offset = hashlib.sha256(), 0

    def write(self, chunk: bytes) -> None:
        self.out.write(chunk)
        self.out.flush()  # on disk (page cache) before it counts: a killed process leaves exactly what it hashed
        self.h.update(chunk)
        self.offset += len(chunk)
        self.fetched += len(chunk)

    def close(self) -> None:
        self.out.flush()
        os.fsync(self.out.fileno())
        self.out.close()


def _fetch(location: Location, entry: FileEntry, dst: Path, offset: int) -> tuple[int, str]:
    """Append ``dst`` from ``offset`` to ``entry.size`` bytes, resuming after transient failures; returns (bytes
    transferred, sha256 of the whole file)."""
    if offset:
        _log(f"{entry.path}: resuming at byte {offset:,} of {entry.size:,}")
    part = _Partial(dst, offset)
    try:
        for attempt in range(MAX_ATTEMPTS):
            try:
                _append(location, entry, part)
                break
            except TransientError as e:
                if attempt + 1 == MAX_ATTEMPTS:
                    raise CubelmError(f"{e}; gave up after {MAX_ATTEMPTS} attempts with {part.offset:,} of "
                                      f"{entry.size:,} bytes kept: run the pull again to resume") from None
                _log(f"{e}; resuming at byte {part.offset:,} (attempt {attempt + 2}/{MAX_ATTEMPTS})")
                time.sleep(min(0.2 * 2 ** attempt, 2.0))
    finally:
        part.close()
    if part.offset != entry.size:
        dst.unlink()
        raise CubelmError(f"{location.url}/{entry.path}: size mismatch: {part.offset:,} bytes, the manifest says "
                          f"{entry.size:,}: the file is truncated or corrupt; deleted the download")
    return part.fetched, part.h.hexdigest()


def _append(location: Location, entry: FileEntry, part: _Partial) -> None:
    if part.offset >= entry.size:
        return
    start, chunks = location.open_range(entry.path, part.offset)
    if start != part.offset:  # the server sent the whole file: start over
        part.restart()
    try:
        for chunk in chunks:
            part.write(chunk)
            if part.offset > entry.size:
                return  # too long: the caller reports the size mismatch
    finally:
        chunks.close()  # the HTTP response / S3 file, now rather than at garbage collection


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def push_model(directory: str | Path, dest: str) -> Manifest:
    """Upload every file of ``directory``, then its manifest (last: the commit point readers look for)."""
    manifest = build_manifest(Path(directory))
    location = open_location(dest)
    t0 = time.perf_counter()
    for entry in manifest.files:
        location.put_file(Path(directory) / entry.path, entry.path)
    location.put_bytes(manifest.to_json(), paths.MANIFEST_NAME)
    _log(f"pushed {len(manifest.files)} files ({_mib(manifest.total_size)}) to {location.url} in "
         f"{time.perf_counter() - t0:.1f}s")
    return manifest
