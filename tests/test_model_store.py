"""The model store (cubelm.store) against real servers on loopback: moto's S3 server and a small HTTP server with
Range support. Pulls are checked byte for byte against the pushed directory; the HTTP server counts the GETs, so
"download once" and "resume" are facts observed at the server, not inferred from logs."""

from __future__ import annotations

import json
import logging
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from helpers import cli_in_process, free_port, make_tiny_model_dir, wait_ready

MIB = 1 << 20


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return make_tiny_model_dir(tmp_path_factory.mktemp("store_model"))


@pytest.fixture(scope="session")
def published(tiny_model, tmp_path_factory) -> Path:
    """The tiny model pushed to a plain directory (what an HTTP server would publish)."""
    from cubelm.store.pull import push_model
    dest = tmp_path_factory.mktemp("published") / "tiny"
    push_model(tiny_model, str(dest))
    return dest


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("CUBELM_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def assert_clean_error(r, *needles) -> None:
    """Exit 2, no traceback, one ``cubelm: error:`` line holding every needle (after the pull's ``[cubelm]`` progress
    lines, if any)."""
    assert r.returncode == 2, (r.returncode, r.stdout[-2000:], r.stderr[-2000:])
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert lines[-1].startswith("cubelm: error: ") and all(x.startswith("[cubelm] ") for x in lines[:-1]), r.stderr
    assert all(n in lines[-1] for n in needles), (needles, lines[-1])


def same_files(a: Path, b: Path) -> None:
    names = sorted(p.name for p in a.iterdir() if p.name != "manifest.json")
    assert names == sorted(p.name for p in b.iterdir() if p.name != "manifest.json")
    for n in names:
        assert (a / n).read_bytes() == (b / n).read_bytes(), n


# --- a static HTTP server with Range support and one-shot hooks -------------------------------------------------

class _Handler(BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 -- http.server's naming
        srv: RangeServer = self.server
        rel = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path.lstrip("/"))
        path = srv.root / rel
        if not path.is_file():
            self.send_error(404)
            return
        data = path.read_bytes()
        m = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", ""))
        start = int(m[1]) if m else 0
        with srv.lock:
            srv.gets.append((rel, start))
            hook = srv.hooks.pop(rel, None)
        if start and start >= len(data):
            self.send_error(416)
            return
        body = data[start:]
        self.send_response(206 if m else 200)
        if m:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        try:
            if hook is None:
                self.wfile.write(body)
            else:
                hook(self.wfile, body)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client was killed: what the kill test does on purpose

    def log_message(self, *args):
        pass


class RangeServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, root: Path):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.root, self.gets, self.hooks, self.lock = root, [], {}, threading.Lock()
        self.url = f"http://127.0.0.1:{self.server_address[1]}"

    def count(self, rel: str) -> int:
        return sum(1 for r, _ in self.gets if r == rel)


@pytest.fixture
def http_server(published):
    srv = RangeServer(published.parent)
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def drop_after(n: int):
    """Send ``n`` bytes of the body, then close: the client sees a connection lost midway."""
    def hook(wfile, body):
        wfile.write(body[:n])
        wfile.flush()
    return hook


def gate(n: int, sent: threading.Event, release: threading.Event):
    """Send ``n`` bytes, tell the test, hold the connection until it says go, then send the rest."""
    def hook(wfile, body):
        wfile.write(body[:n])
        wfile.flush()
        sent.set()
        release.wait(60)
        wfile.write(body[n:])
    return hook


# --- moto's S3 server -----------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def s3_endpoint():
    pytest.importorskip("s3fs", reason="the store extra is not installed: pip install -e '.[store]'")
    moto_server = pytest.importorskip("moto.server", reason="moto[server] is not installed (test extra)")
    import boto3
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's per-request access log
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="testing", aws_secret_access_key="testing",
                 region_name="us-east-1").create_bucket(Bucket="models")
    yield endpoint
    server.stop()


def s3_env(endpoint: str, home: Path, credentials: bool = True) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(CUBELM_HOME=str(home), AWS_ENDPOINT_URL=endpoint, AWS_DEFAULT_REGION="us-east-1",
               AWS_EC2_METADATA_DISABLED="true",  # no instance-metadata probe (1 s timeouts) on a laptop or CI
               AWS_SHARED_CREDENTIALS_FILE="/nonexistent", AWS_CONFIG_FILE="/nonexistent", OMP_NUM_THREADS="1")
    if credentials:
        env.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing")
    return env


@pytest.fixture
def s3(s3_endpoint, home, monkeypatch):
    for k in [k for k in os.environ if k.startswith("AWS_")]:
        monkeypatch.delenv(k)
    for k, v in s3_env(s3_endpoint, home).items():
        if k.startswith("AWS_"):
            monkeypatch.setenv(k, v)
    return s3_endpoint


def run_cubelm(*args, env: dict, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cubelm", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=timeout)


# --- tests ----------------------------------------------------------------------------------------------------

def test_manifest_digest_is_canonical_and_paths_are_checked(published):
    from cubelm.errors import CubelmError
    from cubelm.store.manifest import build_manifest, parse_manifest
    raw = (published / "manifest.json").read_bytes()
    m = parse_manifest(raw, "x")
    assert m == build_manifest(published)  # push wrote what the directory holds (manifest.json excluded)
    doc = json.loads(raw)
    doc["files"].reverse()
    assert parse_manifest(json.dumps(doc, indent=4).encode(), "x").digest == m.digest  # formatting-independent
    doc["files"][0]["size"] += 1
    assert parse_manifest(json.dumps(doc).encode(), "x").digest != m.digest
    for bad in ("../etc/passwd", "/abs", "a//b", "manifest.json"):
        doc = {"format": "cubelm.manifest/1", "files": [{"path": bad, "size": 1, "sha256": "0" * 64}]}
        with pytest.raises(CubelmError, match="bad or repeated file path"):
            parse_manifest(json.dumps(doc).encode(), "x")


def test_s3_push_pull_models(tiny_model, s3, home, capsys):
    r = cli_in_process(capsys, "push", tiny_model, "s3://models/tiny")
    assert r.returncode == 0, r.stderr
    digest = r.stdout.strip().removeprefix("sha256:")
    r = cli_in_process(capsys, "pull", "s3://models/tiny")
    assert r.returncode == 0, r.stderr
    path = Path(r.stdout.strip())
    assert path == home / "models" / f"tiny@{digest}"
    same_files(path, tiny_model)
    assert (home / "models" / "tiny").resolve() == path  # the name points at the latest pull
    r = cli_in_process(capsys, "pull", "s3://models/tiny")  # already there: nothing downloaded
    assert r.returncode == 0 and "already in the store" in r.stderr
    r = cli_in_process(capsys, "models", "--json")
    rows = json.loads(r.stdout)
    assert [(x["name"], x["digest"], x["current"]) for x in rows] == [("tiny", digest, True)]
    assert rows[0]["size"] == sum(p.stat().st_size for p in tiny_model.iterdir())
    assert digest[:12] in cli_in_process(capsys, "models").stdout
    assert cli_in_process(capsys, "models", "--verify").returncode == 0
    blob = bytearray((path / "tokenizer.json").read_bytes())  # bit rot on the volume, after the pull
    blob[5] ^= 1
    (path / "tokenizer.json").write_bytes(bytes(blob))
    assert_clean_error(cli_in_process(capsys, "models", "--verify"), "tokenizer.json: missing or corrupt")


def test_s3_resumes_a_partial_file_with_a_range_read(tiny_model, s3, home, capsys):
    assert cli_in_process(capsys, "push", tiny_model, "s3://models/resume").returncode == 0
    from cubelm.store.manifest import build_manifest
    partial = home / "models" / f".resume@{build_manifest(tiny_model).digest}.partial"
    partial.mkdir(parents=True)
    blob = (tiny_model / "model.safetensors").read_bytes()
    (partial / "model.safetensors").write_bytes(blob[:2 * MIB + 77])  # what a killed pull left
    r = cli_in_process(capsys, "pull", "s3://models/resume")
    assert r.returncode == 0, r.stderr
    # a wrong offset would fail the sha256 and be fetched again from byte 0, which the pull would say
    assert "resuming at byte 2,097,229" in r.stderr and "does not verify" not in r.stderr
    same_files(Path(r.stdout.strip()), tiny_model)


def test_s3_corrupt_object_and_missing_credentials(tiny_model, s3, home, capsys, monkeypatch):
    import boto3
    assert cli_in_process(capsys, "push", tiny_model, "s3://models/bad").returncode == 0
    client = boto3.client("s3", endpoint_url=s3)
    blob = bytearray((tiny_model / "config.json").read_bytes())
    blob[10] ^= 1
    client.put_object(Bucket="models", Key="bad/config.json", Body=bytes(blob))
    assert_clean_error(cli_in_process(capsys, "pull", "s3://models/bad"), "config.json: sha256 mismatch")
    assert not list((home / "models").glob("bad@*")) and not (home / "models" / "bad").exists()
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    assert_clean_error(cli_in_process(capsys, "pull", "s3://models/tiny"), "no AWS credentials")


def test_http_pull_and_resolve_by_name(http_server, published, tiny_model, home, capsys):
    r = cli_in_process(capsys, "pull", f"{http_server.url}/tiny/", "--name", "web")
    assert r.returncode == 0, r.stderr
    same_files(Path(r.stdout.strip()), tiny_model)
    from cubelm.engine.commands import resolve_model_dir
    assert resolve_model_dir("web") == Path(r.stdout.strip())  # --model NAME finds the pulled version
    digest = json.loads(cli_in_process(capsys, "models", "--json").stdout)[0]["digest"]
    r = cli_in_process(capsys, "pull", f"{http_server.url}/tiny", "--name", "web", "--digest", "0" * 64)
    assert_clean_error(r, "is not the pinned --digest")
    assert cli_in_process(capsys, "pull", f"{http_server.url}/tiny", "--name", "web2", "--digest",
                          digest).returncode == 0


def test_dropped_connection_resumes_in_the_same_pull(http_server, tiny_model, home, capsys):
    size = (tiny_model / "model.safetensors").stat().st_size
    http_server.hooks["tiny/model.safetensors"] = drop_after(3 * MIB + 1234)
    r = cli_in_process(capsys, "pull", f"{http_server.url}/tiny")
    assert r.returncode == 0, r.stderr
    same_files(Path(r.stdout.strip()), tiny_model)
    starts = [s for rel, s in http_server.gets if rel == "tiny/model.safetensors"]
    # the second request asks for the rest only: from the last whole chunk written before the drop
    assert len(starts) == 2 and starts[0] == 0 and 0 < starts[1] <= 3 * MIB + 1234 and starts[1] < size


def test_killed_pull_resumes_with_a_range_request(http_server, tiny_model, home):
    sent, release = threading.Event(), threading.Event()
    http_server.hooks["tiny/model.safetensors"] = gate(4 * MIB, sent, release)
    env = {**os.environ, "CUBELM_HOME": str(home), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "cubelm", "pull", f"{http_server.url}/tiny"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        assert sent.wait(60), "the pull never reached model.safetensors"
        partial = next((home / "models").glob(".tiny@*.partial")) / "model.safetensors"
        deadline = time.monotonic() + 30
        while (not partial.exists() or partial.stat().st_size < 4 * MIB) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert partial.stat().st_size == 4 * MIB  # every byte sent is on disk; the process waits for more
        proc.send_signal(signal.SIGKILL)  # a pod evicted mid-download: no cleanup code runs
        proc.wait(10)
    finally:
        release.set()
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    r = run_cubelm("pull", f"{http_server.url}/tiny", env=env)  # the kernel dropped the dead process's lock
    assert r.returncode == 0, r.stderr
    assert "resuming at byte 4,194,304" in r.stderr
    same_files(Path(r.stdout.strip()), tiny_model)
    assert [s for rel, s in http_server.gets if rel == "tiny/model.safetensors"] == [0, 4 * MIB]
    assert not list((home / "models").glob(".*.partial"))


def test_concurrent_pulls_download_once(http_server, tiny_model, home):
    """Two processes (two pods on one volume) pull the same model: one downloads, the other waits on the lock and
    reuses the result. The first download is held open until the second is seen waiting, so they do overlap."""
    sent, release = threading.Event(), threading.Event()
    http_server.hooks["tiny/model.safetensors"] = gate(MIB, sent, release)
    env = {**os.environ, "CUBELM_HOME": str(home), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "cubelm", "pull", f"{http_server.url}/tiny"]
    first = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    second = None
    try:
        assert sent.wait(60)
        second = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        lines: queue.Queue = queue.Queue()
        threading.Thread(target=lambda: [lines.put(x) for x in second.stderr], daemon=True).start()
        deadline, seen = time.monotonic() + 60, []
        while not any("another process is pulling" in x for x in seen) and time.monotonic() < deadline:
            try:
                seen.append(lines.get(timeout=1))
            except queue.Empty:
                assert second.poll() is None, seen
        assert any("another process is pulling" in x for x in seen), seen
        release.set()
        out1, err1 = first.communicate(timeout=60)
        out2 = second.stdout.read()
        assert second.wait(60) == 0 and first.returncode == 0, err1
    finally:
        release.set()
        for p in (first, second):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait(10)
    assert out1 == out2 and Path(out1.strip()).is_dir()
    same_files(Path(out1.strip()), tiny_model)
    files = [p.name for p in tiny_model.iterdir()]
    assert all(http_server.count(f"tiny/{f}") == 1 for f in files), http_server.gets  # each file fetched once
    assert http_server.count("tiny/manifest.json") == 2  # each process reads the manifest to learn the digest


def test_flipped_byte_and_truncated_file_are_rejected(http_server, published, home, capsys, tmp_path):
    for rel, damage, needle in [("model.safetensors", "flip", "sha256 mismatch"),
                                ("tokenizer.json", "truncate", "size mismatch")]:
        bad = published.parent / f"bad-{damage}"
        shutil.rmtree(bad, ignore_errors=True)
        shutil.copytree(published, bad)  # same manifest, one damaged file
        data = bytearray((bad / rel).read_bytes())
        if damage == "flip":
            data[len(data) // 2] ^= 0x40
        else:
            data = data[:-100]
        (bad / rel).write_bytes(bytes(data))
        r = cli_in_process(capsys, "pull", f"{http_server.url}/bad-{damage}")
        assert_clean_error(r, rel, needle)
        partial = next((home / "models").glob(f".bad-{damage}@*.partial"))
        assert not (partial / rel).exists()  # the bad file is deleted; the good ones stay for the next pull
        assert not list((home / "models").glob(f"bad-{damage}@*"))


def test_partial_longer_than_the_servers_file(http_server, published, home, capsys):
    """The server's file is shorter than our partial one (truncated there): a Range past its end is a 416; the pull
    takes the whole file, finds it short of the manifest's size and rejects it."""
    from cubelm.store.manifest import parse_manifest
    bad = published.parent / "short"
    shutil.rmtree(bad, ignore_errors=True)
    shutil.copytree(published, bad)
    data = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[:MIB])
    digest = parse_manifest((bad / "manifest.json").read_bytes(), "x").digest
    partial = home / "models" / f".short@{digest}.partial"
    partial.mkdir(parents=True)
    (partial / "model.safetensors").write_bytes(data[:2 * MIB])
    assert_clean_error(cli_in_process(capsys, "pull", f"{http_server.url}/short"), "model.safetensors",
                       "size mismatch")
    assert [s for rel, s in http_server.gets if rel == "short/model.safetensors"] == [2 * MIB, 0]
    assert not (partial / "model.safetensors").exists()


def test_corrupt_partial_prefix_is_fetched_again(http_server, tiny_model, published, home, capsys):
    from cubelm.store.manifest import parse_manifest
    digest = parse_manifest((published / "manifest.json").read_bytes(), "x").digest
    partial = home / "models" / f".tiny@{digest}.partial"
    partial.mkdir(parents=True)
    (partial / "model.safetensors").write_bytes(b"\0" * MIB)  # a prefix that is not the file's
    r = cli_in_process(capsys, "pull", f"{http_server.url}/tiny")
    assert r.returncode == 0, r.stderr
    assert "does not verify; downloading it again" in r.stderr
    same_files(Path(r.stdout.strip()), tiny_model)
    assert [s for rel, s in http_server.gets if rel == "tiny/model.safetensors"] == [MIB, 0]


def test_bad_inputs(http_server, published, tiny_model, home, capsys):
    assert_clean_error(cli_in_process(capsys, "pull", "ftp://host/models/tiny"), "unknown URL scheme 'ftp'")
    try:
        import gcsfs  # noqa: F401
    except ImportError:  # gs:// is optional: without gcsfs, one line that says what to install
        assert_clean_error(cli_in_process(capsys, "pull", "gs://bucket/models/tiny"), "pip install gcsfs")
    assert_clean_error(cli_in_process(capsys, "pull", f"{http_server.url}/nothing"), "not found (HTTP 404)")
    closed = f"http://127.0.0.1:{free_port()}/tiny"  # nothing listens there
    assert_clean_error(cli_in_process(capsys, "pull", closed), "cannot read the manifest")
    assert_clean_error(cli_in_process(capsys, "pull", str(published), "--name", "../x"), "is not valid")
    assert_clean_error(cli_in_process(capsys, "push", tiny_model, f"{http_server.url}/x"), "read-only")
    assert_clean_error(cli_in_process(capsys, "push", home / "nope", "/tmp/x"), "is not a directory")
    assert_clean_error(cli_in_process(capsys, "pull", str(published), "--digest", "abc"), "--digest")
    (home / "models" / "local").mkdir(parents=True)  # a directory built here is never replaced by a pull
    assert_clean_error(cli_in_process(capsys, "pull", str(published), "--name", "local"), "does not manage")


def test_serve_pulls_from_s3_then_answers(tiny_model, s3, tmp_path, capsys):
    """`cubelm serve --model s3://...` pulls into an empty store and serves; greedy text equals the offline API's
    on the original directory."""
    import httpx
    from cubelm import LLM, SamplingParams
    assert cli_in_process(capsys, "push", tiny_model, "s3://models/serve-tiny").returncode == 0
    home = tmp_path / "serve-home"  # empty: the server's pull downloads
    env = s3_env(s3, home)
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "cubelm", "serve", "--model", "s3://models/serve-tiny",
                             "--port", str(port), "--num-blocks", "64", "--log-level", "warning"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_ready(base, proc, timeout=90)
        assert httpx.get(f"{base}/v1/models").json()["data"][0]["id"] == "serve-tiny"  # no @digest in the id
        body = {"model": "serve-tiny", "prompt": "def add(", "max_tokens": 8, "temperature": 0, "ignore_eos": True}
        got = httpx.post(f"{base}/v1/completions", json=body, timeout=60).json()["choices"][0]["text"]
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    assert list(home.glob("models/serve-tiny@*"))
    ref = LLM(str(tiny_model), num_blocks=64).generate("def add(", SamplingParams(max_tokens=8, temperature=0,
                                                                                  ignore_eos=True), use_tqdm=False)
    assert got == ref[0].outputs[0].text

