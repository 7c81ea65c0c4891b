"""Structured logs: JSON lines, levels, and no secrets or message texts above DEBUG."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest

from bot.config import LoggingConfig
from bot.ops.logs import UserText, setup_logging

TOKEN = "123456:AAH-secret-token-value"


@pytest.fixture(autouse=True)
def _restore_root_logger() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    quiet = {name: logging.getLogger(name).level for name in ("httpx", "apscheduler")}
    yield
    for h in list(root.handlers):
        root.removeHandler(h)
    for h in handlers:
        root.addHandler(h)
    root.setLevel(level)
    for name, lvl in quiet.items():
        logging.getLogger(name).setLevel(lvl)


def test_json_lines_carry_level_logger_extras_and_tracebacks() -> None:
    out = io.StringIO()
    setup_logging(LoggingConfig(level="INFO", json=True), stream=out)
    log = logging.getLogger("loopbot.test")
    log.debug("not shown")
    log.info("vote stored for %s", 42, extra={"version": "v1-en"})
    try:
        raise ValueError("boom")
    except ValueError:
        log.exception("job failed")
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [(r["level"], r["logger"], r["message"]) for r in lines] == [
        ("INFO", "loopbot.test", "vote stored for 42"),
        ("ERROR", "loopbot.test", "job failed")]
    assert lines[0]["version"] == "v1-en"
    assert lines[0]["ts"].endswith("+00:00")
    assert "ValueError: boom" in lines[1]["exc"]


@pytest.mark.parametrize("as_json", [False, True])
def test_user_texts_only_at_debug_and_secrets_never(as_json: bool) -> None:
    out = io.StringIO()
    setup_logging(LoggingConfig(level="DEBUG", json=as_json), secrets=[TOKEN], stream=out)
    log = logging.getLogger("loopbot.test")
    text = UserText("我的秘密消息 my private message")
    log.debug("received %s", text)
    log.info("received %s", text)
    log.warning("received %(text)s", {"text": text})
    log.info("extra", extra={"user_text": text})
    log.info("POST https://api.telegram.org/bot%s/sendMessage", TOKEN)
    lines = out.getvalue().splitlines()
    assert len(lines) == 5
    assert "my private message" in lines[0]
    withheld = f"<text withheld: {len(text)} chars>"
    assert all("private message" not in line for line in lines[1:])
    assert withheld in lines[1] and withheld in lines[2]
    if as_json:
        assert json.loads(lines[3])["user_text"] == withheld
    assert "bot<redacted>/sendMessage" in lines[4]
    assert TOKEN not in out.getvalue()


def test_info_silences_chatty_libraries_and_bad_levels_are_named() -> None:
    out = io.StringIO()
    setup_logging(LoggingConfig(level="info"), stream=out)
    logging.getLogger("httpx").info("HTTP Request: POST .../getUpdates")
    logging.getLogger("httpx").warning("connection reset")
    assert out.getvalue().count("\n") == 1 and "connection reset" in out.getvalue()
    with pytest.raises(ValueError, match=r"logging\.level"):
        setup_logging(LoggingConfig(level="LOUD"), stream=out)
