"""A real llama.cpp ``llama-server`` for the tests, built once from the llama.cpp source that
the installed llama-cpp-python vendors (``scripts/build-llama-server.sh``, cached in
``~/.cache/loopbot``) and started on 127.0.0.1 with a test GGUF.

Where the build is impossible (no C++ compiler or CMake) the tests that need it are skipped,
with the reason, unless ``LOOPBOT_REQUIRE_SERVERS=1`` (set by ``.ci/run``): then it is an error.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def required() -> bool:
    return os.environ.get("LOOPBOT_REQUIRE_SERVERS", "") not in ("", "0")


def server_binary() -> Path:
    """The cached llama-server, built on first use (a few minutes on 2 cores)."""
    missing = [tool for tool in ("cmake", "c++") if shutil.which(tool) is None]
    if missing:
        reason = f"llama-server cannot be built here: {', '.join(missing)} missing"
        if required():
            pytest.fail(reason + " (LOOPBOT_REQUIRE_SERVERS=1)")
        pytest.skip(reason)
    done = subprocess.run(["bash", str(ROOT / "scripts" / "build-llama-server.sh")],
                          capture_output=True, text=True, check=False,
                          env={**os.environ, "PYTHON": str(ROOT / ".venv" / "bin" / "python")}
                          if (ROOT / ".venv" / "bin" / "python").exists() else None)
    if done.returncode != 0:
        pytest.fail(f"building llama-server failed:\n{done.stderr[-3000:]}")
    return Path(done.stdout.strip().splitlines()[-1])


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class LlamaServer:
    """One llama-server process; ``stop()`` and ``start()`` again keep the same port."""

    def __init__(self, binary: Path, model: Path, *, parallel: int = 2, ctx: int = 4096,
                 threads: int = 1, extra: tuple[str, ...] = ()) -> None:
        self.binary, self.model = binary, model
        self.port = free_port()
        self.args = [str(binary), "-m", str(model), "--host", "127.0.0.1",
                     "--port", str(self.port), "-t", str(threads), "-c", str(ctx),
                     "--parallel", str(parallel), "--no-webui", *extra]
        self.process: subprocess.Popen[bytes] | None = None
        self.log = model.parent / f"llama-server-{self.port}.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 60.0) -> LlamaServer:
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(self.args, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"llama-server exited: {self.log.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as resp:
                    if resp.status == 200:
                        return self
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"llama-server did not become healthy: {self.log.read_text()[-2000:]}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None
