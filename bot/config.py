"""Typed settings: one YAML file, then environment variables, then command-line flags.

Every section is a dataclass; the loader walks the dataclass fields, so a new setting is one
typed field with a default, and unknown keys or wrong types are refused with the key's dotted
name instead of a traceback deep inside the bot.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from analytics.decide import DecisionConfig
from bot.errors import LoopbotError
from bot.learning.cycle import LoopConfig


class ConfigError(LoopbotError, ValueError):
    """A setting is missing, unknown or of the wrong type; the message names the key."""


@dataclass
class TelegramConfig:
    # Secret: prefer the TELEGRAM_BOT_TOKEN environment variable over the file.
    token: str = ""
    # Telegram user ids allowed to use admin commands (LOOPBOT_ADMINS=1,2).
    admins: list[int] = field(default_factory=list)
    # Bot API root; change it for a self-hosted Bot API server (or a test server).
    base_url: str = "https://api.telegram.org/bot"
    # File-download root of the same server (for documents users send).
    base_file_url: str = "https://api.telegram.org/file/bot"
    # What a private chat gets: "both", "verdict" or "reply".
    respond_with: str = "both"
    # Emoji on chat replies counted as good / bad feedback.
    positive_reactions: list[str] = field(default_factory=lambda: ["👍", "❤", "🔥", "👏"])
    negative_reactions: list[str] = field(default_factory=lambda: ["👎", "💩", "🤮"])
    # Per-user flood protection: at most this many messages per window.
    user_rate_limit: int = 8
    user_rate_window_s: float = 30.0
    # Longest message text processed; longer ones are cut (and the user told).
    max_message_chars: int = 2000
    # Edit the reply while it is generated (at most once per this many seconds; 0 = off).
    stream_edit_interval_s: float = 0.0
    # Polling: how long a getUpdates request waits on the server.
    poll_timeout_s: int = 10
    # Webhook mode (empty = long polling).
    webhook_url: str = ""
    webhook_listen: str = "0.0.0.0:8443"
    webhook_secret: str = ""
    # Whether `loopbot run` registers the webhook (setWebhook) at start. Several replicas
    # behind a load balancer set this to false, share one webhook_secret and register once
    # with `loopbot webhook set` (otherwise each start would replace the others' secret).
    webhook_register: bool = True
    # How many bot processes share this bot token and database: Telegram's overall send rate
    # (~30/s) and the per-user rate limit are divided among them.
    replicas: int = 1
    # This replica's name: the owner of the messages, chats and jobs it claims in the
    # database. Keep it stable across restarts (e.g. the container name), so a restarted
    # replica resumes its own claims at once; empty = "local" for one replica, else
    # <hostname>-<pid>. Env: LOOPBOT_REPLICA_ID
    replica_id: str = ""
    # Largest webhook request body accepted (Telegram's updates are a few kB).
    webhook_max_body_bytes: int = 1_048_576
    # Messages a group may have waiting to be sent before it is told the bot is busy and new
    # ones are dropped (Telegram lets a bot send 20 a minute into one group).
    group_backlog_limit: int = 20


@dataclass
class ModelConfig:
    # GGUF file; empty = the fetched default in model_dir.
    path: str = ""
    # Where `loopbot model fetch` puts models and where the default one is looked for.
    model_dir: str = "~/.cache/loopbot/models"
    # "llama_cpp" (runs qwen2 in this process), "remote" (an inference server: model.url) or
    # "ctransformers" (optional extra; older architectures only).
    backend: str = "llama_cpp"
    # backend "remote": the inference servers' base URLs (llama-server, or an OpenAI-compatible
    # server such as vLLM, Ollama, LM Studio). One chat's requests go to the same server while
    # it is up, so the server's prompt cache is reused. Env: LOOPBOT_MODEL_URL=a,b
    url: list[str] = field(default_factory=list)
    # What the servers speak: "llama-server" (token ids in, exact label probabilities out:
    # verdicts and replies) or "openai-chat" (/v1/chat/completions: replies only; verdicts
    # stay in process, so model.path must name the same model as a GGUF).
    remote_api: Literal["llama-server", "openai-chat"] = "llama-server"
    # The model name sent to an OpenAI-compatible server; empty = the first of /v1/models.
    remote_model: str = ""
    # Bearer token for the servers. Secret: set LOOPBOT_MODEL_API_KEY instead of the file.
    api_key: str = ""
    # Where verdicts are scored with backend "remote": "auto" (on the server when it can give
    # exact label probabilities, else in process), "remote" or "local" (in process).
    verdicts: Literal["auto", "remote", "local"] = "auto"
    # Seconds to open a connection to a server; a server that refuses or times out is skipped
    # for remote_retry_s (other servers take its chats) and /healthz names it.
    remote_connect_timeout_s: float = 3.0
    remote_retry_s: float = 5.0
    # Requests in flight to each server at once (its slots, e.g. llama-server --parallel);
    # more wait here, up to model.max_queue in all, then "busy".
    remote_parallel: int = 4
    # CPU threads for inference; 0 = all cores.
    n_threads: int = 0
    # The most tokens one reply's prompt and answer may take (older turns are dropped to fit).
    n_ctx: int = 2048
    # Replies generated together, one sequence each, one token for all of them per step (on 2
    # cores a step of 8 costs ~4x a step of 1: twice the tokens per second); 1 = one reply
    # after another; 0 = sized for this machine (4 per CPU thread, from 4 to 16).
    parallel_replies: int = 0
    # KV cache cells (tokens) shared by the replies in progress; a reply waits until the
    # replies before it leave room for its prompt and answer. 0 = 256 per parallel reply, at
    # least n_ctx. Each cell costs ~52 kB in q8_0 on Qwen1.5-0.5B (24 layers x 1024 x K, V).
    reply_kv_tokens: int = 0
    # KV cache cells of the verdict context: the prompt versions' cached prefixes and the
    # message being classified. The least recently used prefix is dropped when a message needs
    # its room; a message longer than what fits is cut.
    verdict_kv_tokens: int = 768
    # Prompt tokens of a newly arrived reply evaluated between two decode steps (so that the
    # replies in progress are not stalled by a long prompt).
    prefill_chunk_tokens: int = 64
    # KV cache type of both contexts: "q8_0" (half the memory of f16) or "f16".
    kv_cache_type: Literal["q8_0", "f16"] = "q8_0"
    # Prompt versions whose prefix KV state stays cached.
    prefix_cache_versions: int = 4
    # A caller waiting longer than this gets an error; the worker keeps serving.
    verdict_timeout_s: float = 30.0
    reply_timeout_s: float = 120.0
    # Pending inference jobs beyond this are refused with "busy" instead of queueing forever.
    max_queue: int = 32
    # Tokens of a user's message that are read; the rest is cut.
    max_input_tokens: int = 512
    # Download source for `loopbot model fetch`.
    fetch_repo: str = "Qwen/Qwen1.5-0.5B-Chat-GGUF"
    fetch_file: str = "qwen1_5-0_5b-chat-q8_0.gguf"
    # Expected SHA-256 of that file; empty = check the one the Hub publishes for it.
    fetch_sha256: str = ""
    fetch_base_url: str = "https://huggingface.co"


@dataclass
class StorageConfig:
    # The SQLite database (WAL mode; keep it on a local disk). Used when url is empty.
    db: str = "loopbot.db"
    # SQLAlchemy-style database URL: empty = sqlite:///<db>; postgresql://user:pass@host/name
    # for several replicas on one shared database. Env: LOOPBOT_DATABASE_URL
    url: str = ""
    # Message texts older than this are erased (votes and labels stay). 0 = keep forever.
    retention_days: int = 90
    # Nightly backups go here; the newest backup_keep are kept.
    backup_dir: str = "backups"
    backup_keep: int = 7
    # Nightly backup hour (UTC); -1 = off.
    backup_hour_utc: int = -1


@dataclass
class PromptsConfig:
    # Folder of prompt version YAML files.
    directory: str = "prompts"
    # Version served to everybody until the database says otherwise.
    default_version: str = "v1-zh"
    # Salt for the sticky user -> bucket hash; changing it reshuffles every user.
    routing_salt: str = "loopbot"


@dataclass
class HealthConfig:
    # Port of the /healthz and /metrics endpoint; 0 = off.
    port: int = 0
    # Address to listen on; 0.0.0.0 inside a container.
    host: str = "127.0.0.1"
    # /healthz fails when one inference job has been running longer than this.
    stuck_after_s: float = 120.0


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


@dataclass
class LoggingConfig:
    # DEBUG, INFO, WARNING or ERROR. Message texts are never logged at INFO.
    level: str = "INFO"
    # One JSON object per log line (for log collectors).
    json: bool = False


@dataclass
class Settings:
    telegram: TelegramConfig = field(default_factory=TelegramConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    prompts: PromptsConfig = field(default_factory=PromptsConfig)
    experiment: DecisionConfig = field(default_factory=DecisionConfig)
    loop: LoopConfig = field(default_factory=LoopConfig)
    health: HealthConfig = field(default_factory=HealthConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    # Set by the loader: where relative paths are anchored.
    source: str = ""


# Environment variables for containers and secrets: name -> dotted key.
ENV_OVERRIDES: dict[str, str] = {
    "TELEGRAM_BOT_TOKEN": "telegram.token",
    "LOOPBOT_ADMINS": "telegram.admins",
    "LOOPBOT_BASE_URL": "telegram.base_url",
    "LOOPBOT_MODEL": "model.path",
    "LOOPBOT_MODEL_DIR": "model.model_dir",
    "LOOPBOT_MODEL_BACKEND": "model.backend",
    "LOOPBOT_MODEL_URL": "model.url",
    "LOOPBOT_MODEL_API_KEY": "model.api_key",
    "LOOPBOT_THREADS": "model.n_threads",
    "LOOPBOT_DB": "storage.db",
    "LOOPBOT_DATABASE_URL": "storage.url",
    "LOOPBOT_WEBHOOK_REGISTER": "telegram.webhook_register",
    "LOOPBOT_REPLICAS": "telegram.replicas",
    "LOOPBOT_REPLICA_ID": "telegram.replica_id",
    "LOOPBOT_PROMPTS": "prompts.directory",
    "LOOPBOT_HEALTH_PORT": "health.port",
    "LOOPBOT_WEBHOOK_SECRET": "telegram.webhook_secret",
    "LOOPBOT_LOG_LEVEL": "logging.level",
    "LOOPBOT_LOG_JSON": "logging.json",
    "LOOPBOT_HEALTH_HOST": "health.host",
    "LOOPBOT_WEBHOOK_URL": "telegram.webhook_url",
    "LOOPBOT_WEBHOOK_LISTEN": "telegram.webhook_listen",
    "LOOPBOT_RETENTION_DAYS": "storage.retention_days",
    "LOOPBOT_BACKUP_DIR": "storage.backup_dir",
    "LOOPBOT_BACKUP_KEEP": "storage.backup_keep",
    "LOOPBOT_BACKUP_HOUR_UTC": "storage.backup_hour_utc",
}


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(key: str, value: Any, tp: Any, *, from_text: bool) -> Any:
    """Check (or, for env/flag strings, convert) one value against its declared type."""
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            choices = ", ".join(repr(a) for a in allowed)
            raise ConfigError(f"{key}: must be one of {choices}, got {value!r}")
        return value
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if from_text and isinstance(value, str):
            value = [part.strip() for part in value.split(",") if part.strip()]
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__}")
        return [_coerce(f"{key}[{i}]", v, item_tp, from_text=from_text)
                for i, v in enumerate(value)]
    if origin in (typing.Union, types.UnionType):
        errors = []
        for option in typing.get_args(tp):
            if option is type(None):
                if value is None:
                    return None
                continue
            try:
                return _coerce(key, value, option, from_text=from_text)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"{key}: invalid value")
    if tp is bool:
        if from_text and isinstance(value, str):
            lowered = value.strip().lower()
            if lowered in {"1", "true", "yes", "on"}:
                return True
            if lowered in {"0", "false", "no", "off"}:
                return False
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if from_text and isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                raise ConfigError(f"{key}: expected an integer, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if from_text and isinstance(value, str):
            try:
                return float(value.strip())
            except ValueError:
                raise ConfigError(f"{key}: expected a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            if from_text:
                return str(value)
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported setting type {_type_name(tp)}")


def _apply_mapping(obj: Any, data: Any, prefix: str) -> None:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or '<root>'}: expected a mapping of keys")
    hints = typing.get_type_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)} - {"source"}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if key not in names:
            raise ConfigError(f"{dotted}: unknown setting (known: {', '.join(sorted(names))})")
        tp = hints[key]
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            _apply_mapping(current, value if value is not None else {}, f"{dotted}.")
        else:
            setattr(obj, key, _coerce(dotted, value, tp, from_text=False))


def set_dotted(settings: Settings, dotted: str, value: Any, *, from_text: bool = True) -> None:
    """Set one setting by its dotted name (env variables and flags)."""
    *parents, leaf = dotted.split(".")
    obj: Any = settings
    for part in parents:
        obj = getattr(obj, part)
    hints = typing.get_type_hints(type(obj))
    setattr(obj, leaf, _coerce(dotted, value, hints[leaf], from_text=from_text))


def _validate(settings: Settings) -> None:
    if settings.telegram.respond_with not in {"both", "verdict", "reply"}:
        raise ConfigError("telegram.respond_with: must be 'both', 'verdict' or 'reply'")
    if settings.logging.level.upper() not in LOG_LEVELS:
        raise ConfigError(f"logging.level: must be one of {', '.join(LOG_LEVELS)}")
    if settings.model.backend not in {"llama_cpp", "ctransformers", "remote"}:
        raise ConfigError("model.backend: must be 'llama_cpp', 'remote' or 'ctransformers'")
    _validate_remote(settings.model)
    if settings.loop.mode not in {"automatic", "suggest", "off"}:
        raise ConfigError("loop.mode: must be 'automatic', 'suggest' or 'off'")
    if settings.model.n_threads < 0:
        raise ConfigError("model.n_threads: must be 0 (all cores) or more")
    for key in ("verdict_timeout_s", "reply_timeout_s"):
        if getattr(settings.model, key) <= 0:
            raise ConfigError(f"model.{key}: must be positive")
    if settings.model.n_ctx < 256:
        raise ConfigError("model.n_ctx: must be at least 256")
    if settings.model.max_queue < 1:
        raise ConfigError("model.max_queue: must be at least 1")
    if settings.model.prefix_cache_versions < 1:
        raise ConfigError("model.prefix_cache_versions: must be at least 1")
    if not -1 <= settings.storage.backup_hour_utc <= 23:
        raise ConfigError("storage.backup_hour_utc: must be -1 (off) or an hour 0-23")
    if settings.storage.retention_days < 0:
        raise ConfigError("storage.retention_days: must be 0 (keep forever) or more")
    if settings.storage.backup_keep < 1:
        raise ConfigError("storage.backup_keep: must be at least 1")
    if settings.storage.url and not settings.storage.url.startswith(
            ("sqlite://", "postgresql://", "postgres://", "postgresql+asyncpg://")):
        raise ConfigError("storage.url: must start with sqlite:/// or postgresql://")
    if settings.telegram.replicas < 1:
        raise ConfigError("telegram.replicas: must be at least 1")
    if not 0 <= settings.health.port <= 65535:
        raise ConfigError("health.port: must be between 0 and 65535")
    check = getattr(settings.experiment, "validate", None)
    if callable(check):
        try:
            check()
        except ValueError as exc:
            raise ConfigError(f"experiment: {exc}") from exc


def _validate_remote(model: ModelConfig) -> None:
    if model.backend != "remote":
        return
    if not model.url:
        raise ConfigError("model.url: backend 'remote' needs the inference server's URL "
                          "(e.g. http://127.0.0.1:8080; env LOOPBOT_MODEL_URL)")
    seen: set[str] = set()
    for i, url in enumerate(model.url):
        if not url.startswith(("http://", "https://")):
            raise ConfigError(f"model.url[{i}]: must start with http:// or https://, got {url!r}")
        base = url.rstrip("/")
        if base.endswith("/v1"):
            raise ConfigError(f"model.url[{i}]: give the server's base URL without /v1 "
                              f"({base[:-3]!r}); the bot adds the API paths itself")
        if base in seen:
            raise ConfigError(f"model.url[{i}]: {url!r} is listed twice")
        seen.add(base)
    if model.remote_api == "openai-chat" and model.verdicts == "remote":
        raise ConfigError("model.verdicts: 'remote' needs model.remote_api 'llama-server'; an "
                          "OpenAI chat endpoint cannot give exact label probabilities, so "
                          "verdicts must be scored in process ('local' or 'auto')")
    if model.remote_connect_timeout_s <= 0 or model.remote_retry_s < 0:
        raise ConfigError("model.remote_connect_timeout_s must be positive and "
                          "model.remote_retry_s 0 or more")
    if model.remote_parallel < 1:
        raise ConfigError("model.remote_parallel: must be at least 1")


def load_settings(
    path: str | os.PathLike[str] | None = None,
    *,
    env: typing.Mapping[str, str] | None = None,
    overrides: typing.Mapping[str, Any] | None = None,
) -> Settings:
    """File (``path`` or ``$LOOPBOT_CONFIG``; optional) < environment < ``overrides`` (flags)."""
    env = os.environ if env is None else env
    settings = Settings()
    chosen = path or env.get("LOOPBOT_CONFIG") or None
    if chosen:
        cfg_path = Path(chosen).expanduser()
        if not cfg_path.is_file():
            raise ConfigError(f"config file {cfg_path} does not exist")
        try:
            data = yaml.safe_load(cfg_path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {cfg_path} is not valid YAML: {exc}") from exc
        _apply_mapping(settings, data, "")
        settings.source = str(cfg_path)
    for name, dotted in ENV_OVERRIDES.items():
        if env.get(name):
            try:
                set_dotted(settings, dotted, env[name])
            except ConfigError as exc:
                raise ConfigError(f"{name} ({exc})") from exc
    for dotted, value in (overrides or {}).items():
        if value is not None:
            set_dotted(settings, dotted, value)
    if (overrides or {}).get("storage.db") is not None and (
            overrides or {}).get("storage.url") is None:
        # A --db flag names the database for this command, over a storage.url from the
        # file or LOOPBOT_DATABASE_URL (a flag is the most specific layer).
        settings.storage.url = ""
    _validate(settings)
    return settings


def resolve_path(settings: Settings, value: str) -> Path:
    """Relative paths in a config file are relative to that file; otherwise to the cwd."""
    candidate = Path(value).expanduser()
    if candidate.is_absolute() or not settings.source:
        return candidate
    return Path(settings.source).parent / candidate


# The versions shipped with loopbot, used when the configured directory is relative and absent
# (e.g. `loopbot console` started from another folder).
BUNDLED_PROMPTS = Path(__file__).resolve().parent.parent / "prompts"


def prompts_directory(settings: Settings) -> Path:
    configured = resolve_path(settings, settings.prompts.directory)
    if configured.is_dir() or Path(settings.prompts.directory).expanduser().is_absolute():
        return configured
    return BUNDLED_PROMPTS if BUNDLED_PROMPTS.is_dir() else configured


def replica_name(settings: Settings) -> str:
    """This process's name among the replicas (see ``telegram.replica_id``)."""
    import os
    import socket

    tg = settings.telegram
    if tg.replica_id:
        return tg.replica_id
    if tg.replicas <= 1 and not database_target(settings).startswith("postgres"):
        return "local"  # one process owns a SQLite file: a restart resumes its own claims
    # A shared database may have other processes on it: never a name they could share.
    return f"{socket.gethostname()}-{os.getpid()}"


def shared_database(settings: Settings) -> bool:
    """Whether other bot processes may use this database (PostgreSQL, or replicas)."""
    return settings.telegram.replicas > 1 or database_target(settings).startswith("postgres")


def database_target(settings: Settings) -> str:
    """Where the database is: ``storage.url`` when set, else the SQLite file ``storage.db``
    (which may itself be a URL, e.g. ``--db postgresql://...``)."""
    if settings.storage.url:
        return settings.storage.url
    db = settings.storage.db
    if "://" in db:
        return db
    return str(resolve_path(settings, db))
