"""Webhook settings: what is bound, registered and checked, and the named refusals."""

from __future__ import annotations

import pytest

from bot.config import ConfigError, TelegramConfig
from bot.telegram.webhook import parse_listen, plan_webhook


@pytest.mark.parametrize(("value", "expected"), [
    ("127.0.0.1:8443", ("127.0.0.1", 8443)),
    ("0.0.0.0:80", ("0.0.0.0", 80)),
    (":9000", ("0.0.0.0", 9000)),
    ("[::1]:8443", ("::1", 8443)),
    ("localhost:1", ("localhost", 1)),
])
def test_listen_addresses(value: str, expected: tuple[str, int]) -> None:
    assert parse_listen(value) == expected


@pytest.mark.parametrize("value", ["8443", "host:", "host:99999", "::1:80", "a:b"])
def test_bad_listen_addresses_are_named(value: str) -> None:
    with pytest.raises(ConfigError, match=r"telegram\.webhook_listen"):
        parse_listen(value)


def test_the_public_path_is_served_locally_and_the_secret_is_kept() -> None:
    plan = plan_webhook(TelegramConfig(webhook_url="https://bot.example.com/tg/loopbot/",
                                       webhook_listen="127.0.0.1:8081",
                                       webhook_secret="Abc_123-xyz"))
    assert (plan.webhook_url, plan.listen_host, plan.listen_port, plan.url_path) == (
        "https://bot.example.com/tg/loopbot/", "127.0.0.1", 8081, "tg/loopbot")
    assert (plan.secret_token, plan.secret_generated) == ("Abc_123-xyz", False)


def test_without_a_secret_each_run_gets_a_random_valid_one() -> None:
    cfg = TelegramConfig(webhook_url="https://bot.example.com")
    first, second = plan_webhook(cfg), plan_webhook(cfg)
    assert first.secret_generated and first.secret_token != second.secret_token
    assert len(first.secret_token) >= 32 and first.url_path == ""


@pytest.mark.parametrize(("changes", "message"), [
    ({"webhook_url": "http://bot.example.com/x"}, "only delivers to https"),
    ({"webhook_url": "https://bot.example.com:9999/x"}, "ports 80, 88, 443, 8443"),
    ({"webhook_url": "bot.example.com/x"}, "expected https://host/path"),
    ({"webhook_url": "https://bot.example.com/x?a=1"}, "query"),
    ({"webhook_url": "https://bot.example.com/x", "webhook_secret": "has space"},
     "webhook_secret"),
])
def test_settings_telegram_would_refuse_are_refused_by_name(changes: dict[str, str],
                                                           message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        plan_webhook(TelegramConfig(**changes))  # type: ignore[arg-type]


def test_a_self_hosted_bot_api_may_deliver_over_http_to_any_port() -> None:
    plan = plan_webhook(TelegramConfig(base_url="http://127.0.0.1:8081/bot",
                                       webhook_url="http://10.0.0.5:9999/hook"))
    assert (plan.url_path, plan.listen_port) == ("hook", 8443)
