"""Where models are pushed to and pulled from: a directory, an HTTP(S) server, S3 (s3fs) or GCS (gcsfs).

Every location is a directory holding ``manifest.json`` and the files it lists (cubelm.store.manifest). A location
reads a file from a byte offset (HTTP ``Range: bytes=N-``, S3/GCS ranged GETs, ``seek`` on a local file), which is
what lets a pull resume a partial download. HTTP is read-only: publish with ``cubelm push`` to a directory and serve
that directory with any static file server (nginx, ``python -m http.server``, a bucket's website endpoint).

    file:///srv/models/tiny  or  /srv/models/tiny      a local directory
    https://host/models/tiny                           GET manifest.json then each file (bearer token from
                                                       $CUBELM_HTTP_TOKEN if set)
    s3://bucket/models/tiny                            s3fs; endpoint from $AWS_ENDPOINT_URL_S3 / $AWS_ENDPOINT_URL
                                                       (MinIO, Ceph, moto), credentials from the AWS chain
                                                       (env vars, $AWS_PROFILE, web identity, instance role)
    gs://bucket/models/tiny                            gcsfs (optional), Google application default credentials
"""

from __future__ import annotations

import os
import shutil
import urllib.error
import urllib.parse
import urllib.request
from abc import ABC, abstractmethod
from collections.abc import Iterator
from pathlib import Path

from cubelm.errors import CubelmError
from cubelm.store.manifest import CHUNK
from cubelm.store.paths import MANIFEST_NAME

SCHEMES = ("file", "http", "https", "s3", "gs")
# one ranged GET per read: 16 MiB amortizes the request latency (AWS suggests 8-16 MB ranges) and bounds what a
# failed read loses
S3_CHUNK = 16 << 20
HTTP_TIMEOUT = 60.0  # seconds without a byte before a read fails (then the pull retries from where it stopped)


class TransientError(Exception):
    """A read that failed midway (connection reset, timeout): the pull keeps the bytes and resumes from there."""


class Location(ABC):
    url: str

    @abstractmethod
    def read_manifest(self) -> bytes | None:
        """The manifest's bytes; None where a location may hold a plain model directory (local only)."""

    @abstractmethod
    def open_range(self, path: str, offset: int) -> tuple[int, Iterator[bytes]]:
        """Bytes of ``path`` from ``offset`` on: (the offset the data really starts at, the chunks). A server
        that ignores ``Range`` answers from 0, and the caller starts the file over."""

    def put_file(self, local: Path, path: str) -> None:
        raise CubelmError(f"{self.url}: cannot push over {self.url.split(':')[0]}:// (read-only); push to "
                          f"s3://, gs:// or a directory, and serve that directory over HTTP")

    def put_bytes(self, data: bytes, path: str) -> None:
        raise CubelmError(f"{self.url}: cannot push here (read-only)")


def open_location(url: str) -> Location:
    url = url.rstrip("/")
    if url.endswith("/" + MANIFEST_NAME):  # the manifest's own URL names its directory
        url = url[: -len(MANIFEST_NAME) - 1]
    scheme = urllib.parse.urlsplit(url).scheme if "://" in url else ""
    if scheme in ("", "file"):
        return LocalLocation(Path(urllib.parse.urlsplit(url).path if scheme else url), url)
    if scheme in ("http", "https"):
        return HttpLocation(url)
    if scheme == "s3":
        return FsspecLocation(url, _s3_filesystem(url))
    if scheme == "gs":
        return FsspecLocation(url, _gcs_filesystem())
    raise CubelmError(f"{url}: unknown URL scheme {scheme!r}; use s3://, gs://, http(s)://, file:// or a path")


class LocalLocation(Location):
    def __init__(self, root: Path, url: str):
        self.root, self.url = root, url

    def read_manifest(self) -> bytes | None:
        if not self.root.is_dir():
            raise CubelmError(f"{self.url}: no such directory")
        p = self.root / MANIFEST_NAME
        return p.read_bytes() if p.is_file() else None

    def open_range(self, path: str, offset: int) -> tuple[int, Iterator[bytes]]:
        p = self.root / path
        if not p.is_file():
            raise CubelmError(f"{self.url}: {path} is listed in the manifest but missing")
        return offset, _read_local(p, offset)

    def put_file(self, local: Path, path: str) -> None:
        dst = self.root / path
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
        shutil.copyfile(local, tmp)
        os.replace(tmp, dst)  # a reader never sees half a file

    def put_bytes(self, data: bytes, path: str) -> None:
        dst = self.root / path
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
        tmp.write_bytes(data)
        os.replace(tmp, dst)


def _read_local(p: Path, offset: int) -> Iterator[bytes]:
    with open(p, "rb") as f:
        f.seek(offset)
        while chunk := f.read(CHUNK):
            yield chunk


class HttpLocation(Location):
    def __init__(self, url: str):
        self.url = url

    def _request(self, path: str, offset: int = 0):
        headers = {"User-Agent": "cubelm-store"}
        if offset:
            headers["Range"] = f"bytes={offset}-"
        if token := os.environ.get("CUBELM_HTTP_TOKEN"):
            headers["Authorization"] = f"Bearer {token}"
        url = f"{self.url}/{urllib.parse.quote(path)}"
        try:
            return urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=HTTP_TIMEOUT)
        except urllib.error.HTTPError as e:
            if e.code == 416 and offset:  # our partial file is not a prefix of theirs: take the whole file
                return self._request(path, 0)
            if e.code in (401, 403):
                raise CubelmError(f"{url}: access denied (HTTP {e.code}); set $CUBELM_HTTP_TOKEN") from None
            if e.code == 404:
                raise CubelmError(f"{url}: not found (HTTP 404)" + (
                    "; publish the model with cubelm push, which writes the manifest" if path == MANIFEST_NAME
                    else "")) from None
            if e.code < 500 and e.code != 429:
                raise CubelmError(f"{url}: HTTP {e.code} {e.reason}") from None
            raise TransientError(f"{url}: HTTP {e.code}") from None
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise TransientError(f"{url}: {reason}") from None

    def read_manifest(self) -> bytes:
        try:
            with self._request(MANIFEST_NAME) as r:
                return r.read()
        except TransientError as e:
            raise CubelmError(f"cannot read the manifest: {e}") from None

    def open_range(self, path: str, offset: int) -> tuple[int, Iterator[bytes]]:
        response = self._request(path, offset)
        # 206 = the range we asked for; 200 = the whole file (no Range sent, or the server ignores it)
        start = offset if response.status == 206 else 0
        return start, _read_http(response, f"{self.url}/{path}")


def _read_http(response, url: str) -> Iterator[bytes]:
    import http.client
    with response:
        try:
            while chunk := response.read(CHUNK):
                yield chunk
            if response.length:  # read(amt) returns b"" at a clean early close; Content-Length says what is owed
                raise TransientError(f"{url}: connection closed {response.length:,} bytes early")
        except (http.client.HTTPException, OSError) as e:  # IncompleteRead, reset, timeout
            raise TransientError(f"{url}: connection lost ({type(e).__name__})") from None


class FsspecLocation(Location):
    """S3 / GCS through fsspec: ranged GETs for reads (``cache_type="none"``: no read-ahead past what we ask)."""

    def __init__(self, url: str, fs):
        self.url, self.fs = url, fs
        self.root = url.split("://", 1)[1]

    def _errors(self, e: Exception, path: str) -> Exception:
        if isinstance(e, FileNotFoundError):
            return CubelmError(f"{self.url}/{path}: not found" + (
                "; publish the model with cubelm push, which writes the manifest" if path == MANIFEST_NAME else ""))
        if isinstance(e, PermissionError):
            return CubelmError(f"{self.url}/{path}: access denied ({e}); check the credentials and the bucket policy")
        return TransientError(f"{self.url}/{path}: {type(e).__name__}: {e}")

    def read_manifest(self) -> bytes:
        try:
            return self.fs.cat_file(f"{self.root}/{MANIFEST_NAME}")
        except Exception as e:  # noqa: BLE001 -- botocore/aiohttp/gcsfs errors: one line, not a traceback
            err = self._errors(e, MANIFEST_NAME)
            raise (err if isinstance(err, CubelmError) else CubelmError(f"cannot read the manifest: {err}")) from None

    def open_range(self, path: str, offset: int) -> tuple[int, Iterator[bytes]]:
        try:
            f = self.fs.open(f"{self.root}/{path}", "rb", block_size=S3_CHUNK, cache_type="none")
        except Exception as e:  # noqa: BLE001
            raise self._errors(e, path) from None
        return offset, self._read(f, path, offset)

    def _read(self, f, path: str, offset: int) -> Iterator[bytes]:
        with f:
            try:
                f.seek(offset)
                while chunk := f.read(S3_CHUNK):
                    yield chunk
            except Exception as e:  # noqa: BLE001
                raise self._errors(e, path) from None

    def put_file(self, local: Path, path: str) -> None:
        try:
            self.fs.put_file(str(local), f"{self.root}/{path}")
        except Exception as e:  # noqa: BLE001
            raise CubelmError(f"cannot push {path} to {self.url}: {self._errors(e, path)}") from None

    def put_bytes(self, data: bytes, path: str) -> None:
        try:
            self.fs.pipe_file(f"{self.root}/{path}", data)
        except Exception as e:  # noqa: BLE001
            raise CubelmError(f"cannot push {path} to {self.url}: {self._errors(e, path)}") from None


def _s3_filesystem(url: str):
    try:
        import botocore.session
        import s3fs
    except ImportError:
        raise CubelmError("s3:// needs s3fs: pip install 'cubelm[store]'") from None
    import botocore.exceptions
    try:  # the whole AWS chain (env, profile, web identity, container, instance role), the one s3fs will use
        credentials = botocore.session.get_session().get_credentials()
    except botocore.exceptions.BotoCoreError as e:
        raise CubelmError(f"{url}: AWS credentials: {e}") from None
    if credentials is None:
        raise CubelmError(f"{url}: no AWS credentials found; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or "
                          f"AWS_PROFILE, or run with an IAM role")
    # botocore reads AWS_ENDPOINT_URL* itself in recent versions; passing it keeps older stacks and s3fs's own
    # client construction on the same endpoint (MinIO, Ceph, moto)
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None
    return s3fs.S3FileSystem(endpoint_url=endpoint, skip_instance_cache=True)


def _gcs_filesystem():
    try:
        import gcsfs
    except ImportError:
        raise CubelmError("gs:// needs gcsfs, which is not installed: pip install gcsfs") from None
    return gcsfs.GCSFileSystem()
