"""A fake Telegram Bot API server on loopback, for driving the real bot over HTTP
(``loopbot bench --load`` drives ``loopbot run`` against it; the tests use it too).

It answers the methods python-telegram-bot calls (getMe, getUpdates with long polling,
sendMessage, editMessageText, editMessageReplyMarkup, answerCallbackQuery, sendChatAction,
sendPhoto / sendDocument as multipart, setMyCommands, close, logOut...), keeps the messages
the bot sent, records every call for assertions, and can answer a method with a 429 "retry
after" once. Tests push updates the way Telegram would deliver them.

The webhook methods keep one registration as Telegram does: setWebhook stores it (an empty
URL removes it), deleteWebhook removes it, either may drop the pending updates, and
getWebhookInfo reports it with the pending update count and the last delivery error (set by
:meth:`FakeBotAPI.webhook_failed`). While a webhook is set, getUpdates is refused with 409
Conflict. Updates are not POSTed to the webhook: tests send them to the bot themselves.
"""

from __future__ import annotations

import ipaddress
import itertools
import json
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from email import policy
from email.parser import BytesParser
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

TOKEN = "123:TEST"
# setWebhook's rules (Bot API): secret_token 1-256 of A-Z a-z 0-9 _ -; max_connections 1-100.
_SECRET_TOKEN_RE = re.compile(r"^[A-Za-z0-9_-]{1,256}$")
DEFAULT_MAX_CONNECTIONS = 40


@dataclass
class Call:
    method: str
    params: dict[str, str]
    files: dict[str, tuple[str, bytes]] = field(default_factory=dict)
    at: float = field(default_factory=time.monotonic)
    status: int = 200
    result: Any = None

    def json(self, key: str) -> Any:
        return json.loads(self.params[key])


class FakeBotAPI:
    def __init__(self, token: str = TOKEN, bot_id: int = 999_000,
                 username: str = "loopbot_test_bot") -> None:
        self.token = token
        self.bot_user = {"id": bot_id, "is_bot": True, "first_name": "loopbot",
                         "username": username, "can_join_groups": True,
                         "can_read_all_group_messages": False,
                         "supports_inline_queries": False}
        self.calls: list[Call] = []
        # Messages the bot sent, by (chat id, message id), as Telegram would return them.
        self.messages: dict[tuple[int, int], dict[str, Any]] = {}
        self._chats: dict[int, dict[str, Any]] = {}
        self._pending: list[dict[str, Any]] = []
        self._forced: list[dict[str, Any]] = []
        self._failures: dict[str, list[int]] = {}
        self._errors: dict[str, list[tuple[int, str]]] = {}
        # Run in the server thread before a method is answered: lets a test observe what
        # the bot had done (e.g. committed) at the moment it made that call.
        self.before: dict[str, Callable[[Call], bool | None]] = {}
        # The registered webhook: setWebhook's parameters as sent (all strings, lists in
        # JSON), {} when none. Telegram never reveals secret_token; tests may read it here.
        self.webhook: dict[str, str] = {}
        self._webhook_error: tuple[int, str] | None = None
        self._update_ids = itertools.count(1)
        self._message_ids = itertools.count(10_000)
        self._user_message_ids = itertools.count(1)
        self._cond = threading.Condition()
        self._closing = False
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True,
                                        name="fake-bot-api")

    # --- lifecycle ----------------------------------------------------------------------

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/bot"

    def start(self) -> FakeBotAPI:
        self._thread.start()
        return self

    def stop(self) -> None:
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> FakeBotAPI:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- what tests do ------------------------------------------------------------------

    def fail_next(self, method: str, retry_after: int = 1, times: int = 1) -> None:
        """The next ``times`` calls of ``method`` get HTTP 429 with ``retry_after``."""
        with self._cond:
            self._failures.setdefault(method, []).extend([retry_after] * times)

    def error_next(self, method: str, status: int, *, times: int = 1,
                   description: str = "") -> None:
        """The next ``times`` calls of ``method`` get HTTP ``status`` (500 Internal Server
        Error, 502 Bad Gateway, 403 Forbidden: bot was blocked by the user, ...)."""
        with self._cond:
            self._errors.setdefault(method, []).extend([(status, description)] * times)

    def push(self, update: dict[str, Any], *, redeliver: bool = False) -> dict[str, Any]:
        """Queue an update for getUpdates. ``redeliver`` serves it again even if its id was
        already confirmed, as Telegram does after a bot crashed before confirming."""
        with self._cond:
            update.setdefault("update_id", next(self._update_ids))
            (self._forced if redeliver else self._pending).append(update)
            self._cond.notify_all()
        return update

    def push_batch(self, updates: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Queue several updates at once: the next getUpdates returns them in one batch."""
        with self._cond:
            for update in updates:
                update.setdefault("update_id", next(self._update_ids))
                self._pending.append(update)
            self._cond.notify_all()
        return updates

    def webhook_failed(self, message: str, *, at: float | None = None) -> None:
        """Telegram could not deliver to the webhook: getWebhookInfo reports
        ``last_error_date`` (``at``, default now) and ``last_error_message``."""
        with self._cond:
            self._webhook_error = (int(time.time() if at is None else at), message)

    @staticmethod
    def user(user_id: int, language: str = "en", first_name: str = "Tester") -> dict[str, Any]:
        return {"id": user_id, "is_bot": False, "first_name": first_name,
                "language_code": language}

    def chat(self, chat_id: int, chat_type: str = "private") -> dict[str, Any]:
        chat: dict[str, Any] = {"id": chat_id, "type": chat_type}
        if chat_type == "private":
            chat["first_name"] = "Tester"
        else:
            chat["title"] = "Test group"
        self._chats[chat_id] = chat
        return chat

    def send_text(self, user: dict[str, Any], text: str, *, chat_id: int | None = None,
                  chat_type: str = "private", entities: list[dict[str, Any]] | None = None,
                  reply_to: dict[str, Any] | None = None) -> dict[str, Any]:
        """A user writes to the bot; returns the update."""
        message = self.user_message(user, chat_id=chat_id, chat_type=chat_type)
        message["text"] = text
        if text.startswith("/"):
            command = text.split()[0]
            entities = [{"type": "bot_command", "offset": 0, "length": len(command)},
                        *(entities or [])]
        if entities:
            message["entities"] = entities
        if reply_to is not None:
            message["reply_to_message"] = reply_to
        return self.push({"message": message})

    def user_message(self, user: dict[str, Any], *, chat_id: int | None = None,
                     chat_type: str = "private") -> dict[str, Any]:
        cid = user["id"] if chat_id is None else chat_id
        return {"message_id": next(self._user_message_ids), "date": int(time.time()),
                "chat": self.chat(cid, chat_type), "from": user}

    def click(self, user: dict[str, Any], message: dict[str, Any], data: str) -> dict[str, Any]:
        """A user presses an inline button (or sends any callback data) on a bot message."""
        return self.push({"callback_query": {
            "id": f"cq{time.monotonic_ns()}", "from": user, "message": message,
            "chat_instance": f"ci{message['chat']['id']}", "data": data,
        }})

    def react(self, user: dict[str, Any], message: dict[str, Any], emojis: list[str],
              old: list[str] | None = None) -> dict[str, Any]:
        def as_types(items: list[str]) -> list[dict[str, str]]:
            return [{"type": "emoji", "emoji": e} for e in items]

        return self.push({"message_reaction": {
            "chat": message["chat"], "message_id": message["message_id"], "user": user,
            "date": int(time.time()), "old_reaction": as_types(old or []),
            "new_reaction": as_types(emojis),
        }})

    # --- assertions ---------------------------------------------------------------------

    def calls_to(self, method: str, **params: str) -> list[Call]:
        with self._cond:
            return [c for c in self.calls if c.method == method and c.status == 200
                    and all(c.params.get(k) == v for k, v in params.items())]

    def wait_for(self, predicate: Callable[[], Any], timeout: float = 15.0) -> Any:
        """Until ``predicate()`` is truthy (it is re-checked after every call)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                value = predicate()
                if value:
                    return value
                left = deadline - time.monotonic()
                if left <= 0:
                    methods = [c.method for c in self.calls[-15:]]
                    raise AssertionError(f"timed out; last calls: {methods}")
                self._cond.wait(min(left, 0.2))

    def wait_calls(self, method: str, count: int = 1, timeout: float = 15.0,
                   **params: str) -> list[Call]:
        result: list[Call] = self.wait_for(
            lambda: (found if len(found := self.calls_to(method, **params)) >= count else None),
            timeout)
        return result

    def bot_messages(self, chat_id: int) -> list[dict[str, Any]]:
        with self._cond:
            return [m for (cid, _), m in sorted(self.messages.items()) if cid == chat_id]

    # --- the server side ----------------------------------------------------------------

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        api = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                self.do_POST()

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                status, payload = api._dispatch(self.path, self.headers.get("Content-Type", ""),
                                                body)
                data = json.dumps(payload).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the bot gave up on a long poll while shutting down

        return Handler

    def _dispatch(self, path: str, content_type: str, body: bytes) -> tuple[int, Any]:
        prefix = f"/bot{self.token}/"
        if not path.startswith(prefix):
            return 401, {"ok": False, "error_code": 401, "description": "Unauthorized"}
        method = path[len(prefix):].split("?")[0]
        params, files = _parse_body(content_type, body)
        call = Call(method, params, files)
        with self._cond:
            errors = self._errors.get(method)
            if errors:
                status, description = errors.pop(0)
                call.status = status
                self.calls.append(call)
                self._cond.notify_all()
                return status, {"ok": False, "error_code": status,
                                "description": description or f"Error {status}"}
            failures = self._failures.get(method)
            if failures:
                retry_after = failures.pop(0)
                call.status = 429
                self.calls.append(call)
                self._cond.notify_all()
                return 429, {"ok": False, "error_code": 429,
                             "description": f"Too Many Requests: retry after {retry_after}",
                             "parameters": {"retry_after": retry_after}}
        hook = self.before.get(method)
        if hook is not None and hook(call) is False:
            # The hook says the request never arrived (the bot died while sending it).
            call.status = 499
            with self._cond:
                self.calls.append(call)
                self._cond.notify_all()
            return 499, {"ok": False, "error_code": 499, "description": "dropped"}
        handler = (self._m_getUpdates if method == "getUpdates"
                   else getattr(self, f"_m_{method}", None))
        if handler is None:
            call.status = 404
            result: Any = None
        else:
            try:
                result = handler(params, files)
            except _ApiError as exc:
                call.status = exc.status
                with self._cond:
                    self.calls.append(call)
                    self._cond.notify_all()
                return exc.status, {"ok": False, "error_code": exc.status,
                                    "description": str(exc)}
        call.result = result
        with self._cond:
            self.calls.append(call)
            self._cond.notify_all()
        if call.status == 404:
            return 404, {"ok": False, "error_code": 404, "description": "Not Found"}
        return 200, {"ok": True, "result": result}

    def _m_getUpdates(self, params: dict[str, str], f: Any) -> list[dict[str, Any]]:
        with self._cond:
            if self.webhook:
                raise _ApiError("Conflict: can't use getUpdates method while webhook is "
                                "active; use deleteWebhook to delete the webhook first",
                                status=409)
        offset = int(params.get("offset", 0) or 0)
        timeout = float(params.get("timeout", 0) or 0)
        limit = int(params.get("limit", 100) or 100)
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                # Updates below the offset are confirmed: Telegram forgets them.
                self._pending = [u for u in self._pending if u["update_id"] >= offset]
                if self._forced or self._pending or self._closing:
                    break
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            batch = self._forced[:limit]
            self._forced = self._forced[len(batch):]
            batch += self._pending[: limit - len(batch)]
            return batch

    def _new_message(self, params: dict[str, str], **content: Any) -> dict[str, Any]:
        chat_id = int(params["chat_id"])
        chat = self._chats.get(chat_id) or {"id": chat_id,
                                            "type": "private" if chat_id > 0 else "group"}
        message: dict[str, Any] = {"message_id": next(self._message_ids),
                                   "date": int(time.time()), "chat": chat,
                                   "from": self.bot_user, **content}
        if "reply_markup" in params:
            message["reply_markup"] = json.loads(params["reply_markup"])
        if "reply_parameters" in params:
            replied = json.loads(params["reply_parameters"])
            message["reply_to_message"] = {"message_id": replied["message_id"],
                                           "date": int(time.time()), "chat": chat}
        with self._cond:
            self.messages[(chat_id, message["message_id"])] = message
        return message

    def _stored(self, params: dict[str, str]) -> dict[str, Any]:
        key = (int(params["chat_id"]), int(params["message_id"]))
        with self._cond:
            if key not in self.messages:
                raise _ApiError("Bad Request: message to edit not found")
            return self.messages[key]

    # Bot API methods: one small function each.
    def _m_getMe(self, p: dict[str, str], f: Any) -> Any:
        return self.bot_user

    def _m_sendMessage(self, p: dict[str, str], f: Any) -> Any:
        text = p.get("text", "")
        if not text.strip():
            raise _ApiError("Bad Request: message text is empty")
        if len(text.encode("utf-16-le")) // 2 > 4096:
            raise _ApiError("Bad Request: message is too long")
        return self._new_message(p, text=text)

    def _m_editMessageText(self, p: dict[str, str], f: Any) -> Any:
        message = self._stored(p)
        markup = json.loads(p["reply_markup"]) if "reply_markup" in p else None
        if message.get("text") == p["text"] and message.get("reply_markup") == markup:
            raise _ApiError("Bad Request: message is not modified")
        message["text"] = p["text"]
        if markup is None:
            message.pop("reply_markup", None)
        else:
            message["reply_markup"] = markup
        return message

    def _m_editMessageReplyMarkup(self, p: dict[str, str], f: Any) -> Any:
        message = self._stored(p)
        markup = json.loads(p["reply_markup"]) if "reply_markup" in p else None
        if message.get("reply_markup") == markup:
            raise _ApiError("Bad Request: message is not modified")
        message["reply_markup"] = markup
        return message

    def _m_sendPhoto(self, p: dict[str, str], f: dict[str, tuple[str, bytes]]) -> Any:
        return self._new_message(p, photo=[{"file_id": "photo1", "file_unique_id": "p1",
                                            "width": 960, "height": 540}],
                                 caption=p.get("caption", ""))

    def _m_sendDocument(self, p: dict[str, str], f: dict[str, tuple[str, bytes]]) -> Any:
        name = f["document"][0] if "document" in f else "file"
        return self._new_message(p, document={"file_id": "doc1", "file_unique_id": "d1",
                                              "file_name": name},
                                 caption=p.get("caption", ""))

    def _m_answerCallbackQuery(self, p: dict[str, str], f: Any) -> Any:
        return True

    def _m_sendChatAction(self, p: dict[str, str], f: Any) -> Any:
        return True

    def _m_setWebhook(self, p: dict[str, str], f: Any) -> Any:
        url = p.get("url", "")
        if not url:  # "Use an empty string to remove webhook integration"
            return self._m_deleteWebhook(p, f)
        parts = urlsplit(url)
        # Real Telegram wants https on ports 443/80/88/8443; like a self-hosted Bot API
        # server (--local), this one also takes http and any port on loopback.
        if parts.scheme not in {"http", "https"} or not parts.hostname:
            raise _ApiError("Bad Request: bad webhook: An HTTPS URL must be provided for "
                            "webhook")
        secret = p.get("secret_token")
        if secret is not None and not _SECRET_TOKEN_RE.match(secret):
            raise _ApiError("Bad Request: secret token contains unallowed characters")
        if "allowed_updates" in p and not isinstance(json.loads(p["allowed_updates"]), list):
            raise _ApiError("Bad Request: can't parse allowed updates JSON array")
        if "max_connections" in p and not 1 <= int(p["max_connections"]) <= 100:
            raise _ApiError("Bad Request: bad webhook: max_connections must be 1-100")
        with self._cond:
            if _flag(p, "drop_pending_updates"):
                self._drop_pending()
            if self.webhook.get("url") != url:
                self._webhook_error = None
            self.webhook = dict(p)
        return True

    def _m_deleteWebhook(self, p: dict[str, str], f: Any) -> Any:
        with self._cond:
            if _flag(p, "drop_pending_updates"):
                self._drop_pending()
            self.webhook = {}
            self._webhook_error = None
        return True

    def _m_getWebhookInfo(self, p: dict[str, str], f: Any) -> Any:
        """WebhookInfo as the Bot API gives it: optional fields only when they have a value."""
        with self._cond:
            info: dict[str, Any] = {"url": self.webhook.get("url", ""),
                                    "has_custom_certificate": False,
                                    "pending_update_count": len(self._forced)
                                    + len(self._pending)}
            if not self.webhook:
                return info
            info["max_connections"] = int(self.webhook.get("max_connections")
                                          or DEFAULT_MAX_CONNECTIONS)
            address = self.webhook.get("ip_address") or _ip_literal(info["url"])
            if address:
                info["ip_address"] = address
            if "allowed_updates" in self.webhook:
                info["allowed_updates"] = json.loads(self.webhook["allowed_updates"])
            if self._webhook_error is not None:
                info["last_error_date"], info["last_error_message"] = self._webhook_error
            return info

    def _drop_pending(self) -> None:
        self._pending.clear()
        self._forced.clear()

    def _m_setMyCommands(self, p: dict[str, str], f: Any) -> Any:
        return True

    def _m_getMyCommands(self, p: dict[str, str], f: Any) -> Any:
        return []

    def _m_deleteMessage(self, p: dict[str, str], f: Any) -> Any:
        return True

    def _m_setMessageReaction(self, p: dict[str, str], f: Any) -> Any:
        return True

    def _m_close(self, p: dict[str, str], f: Any) -> Any:
        return True

    def _m_logOut(self, p: dict[str, str], f: Any) -> Any:
        return True


class _ApiError(Exception):
    """Answered with ``status`` (400 Bad Request unless said) and the message."""

    def __init__(self, description: str, *, status: int = 400) -> None:
        super().__init__(description)
        self.status = status


def _flag(params: dict[str, str], key: str) -> bool:
    """A Boolean parameter, sent as JSON (``true``) or form text (``True``, ``1``)."""
    return params.get(key, "").strip().lower() in {"true", "1"}


def _ip_literal(url: str) -> str | None:
    """The webhook's IP address when its host is one (the fake resolves no names)."""
    try:
        return str(ipaddress.ip_address(urlsplit(url).hostname or ""))
    except ValueError:
        return None


def _parse_body(content_type: str, body: bytes) -> tuple[dict[str, str],
                                                          dict[str, tuple[str, bytes]]]:
    """Form fields as strings (JSON-encoded where PTB encodes them) and uploaded files."""
    params: dict[str, str] = {}
    files: dict[str, tuple[str, bytes]] = {}
    if not body:
        return params, files
    if content_type.startswith("multipart/form-data"):
        message = BytesParser(policy=policy.HTTP).parsebytes(
            b"Content-Type: " + content_type.encode() + b"\r\n\r\n" + body)
        for part in message.iter_parts():
            name = part.get_param("name", header="content-disposition")
            raw = part.get_payload(decode=True)
            payload = raw if isinstance(raw, bytes) else b""
            filename = part.get_filename()
            if filename is not None:
                files[str(name)] = (filename, payload)
            else:
                params[str(name)] = payload.decode("utf-8")
    elif content_type.startswith("application/json"):
        data = json.loads(body)
        params = {k: v if isinstance(v, str) else json.dumps(v) for k, v in data.items()}
    else:
        params = {k: v[0] for k, v in parse_qs(body.decode("utf-8"),
                                               keep_blank_values=True).items()}
    return params, files
