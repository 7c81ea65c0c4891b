"""Webhook settings: what is bound, registered and checked, and the named refusals."""

from __future__ import annotations

import pytest

from bot.config import ConfigError, TelegramConfig
from bot.telegram.webhook import (
    ALLOWED_UPDATES,
    check_polling,
    parse_listen,
    plan_webhook,
    registration,
    registration_problems,
)


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


# --- replicas: the registration is left to `loopbot webhook set` --------------------------


def test_a_replica_that_does_not_register_keeps_the_shared_secret() -> None:
    plan = plan_webhook(TelegramConfig(webhook_url="https://bot.example.com/tg",
                                       webhook_secret="Shared_1", webhook_register=False))
    assert (plan.register, plan.secret_token, plan.secret_generated) == (False, "Shared_1", False)
    assert plan_webhook(TelegramConfig(webhook_url="https://bot.example.com/tg")).register


def test_a_replica_without_the_shared_secret_is_refused_not_given_a_random_one() -> None:
    with pytest.raises(ConfigError) as refused:
        plan_webhook(TelegramConfig(webhook_url="https://bot.example.com/tg",
                                    webhook_register=False))
    message = str(refused.value)
    assert "telegram.webhook_secret (LOOPBOT_WEBHOOK_SECRET) is empty" in message
    assert "LOOPBOT_WEBHOOK_REGISTER" in message and "loopbot webhook set" in message


def test_polling_is_refused_when_the_webhook_belongs_to_the_replicas() -> None:
    check_polling(TelegramConfig())  # one bot, polling: fine
    check_polling(TelegramConfig(webhook_url="https://x.example.com", webhook_register=False))
    with pytest.raises(ConfigError, match="long polling would delete the webhook"):
        check_polling(TelegramConfig(webhook_register=False))


def test_webhook_set_needs_the_url_and_a_secret_it_does_not_make_up() -> None:
    ok = registration(TelegramConfig(webhook_url=" https://bot.example.com/tg ",
                                     webhook_secret="Shared_1"))
    assert (ok.webhook_url, ok.secret_token) == ("https://bot.example.com/tg", "Shared_1")
    with pytest.raises(ConfigError, match=r"LOOPBOT_WEBHOOK_URL"):
        registration(TelegramConfig(webhook_secret="Shared_1"))
    with pytest.raises(ConfigError, match=r"LOOPBOT_WEBHOOK_SECRET\) is empty"):
        registration(TelegramConfig(webhook_url="https://bot.example.com/tg"))
    with pytest.raises(ConfigError, match="only delivers to https"):
        registration(TelegramConfig(webhook_url="http://bot.example.com/tg",
                                    webhook_secret="Shared_1"))


HOOK = "https://bot.example.com/tg"


def test_a_matching_registration_has_no_problems() -> None:
    assert registration_problems(HOOK, list(ALLOWED_UPDATES), HOOK) == []
    # More types than handled are harmless (the handlers ignore them).
    assert registration_problems(HOOK, [*ALLOWED_UPDATES, "poll"], HOOK) == []


@pytest.mark.parametrize(("url", "updates", "expected"), [
    ("", [], ["no webhook is registered"]),
    ("https://old.example.com/tg", list(ALLOWED_UPDATES),
     ["delivers updates to https://old.example.com/tg, not to telegram.webhook_url " + HOOK]),
    (HOOK, ["message", "callback_query"], ["does not ask for message_reaction"]),
    # Registered without allowed_updates: Telegram's default leaves reactions out.
    (HOOK, [], ["does not ask for message_reaction updates (registered: Telegram default)"]),
    ("https://old.example.com/tg", ["message"],
     ["delivers updates to https://old.example.com/tg",
      "does not ask for callback_query, message_reaction"]),
])
def test_registration_problems_are_named(url: str, updates: list[str],
                                         expected: list[str]) -> None:
    problems = registration_problems(url, updates, HOOK)
    assert len(problems) == len(expected)
    for problem, part in zip(problems, expected, strict=True):
        assert part in problem
