"""fetch_model against a real HTTP server on 127.0.0.1 (no internet needed)."""

from __future__ import annotations

import argparse
import hashlib
import io
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from bot.llm import model_cli
from bot.llm.fetch import FetchError, fetch_model

REPO = "Qwen/Qwen1.5-0.5B-Chat-GGUF"
NAME = "model.gguf"
PAYLOAD = bytes(range(256)) * 12_000  # ~3 MB: several read chunks, so progress is exercised
DIGEST = hashlib.sha256(PAYLOAD).hexdigest()


@dataclass
class FakeHub:
    """What the server sends and what it was asked."""

    body: bytes = PAYLOAD
    honour_range: bool = True
    # Bytes sent before the first response is cut off (None = send everything).
    cut_first_after: int | None = None
    requests: list[tuple[str, str | None]] = field(default_factory=list)
    # As huggingface.co serves LFS files: a 302 to a CDN, the checksum in X-Linked-Etag.
    redirect_to_cdn: bool = False
    cut_done: bool = False
    linked_etag: str | None = None


def _handler(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            rng = self.headers.get("Range")
            hub.requests.append((self.path, rng))
            if self.path == f"/{REPO}/resolve/main/{NAME}" and hub.redirect_to_cdn:
                self.send_response(302)
                self.send_header("Location", f"/cdn/{NAME}?signed=1")
                if hub.linked_etag is not None:
                    self.send_header("X-Linked-Etag", hub.linked_etag)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            served = (f"/cdn/{NAME}?signed=1" if hub.redirect_to_cdn
                      else f"/{REPO}/resolve/main/{NAME}")
            if self.path != served:
                self.send_error(404, "Entry not found")
                return
            start = 0
            if rng and hub.honour_range:
                start = int(rng.removeprefix("bytes=").rstrip("-"))
                if start >= len(hub.body):
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(hub.body)}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(206)
                self.send_header("Content-Range",
                                 f"bytes {start}-{len(hub.body) - 1}/{len(hub.body)}")
            else:
                self.send_response(200)
            self.send_header("Content-Length", str(len(hub.body) - start))
            self.end_headers()
            data = hub.body[start:]
            if hub.cut_first_after is not None and not hub.cut_done:
                hub.cut_done = True
                # A dropped connection: the promised length never arrives.
                self.wfile.write(data[:hub.cut_first_after])
                self.wfile.flush()
                self.close_connection = True
                return
            self.wfile.write(data)

    return Handler


@pytest.fixture
def hub() -> Iterator[tuple[FakeHub, str]]:
    state = FakeHub()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield state, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def _closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def test_full_download_with_checksum_and_progress(hub: tuple[FakeHub, str],
                                                  tmp_path: Path) -> None:
    state, url = hub
    log = io.StringIO()
    path = fetch_model(REPO, NAME, tmp_path / "models", base_url=url, stream=log,
                       sha256=hashlib.sha256(PAYLOAD).hexdigest().upper())
    assert path == tmp_path / "models" / NAME
    assert path.read_bytes() == PAYLOAD
    assert not path.with_name(NAME + ".part").exists()
    assert state.requests == [(f"/{REPO}/resolve/main/{NAME}", None)]
    lines = log.getvalue().splitlines()
    assert "\r" not in log.getvalue()  # not a terminal: plain lines
    assert lines[-2].startswith(f"{NAME}: 100.0% 3.1/3.1 MB") and lines[-2].endswith("MB/s")
    assert lines[-1] == f"{NAME}: SHA-256 verified ({DIGEST}, as configured)"


def test_the_checksum_the_hub_publishes_is_checked_without_configuration(
        hub: tuple[FakeHub, str], tmp_path: Path) -> None:
    state, url = hub
    state.redirect_to_cdn, state.linked_etag = True, f'"{DIGEST}"'
    log = io.StringIO()
    path = fetch_model(REPO, NAME, tmp_path, base_url=url, stream=log)
    assert path.read_bytes() == PAYLOAD
    assert [p for p, _ in state.requests] == [f"/{REPO}/resolve/main/{NAME}",
                                              f"/cdn/{NAME}?signed=1"]
    assert log.getvalue().splitlines()[-1] == (
        f"{NAME}: SHA-256 verified ({DIGEST}, as published by the server)")


def test_a_download_that_differs_from_the_published_checksum_is_discarded(
        hub: tuple[FakeHub, str], tmp_path: Path) -> None:
    state, url = hub
    state.redirect_to_cdn = True
    state.linked_etag = hashlib.sha256(b"what the hub holds").hexdigest()
    with pytest.raises(FetchError, match="SHA-256 mismatch"):
        fetch_model(REPO, NAME, tmp_path, base_url=url, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_a_resumed_download_keeps_the_published_checksum(hub: tuple[FakeHub, str],
                                                        tmp_path: Path) -> None:
    state, url = hub
    state.redirect_to_cdn, state.cut_first_after = True, 500_000
    state.linked_etag = hashlib.sha256(b"what the hub holds").hexdigest()
    with pytest.raises(FetchError, match="SHA-256 mismatch"):
        fetch_model(REPO, NAME, tmp_path, base_url=url, progress=False)
    assert [r for _, r in state.requests] == [None, None, "bytes=500000-", "bytes=500000-"]


def test_a_git_sha1_etag_is_not_taken_for_a_checksum(hub: tuple[FakeHub, str],
                                                     tmp_path: Path) -> None:
    state, url = hub
    state.redirect_to_cdn, state.linked_etag = True, '"' + "a" * 40 + '"'
    assert fetch_model(REPO, NAME, tmp_path, base_url=url, progress=False).read_bytes() == PAYLOAD


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_on_a_terminal_redraws_one_line(hub: tuple[FakeHub, str],
                                                 tmp_path: Path) -> None:
    _, url = hub
    screen = _Terminal()
    fetch_model(REPO, NAME, tmp_path, base_url=url, stream=screen)
    text = screen.getvalue()
    assert text.startswith("\r") and text.endswith("\n") and text.count("\n") == 1
    assert "100.0% 3.1/3.1 MB" in text.split("\r")[-1]


def test_resumes_a_partial_file_with_a_range_request(hub: tuple[FakeHub, str],
                                                     tmp_path: Path) -> None:
    state, url = hub
    (tmp_path / (NAME + ".part")).write_bytes(PAYLOAD[:1_000_000])
    path = fetch_model(REPO, NAME, tmp_path, base_url=url, progress=False)
    assert path.read_bytes() == PAYLOAD
    assert state.requests == [(f"/{REPO}/resolve/main/{NAME}", "bytes=1000000-")]


def test_a_dropped_connection_is_resumed_where_it_broke(hub: tuple[FakeHub, str],
                                                       tmp_path: Path) -> None:
    state, url = hub
    state.cut_first_after = 500_000
    path = fetch_model(REPO, NAME, tmp_path, base_url=url, progress=False,
                       sha256=hashlib.sha256(PAYLOAD).hexdigest())
    assert path.read_bytes() == PAYLOAD
    assert [r for _, r in state.requests] == [None, "bytes=500000-"]


def test_complete_part_file_is_finished_without_a_body(hub: tuple[FakeHub, str],
                                                      tmp_path: Path) -> None:
    state, url = hub
    (tmp_path / (NAME + ".part")).write_bytes(PAYLOAD)
    assert fetch_model(REPO, NAME, tmp_path, base_url=url, progress=False).read_bytes() == PAYLOAD
    assert state.requests[0][1] == f"bytes={len(PAYLOAD)}-"


def test_server_ignoring_range_restarts_cleanly(hub: tuple[FakeHub, str],
                                                tmp_path: Path) -> None:
    state, url = hub
    state.honour_range = False
    (tmp_path / (NAME + ".part")).write_bytes(b"stale bytes from elsewhere")
    path = fetch_model(REPO, NAME, tmp_path, base_url=url, progress=False)
    assert path.read_bytes() == PAYLOAD


def test_checksum_mismatch_is_refused_and_discarded(hub: tuple[FakeHub, str],
                                                    tmp_path: Path) -> None:
    _, url = hub
    with pytest.raises(FetchError, match="SHA-256 mismatch"):
        fetch_model(REPO, NAME, tmp_path, base_url=url, progress=False, sha256="0" * 64)
    assert list(tmp_path.iterdir()) == []


def test_existing_file_is_reused_without_network(tmp_path: Path) -> None:
    (tmp_path / NAME).write_bytes(b"already here")
    digest = hashlib.sha256(b"already here").hexdigest()
    path = fetch_model(REPO, NAME, tmp_path, base_url=_closed_port_url(), sha256=digest)
    assert path.read_bytes() == b"already here"
    with pytest.raises(FetchError, match="SHA-256 is not"):
        fetch_model(REPO, NAME, tmp_path, base_url=_closed_port_url(), sha256="1" * 64)


def test_unreachable_host_says_how_to_install_by_hand(tmp_path: Path) -> None:
    with pytest.raises(FetchError) as caught:
        fetch_model(REPO, NAME, tmp_path / "models", base_url=_closed_port_url(),
                    progress=False)
    message = str(caught.value)
    assert "looks offline" in message
    for hint in ("model.path", "LOOPBOT_MODEL", "--model", "loopbot model fetch",
                 str(tmp_path / "models" / NAME)):
        assert hint in message
    assert not (tmp_path / "models" / NAME).exists()


def test_missing_file_on_the_server_names_the_setting(hub: tuple[FakeHub, str],
                                                      tmp_path: Path) -> None:
    _, url = hub
    with pytest.raises(FetchError, match=r"HTTP 404.*model\.fetch_file"):
        fetch_model(REPO, "other.gguf", tmp_path, base_url=url, progress=False)


def test_fetch_command_uses_flags_over_settings(hub: tuple[FakeHub, str], tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    _, url = hub
    monkeypatch.delenv("LOOPBOT_CONFIG", raising=False)
    monkeypatch.delenv("LOOPBOT_MODEL_DIR", raising=False)
    parser = argparse.ArgumentParser(prog="loopbot")
    parser.add_argument("--config")
    model_cli.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["model", "fetch", "--repo", REPO, "--file", NAME, "--dir",
                              str(tmp_path), "--base-url", url, "--quiet"])
    assert args.func(args) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / NAME)
    assert (tmp_path / NAME).read_bytes() == PAYLOAD
    args = parser.parse_args(["model", "fetch", "--file", "x.gguf", "--dir", str(tmp_path),
                              "--base-url", _closed_port_url(), "--quiet"])
    assert args.func(args) == 1
    assert "LOOPBOT_MODEL" in capsys.readouterr().err
