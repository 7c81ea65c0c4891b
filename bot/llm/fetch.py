"""Download a model file (Hugging Face ``resolve`` URL layout) with the standard library only.

Model files are hundreds of MB and connections break, so the download goes to ``<file>.part``,
resumes from there with an HTTP Range request, is checked and only then renamed to its final
name: a file under the final name is always whole. The SHA-256 checked is the configured one or,
when none is configured, the one Hugging Face publishes for every LFS file in its
``X-Linked-Etag`` header (on the redirect to the CDN), so a default fetch is verified too; with
neither, only the size the server announced is checked. Offline machines get a message that
says how to install the model by hand.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import re
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from email.message import Message
from http.client import HTTPMessage
from pathlib import Path
from typing import IO, TextIO

from bot.errors import LoopbotError

DEFAULT_BASE_URL = "https://huggingface.co"
_CHUNK = 1 << 20
_ATTEMPTS = 3
_USER_AGENT = "loopbot-model-fetch/1.0"
_CONTENT_RANGE = re.compile(r"bytes\s+(?:(\d+)-(\d+)|\*)/(\d+|\*)")


class FetchError(LoopbotError, RuntimeError):
    """The model could not be downloaded; the message says what to do instead."""


def model_url(repo: str, filename: str, base_url: str = DEFAULT_BASE_URL) -> str:
    quoted = "/".join(urllib.parse.quote(part) for part in filename.split("/"))
    return f"{base_url.rstrip('/')}/{repo.strip('/')}/resolve/main/{quoted}"


def offline_help(repo: str, filename: str, dest: Path, base_url: str = DEFAULT_BASE_URL) -> str:
    """What to do without network access: used by fetch errors and by callers with no model."""
    return (
        "To install the model without a download here, either\n"
        f"  - copy a GGUF model file (e.g. {filename} from {base_url.rstrip('/')}/{repo}) to\n"
        f"    {dest} by hand, or anywhere else and point loopbot at it with\n"
        "    `model.path` in the config file, the LOOPBOT_MODEL environment variable or\n"
        "    the --model PATH flag; or\n"
        "  - run `loopbot model fetch` on a machine with internet access and copy the file\n"
        f"    it prints over to {dest}."
    )


class _Progress:
    """Percent, MB and MB/s on stderr: one redrawn line on a terminal, plain lines otherwise."""

    def __init__(self, stream: TextIO | None, total: int | None, start: int, label: str) -> None:
        self.stream = stream
        self.total = total
        self.start_bytes = start
        self.started = time.monotonic()
        self.tty = bool(stream is not None and stream.isatty())
        self.label = label
        self.last_draw = 0.0
        self.last_step = -1

    def _line(self, done: int) -> str:
        elapsed = max(time.monotonic() - self.started, 1e-6)
        rate = (done - self.start_bytes) / elapsed / 1e6
        mb = f"{done / 1e6:.1f}"
        if self.total:
            pct = 100.0 * done / self.total
            return f"{self.label}: {pct:5.1f}% {mb}/{self.total / 1e6:.1f} MB {rate:.1f} MB/s"
        return f"{self.label}: {mb} MB {rate:.1f} MB/s"

    def update(self, done: int, final: bool = False) -> None:
        if self.stream is None:
            return
        now = time.monotonic()
        if self.tty:
            if final or now - self.last_draw >= 0.1:
                self.stream.write("\r" + self._line(done) + ("\n" if final else ""))
                self.stream.flush()
                self.last_draw = now
            return
        # Logs and pipes: a line per 10% (or per 10 s when the size is unknown).
        step = int(10 * done / self.total) if self.total else int(now - self.started) // 10
        if final or step > self.last_step:
            self.stream.write(self._line(done) + "\n")
            self.stream.flush()
            self.last_step = step


def _sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(_CHUNK):
            digest.update(block)
    return digest.hexdigest()


_SHA256_HEX = re.compile(r"[0-9a-f]{64}")


def _published_sha256(headers: Message) -> str | None:
    """The SHA-256 the Hub states for an LFS file, or None (git files carry a SHA-1 there)."""
    value = headers.get("X-Linked-Etag") or ""
    value = value.strip().removeprefix("W/").strip('"').lower()
    return value if _SHA256_HEX.fullmatch(value) else None


class _RecordRedirects(urllib.request.HTTPRedirectHandler):
    """Keeps the checksum header of the Hub's redirect, which the CDN's answer lacks."""

    def __init__(self) -> None:
        self.sha256: str | None = None

    def redirect_request(self, req: urllib.request.Request, fp: IO[bytes], code: int,
                         msg: str, headers: HTTPMessage,
                         newurl: str) -> urllib.request.Request | None:
        self.sha256 = _published_sha256(headers) or self.sha256
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _open(url: str, offset: int, timeout: float,
          redirects: _RecordRedirects) -> http.client.HTTPResponse:
    headers = {"User-Agent": _USER_AGENT}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    request = urllib.request.Request(url, headers=headers)
    opener = urllib.request.build_opener(redirects)
    response: http.client.HTTPResponse = opener.open(request, timeout=timeout)
    return response


def _is_offline(exc: BaseException) -> bool:
    reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
    return isinstance(reason, OSError)  # DNS failure, refused connection, timeout


def fetch_model(
    repo: str,
    filename: str,
    dest_dir: str | os.PathLike[str],
    *,
    sha256: str | None = None,
    base_url: str = DEFAULT_BASE_URL,
    progress: bool = True,
    timeout: float = 30.0,
    stream: TextIO | None = None,
) -> Path:
    """Download ``{base_url}/{repo}/resolve/main/{filename}`` into ``dest_dir``.

    Returns the final path. An existing complete file (matching ``sha256`` when given) is
    reused; a ``.part`` file is resumed. Raises FetchError with instructions on failure.
    """
    directory = Path(dest_dir).expanduser()
    dest = directory / Path(filename).name
    part = dest.with_name(dest.name + ".part")
    want = sha256.strip().lower() if sha256 else None
    url = model_url(repo, filename, base_url)
    out = (stream or sys.stderr) if progress else None

    if dest.is_file():
        if want is None or _sha256_of(dest) == want:
            return dest
        raise FetchError(f"{dest} exists but its SHA-256 is not {want}; delete it and run "
                         "`loopbot model fetch` again")
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise FetchError(f"cannot create the model directory {directory}: {exc}") from exc

    last_error: BaseException | None = None
    for _attempt in range(_ATTEMPTS):
        try:
            total, published = _download(url, part, timeout, out, dest.name)
        except (http.client.IncompleteRead, ConnectionError, TimeoutError) as exc:
            # The connection broke mid-file: what arrived stays in .part and the next attempt
            # asks only for the rest.
            last_error = exc
            continue
        except urllib.error.HTTPError as exc:
            raise FetchError(
                f"downloading {url} failed: the server answered HTTP {exc.code} {exc.reason}. "
                "Check model.fetch_repo / model.fetch_file (or --repo / --file).\n"
                + offline_help(repo, filename, dest, base_url)
            ) from exc
        except urllib.error.URLError as exc:
            if _is_offline(exc):
                raise FetchError(
                    f"cannot reach {urllib.parse.urlsplit(url).netloc} to download {url} "
                    f"({exc.reason}): this machine looks offline.\n"
                    + offline_help(repo, filename, dest, base_url)
                ) from exc
            raise FetchError(f"downloading {url} failed: {exc.reason}") from exc
        if want is not None and published is not None and published != want:
            # Verified below against the configured value; the difference is worth a word,
            # since it usually means the file was updated upstream.
            print(f"note: the server publishes SHA-256 {published} for {dest.name}, "
                  f"the configured one is {want}", file=out or sys.stderr)
        checked = want or published
        _verify(part, dest, total, checked)
        if out is not None and checked is not None:
            source = "as configured" if want is not None else "as published by the server"
            print(f"{dest.name}: SHA-256 verified ({checked}, {source})", file=out)
        os.replace(part, dest)
        return dest
    received = part.stat().st_size if part.exists() else 0
    raise FetchError(
        f"downloading {url} kept failing ({last_error!r}); the {received} bytes received are "
        f"kept in {part}: run `loopbot model fetch` again to resume.\n"
        + offline_help(repo, filename, dest, base_url)
    )


def _download(url: str, part: Path, timeout: float, out: TextIO | None,
              label: str) -> tuple[int | None, str | None]:
    """Append the missing bytes of ``url`` to ``part``.

    Returns the total size if announced and the SHA-256 the server published, if any.
    """
    offset = part.stat().st_size if part.exists() else 0
    redirects = _RecordRedirects()
    try:
        response = _open(url, offset, timeout, redirects)
    except urllib.error.HTTPError as exc:
        if exc.code != 416 or not offset:
            raise
        # Nothing left to send for this offset: the .part file is complete (or too long; the
        # size check below sorts that out).
        match = _CONTENT_RANGE.match(exc.headers.get("Content-Range", ""))
        size = int(match.group(3)) if match and match.group(3) != "*" else offset
        return size, _published_sha256(exc.headers) or redirects.sha256
    published = _published_sha256(response.headers) or redirects.sha256
    with response:
        total: int | None = None
        if response.status == 206:
            match = _CONTENT_RANGE.match(response.headers.get("Content-Range", ""))
            if not match or match.group(1) is None or int(match.group(1)) != offset:
                raise FetchError(f"{url}: the server resumed at the wrong place "
                                 f"({response.headers.get('Content-Range')!r}, wanted {offset})")
            total = int(match.group(3)) if match.group(3) != "*" else None
            mode = "ab"
        else:
            # A 200 to a Range request means the server sends the whole file again.
            offset = 0
            length = response.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            mode = "wb"
        bar = _Progress(out, total, offset, label)
        done = offset
        with part.open(mode) as fh:
            while block := response.read(_CHUNK):
                fh.write(block)
                done += len(block)
                bar.update(done)
        if total is not None and done < total:
            raise http.client.IncompleteRead(b"", total - done)
        bar.update(done, final=True)
        return total, published


def _verify(part: Path, dest: Path, total: int | None, want: str | None) -> None:
    size = part.stat().st_size
    if total is not None and size != total:
        part.unlink(missing_ok=True)
        raise FetchError(f"{dest.name}: received {size} bytes but the server announced "
                         f"{total}; the partial file was removed, run the fetch again")
    if want is not None:
        got = _sha256_of(part)
        if got != want:
            part.unlink(missing_ok=True)
            raise FetchError(f"{dest.name}: SHA-256 mismatch (expected {want}, got {got}); "
                             "the download was discarded: run the fetch again, and if it "
                             "keeps failing check model.fetch_sha256 / --sha256.")
