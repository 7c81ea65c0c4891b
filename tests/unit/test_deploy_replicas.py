"""deploy/compose.replicas.yaml and deploy/nginx.replicas.conf agree with each other and with
the bot: every replica is configured as one (no registration at start, the shared secret, the
shared database), nginx balances over exactly those replicas, and the one-shot commands
exist. Docker is not needed: the files are read as text and YAML."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from bot.config import load_settings
from bot.telegram.webhook import plan_webhook

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
# What deploy/.env would hold.
DOT_ENV = {"POSTGRES_PASSWORD": "pw_abc-123", "LOOPBOT_WEBHOOK_SECRET": "shared_Secret-1",
           "LOOPBOT_WEBHOOK_URL": "https://bot.example.com/telegram/loopbot"}


def _interpolate(text: str) -> str:
    """Compose's ${VAR}, ${VAR:-default} and ${VAR:?error}, from DOT_ENV."""
    def value(match: re.Match[str]) -> str:
        name, op, arg = match[1], match[2], match[3]
        if name in DOT_ENV:
            return DOT_ENV[name]
        if op == ":-":
            return str(arg)
        raise AssertionError(f"${{{name}}} is required and not in DOT_ENV")

    return re.sub(r"\$\{([A-Z0-9_]+)(?:(:[-?])([^}]*))?\}", value, text)


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(
        _interpolate((DEPLOY / "compose.replicas.yaml").read_text(encoding="utf-8")))
    return data


def _replicas(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {name: svc for name, svc in compose["services"].items()
            if (svc.get("command") or [None])[0] == "run"}


def test_there_are_two_replicas_and_each_knows_the_count(compose: dict[str, Any]) -> None:
    replicas = _replicas(compose)
    assert sorted(replicas) == ["bot1", "bot2"]
    for svc in replicas.values():
        assert svc["environment"]["LOOPBOT_REPLICAS"] == str(len(replicas))


def test_every_replica_is_a_valid_replica_configuration(compose: dict[str, Any]) -> None:
    for name, svc in _replicas(compose).items():
        env = svc["environment"]
        settings = load_settings(None, env={**env, "TELEGRAM_BOT_TOKEN": "1:x"})
        tg = settings.telegram
        assert tg.webhook_register is False, name
        assert tg.webhook_secret == DOT_ENV["LOOPBOT_WEBHOOK_SECRET"], name
        assert settings.storage.url == "postgresql://loopbot:pw_abc-123@postgres/loopbot", name
        assert settings.model.backend == "remote" and settings.model.url == [
            "http://llama-server:8080"], name
        plan = plan_webhook(tg)  # what `loopbot run` does first in webhook mode
        assert (plan.register, plan.listen_host, plan.listen_port) == (False, "0.0.0.0", 8443)
        assert svc["depends_on"]["migrate"] == {"condition": "service_completed_successfully"}
    # One set of settings for all: a replica cannot differ from the one `webhook set` used;
    # only each replica's name differs (it resumes its own claims after a restart).
    envs = [{k: v for k, v in svc["environment"].items() if k != "LOOPBOT_REPLICA_ID"}
            for svc in compose["services"].values()
            if "LOOPBOT_WEBHOOK_SECRET" in svc.get("environment", {})]
    assert len(envs) == 4 and all(env == envs[0] for env in envs)  # bot1, bot2, migrate, webhook
    names = [compose["services"][name]["environment"]["LOOPBOT_REPLICA_ID"]
             for name in sorted(_replicas(compose))]
    assert names == sorted(set(names)) == ["bot1", "bot2"]


def test_the_one_shot_services(compose: dict[str, Any]) -> None:
    from bot.cli import build_parser

    services = compose["services"]
    assert services["migrate"]["command"] == ["db", "upgrade"]
    assert services["migrate"]["depends_on"]["postgres"] == {"condition": "service_healthy"}
    assert services["migrate"]["restart"] == "no"
    assert services["webhook"]["command"] == ["webhook", "set"]
    assert services["webhook"]["restart"] == "no"
    # The image's entrypoint runs `loopbot <command>`: it must parse.
    args = build_parser().parse_args(services["webhook"]["command"])
    assert args.func.__module__ == "bot.telegram.webhook_cli"


def test_postgres_is_checked_and_keeps_its_data(compose: dict[str, Any]) -> None:
    pg = compose["services"]["postgres"]
    assert pg["image"] == "postgres:15"
    assert "pg_isready" in " ".join(pg["healthcheck"]["test"])
    assert pg["environment"]["POSTGRES_PASSWORD"] == DOT_ENV["POSTGRES_PASSWORD"]
    assert any(v.endswith(":/var/lib/postgresql/data") for v in pg["volumes"])
    assert "ports" not in pg


def test_nginx_balances_over_exactly_the_replicas(compose: dict[str, Any]) -> None:
    conf = (DEPLOY / "nginx.replicas.conf").read_text(encoding="utf-8")
    upstream = re.search(r"upstream loopbot_replicas \{(.*?)\n\}", conf, re.S)
    assert upstream is not None
    servers = re.findall(r"^\s*server (\S+)", upstream[1], re.M)
    assert sorted(servers) == [f"{name}:8443" for name in sorted(_replicas(compose))]
    assert "proxy_pass http://loopbot_replicas;" in conf
    # The balanced location is the webhook URL's path, as each replica serves it.
    path = DOT_ENV["LOOPBOT_WEBHOOK_URL"].split("example.com", 1)[1]
    assert f"location = {path} {{" in conf
    nginx = compose["services"]["nginx"]
    assert "./nginx.replicas.conf:/etc/nginx/conf.d/default.conf:ro" in nginx["volumes"]
    assert set(nginx["depends_on"]) == set(_replicas(compose))
