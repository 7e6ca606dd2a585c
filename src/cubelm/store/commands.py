"""``cubelm pull``, ``cubelm push``, ``cubelm models``: the model store from the command line.

    cubelm push ~/.cache/cubelm/models/default s3://models/tiny      # files, then manifest.json (the commit point)
    AWS_ENDPOINT_URL=http://minio:9000 cubelm pull s3://models/tiny  # -> models/tiny@<digest>, models/tiny -> it
    cubelm pull https://host/models/tiny --name tiny --digest <sha256>  # pinned: refuse any other content
    cubelm models [--verify]                                         # NAME DIGEST SIZE PATH (re-hashed)
    cubelm serve --model s3://models/tiny                            # pulls through the store, then serves
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from cubelm.cli import opt
from cubelm.errors import CubelmError


@dataclass(slots=True, kw_only=True)
class PullOptions:
    src: str = opt(flag="SRC", help="where the model is: s3://bucket/prefix, gs://bucket/prefix, https://host/dir "
                                    "(holding manifest.json), file:///dir or a local directory")
    name: str | None = opt(None, help="name in the store (models/NAME); default: the last part of SRC")
    digest: str | None = opt(None, help="expected digest (sha256 of the manifest): refuse any other content")

    def __post_init__(self) -> None:
        if self.digest is not None:
            d = self.digest.removeprefix("sha256:")
            if len(d) != 64 or any(c not in "0123456789abcdef" for c in d):
                raise CubelmError(f"--digest must be 64 lowercase hex digits (sha256), got {self.digest!r}")


def run_pull(o: PullOptions) -> int:
    from cubelm.store.pull import pull_model
    path = pull_model(o.src, name=o.name, digest=o.digest)
    print(path)
    return 0


@dataclass(slots=True, kw_only=True)
class PushOptions:
    directory: str = opt(flag="DIR", help="the model directory to publish (every file under it)")
    dest: str = opt(flag="DEST", help="where to: s3://bucket/prefix, gs://bucket/prefix, file:///dir or a "
                                      "directory (serve it over HTTP for http(s):// pulls)")


def run_push(o: PushOptions) -> int:
    from cubelm.store.pull import push_model
    manifest = push_model(o.directory, o.dest)
    print(f"sha256:{manifest.digest}")
    return 0


@dataclass(slots=True, kw_only=True)
class ModelsOptions:
    json_output: bool = opt(False, flag="--json", help="print the list as JSON")
    verify: bool = opt(False, help="re-hash every pulled model against its manifest (bit rot, edits on a shared "
                                   "volume); a mismatch is an error naming the file")


def list_models() -> list[dict]:
    """Every model in the store: pulled versions (the current one per name marked) and local directories."""
    from cubelm.store import paths
    root = paths.models_dir()
    if not root.is_dir():
        return []
    rows = []
    for p in sorted(root.iterdir()):
        if p.name.startswith(".") or p.is_symlink() or not p.is_dir():
            continue
        name, digest = paths.split_version(p.name)
        rows.append({"name": name, "digest": digest, "current": digest is None or paths.ref_digest(name) == digest,
                     "size": _size(p), "path": str(p)})
    return rows


def _size(p: Path) -> int:
    manifest = p / "manifest.json"
    if manifest.is_file():
        try:
            return sum(f["size"] for f in json.loads(manifest.read_bytes())["files"])
        except (ValueError, KeyError, TypeError):
            pass
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def verify_model(path: Path) -> None:
    """Every file of a pulled ``name@digest`` directory against its manifest, and the manifest against the digest."""
    from cubelm.store.manifest import parse_manifest, sha256_file
    from cubelm.store.paths import split_version
    manifest = parse_manifest((path / "manifest.json").read_bytes(), str(path / "manifest.json"))
    if manifest.digest != split_version(path.name)[1]:
        raise CubelmError(f"{path}: manifest.json does not match the directory's digest (edited after the pull?)")
    for f in manifest.files:
        p = path / f.path
        if not p.is_file() or p.stat().st_size != f.size or sha256_file(p) != f.sha256:
            raise CubelmError(f"{p}: missing or corrupt (size/sha256 differ from the manifest); delete {path} and "
                              f"pull again")


def run_models(o: ModelsOptions) -> int:
    from cubelm.store import paths
    rows = list_models()
    if o.verify:
        for r in rows:
            if r["digest"]:  # a local directory has no manifest to check against
                verify_model(Path(r["path"]))
    if o.json_output:
        print(json.dumps(rows, indent=1))
        return 0
    if not rows:
        print(f"no models in {paths.models_dir()}; cubelm pull SRC or cubelm build-default")
        return 0
    print(f"{'NAME':<24} {'DIGEST':<14} {'SIZE':>10}  PATH")
    for r in rows:
        digest = r["digest"][:12] if r["digest"] else "(local)"
        mark = "" if r["current"] else "  (older)"
        print(f"{r['name']:<24} {digest:<14} {r['size'] / 2**20:>7.1f} MiB  {r['path']}{mark}")
    return 0
