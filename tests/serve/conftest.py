"""Fixtures for the serving tests: a tiny random model (a tokenizer trained in the test), live servers on
127.0.0.1 (``cubelm serve`` subprocesses, or uvicorn in a thread when a test must look inside the engine), and a
``redis-server`` for the shared rate-limit tests."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed: pip install -e '.[serve]'")

from helpers import free_port, wait_ready  # noqa: E402,F401 - re-exported for tests/serve

API_KEY = "sk-test-1"


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> Path:
    from helpers import make_tiny_model_dir
    return make_tiny_model_dir(tmp_path_factory.mktemp("serve_model"))


class ServeProcess:
    """``python -m cubelm serve`` (or another ``launcher`` of the same CLI) on a free port; stopped by its pid."""

    def __init__(self, model_dir: Path, *args: str, env: dict | None = None, launcher: tuple = ("-m", "cubelm")):
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, *launcher, "serve", "--model", str(model_dir), "--served-model-name", "m",
               "--port", str(self.port), "--num-blocks", "256", "--log-level", "warning", *args]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})

    def start(self) -> "ServeProcess":
        wait_ready(self.base, self.proc)
        return self

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)


@pytest.fixture
def serve_process(model_dir):
    procs = []

    def start(*args: str, **kw) -> ServeProcess:
        p = ServeProcess(model_dir, *args, **kw)
        procs.append(p)
        return p.start()

    yield start
    for p in procs:
        p.stop()


class InProcessServer:
    """The app under uvicorn in a thread of the test process, so a test can inspect ``state.engine``."""

    def __init__(self, model_dir: Path, **overrides):
        import uvicorn

        from cubelm.serve.app import create_app
        from cubelm.serve.state import ServerState
        from cubelm.serve.commands import ServeOptions
        options = ServeOptions(model=str(model_dir), served_model_name="m", num_blocks=256, **overrides)
        self.state = ServerState(options)
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(create_app(self.state), host="127.0.0.1", port=self.port, log_level="warning",
                                lifespan="on", timeout_graceful_shutdown=2)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        wait_ready(self.base)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(15)


@pytest.fixture
def inprocess_server(model_dir):
    servers = []

    def start(**overrides) -> InProcessServer:
        s = InProcessServer(model_dir, **overrides)
        servers.append(s)
        return s

    yield start
    for s in servers:
        s.stop()


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory):
    """A running Redis: the one ``.ci/run`` starts on 6379, else one started here; skipped only without a binary."""
    try:
        with socket.create_connection(("127.0.0.1", 6379), timeout=0.5):
            yield "redis://127.0.0.1:6379"
            return
    except OSError:
        pass
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("no redis-server binary on PATH (apt-get install -y redis-server; .ci/run does this)")
    port = free_port()
    d = tmp_path_factory.mktemp("redis")
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                             "--dir", str(d)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                break
        except OSError:
            time.sleep(0.05)
    yield f"redis://127.0.0.1:{port}"
    proc.terminate()
    proc.wait(10)
