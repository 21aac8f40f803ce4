"""Configuration: every environment variable the service reads, its default and meaning.

``load()`` turns the environment into Flask config keys; a malformed value, or one outside
its range, stops start-up with one line naming the variable (``ConfigError``), never a
traceback or a broken answer at the first request.
"""

from __future__ import annotations

import math
import os
import re
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from . import accounts

ROOT = Path(__file__).resolve().parent.parent

# Most gunicorn workers (WEB_CONCURRENCY): threads grow with workers (service/serving.py).
MAX_WORKERS = 64

# Shortest OPS_TOKEN production takes: a token is what guards every conversation's state.
MIN_OPS_TOKEN = 32

# Shortest EVENTS_HASH_KEY: a short key lets anyone who reads the events try every number.
MIN_HASH_KEY = 16

# gunicorn's ``timeout`` in config/gunicorn.conf.py (tests/test_settings_ranges.py keeps the
# two equal): a worker silent this long is killed, so a message must be answered well before.
WORKER_TIMEOUT = 10


class ConfigError(Exception):
    """A setting is missing or malformed; the message names the variable."""


def _bool(value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in {"1", "true", "yes", "on"}:
        return True
    if lowered in {"0", "false", "no", "off"}:
        return False
    raise ValueError("expected 1/0, true/false, yes/no or on/off")


def _number(kind: type, valid: Callable[[Any], bool], reason: str) -> Callable[[str], Any]:
    def parse(value: str):
        if not value.isascii():  # int() and float() read any script's digits: ٣٠ is 30
            raise ValueError("must be written in ASCII digits")
        number = kind(value)
        if not valid(number):
            raise ValueError(reason)
        return number

    return parse


def _between(kind: type, low, high, unit: str) -> Callable[[str], Any]:
    """A number from ``low`` to ``high`` (NaN is neither, infinity only if ``high`` is)."""
    reason = f"must be {unit}, " + (f"at least {low}" if high == math.inf else f"from {low} to {high}")
    return _number(kind, lambda n: low <= n <= high and n != math.inf, reason)


_non_negative_int = _number(int, lambda n: n >= 0, "must be 0 or more")


def _one_of(*choices: str) -> Callable[[str], str]:
    def parse(value: str) -> str:
        if value not in choices:
            raise ValueError("must be " + " or ".join(f"'{choice}'" for choice in choices))
        return value

    return parse


def _text(value: str) -> str:
    return value


def _sid(prefix: str) -> Callable[[str], str]:
    """A Twilio SID: ``prefix`` and 32 hexadecimal digits."""
    pattern = re.compile(prefix + "[0-9a-fA-F]{32}")

    def parse(value: str) -> str:
        if not pattern.fullmatch(value):
            raise ValueError(f"must be {prefix} followed by 32 hexadecimal digits")
        return value

    return parse


def _address(value: str) -> str:
    """A phone number in E.164, optionally behind a channel (``whatsapp:+1…``)."""
    if not re.fullmatch(r"(?:[a-z]+:)?\+[1-9]\d{1,14}", value):
        raise ValueError("must be a number in E.164 (+15550001111), optionally as channel:+15550001111")
    return value


def _base_url(value: str) -> str:
    """``http(s)://host[:port][/path]``, without a query, a fragment or a trailing slash."""
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 - raises ValueError unless the port is a number up to 65535
    except ValueError:
        raise ValueError("must be an http:// or https:// URL") from None
    if parts.scheme not in ("http", "https") or not parts.hostname or " " in value:
        raise ValueError("must be an http:// or https:// URL such as https://sms.example.com")
    if parts.query or parts.fragment:
        raise ValueError("must be an http:// or https:// URL without a query")
    return value.rstrip("/")


def _bind(value: str) -> str:
    """gunicorn's forms: ``HOST:PORT``, ``[IPv6]:PORT``, ``unix:PATH``, ``fd://N``."""
    if value.startswith("unix:") and len(value) > 5:
        return value
    if value.startswith("fd://") and value[5:].isascii() and value[5:].isdigit():
        return value
    host, colon, port = value.rpartition(":")
    if not (colon and host and port.isascii() and port.isdigit() and 1 <= int(port) <= 65535):
        raise ValueError("must be HOST:PORT with a port from 1 to 65535, unix:PATH or fd://N")
    return value


def _directory(value: str) -> str:
    """A directory this process can write in, or make (a file is made there and removed)."""
    path = Path(value)
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        raise ValueError(f"{existing} is not a directory")
    try:
        tempfile.TemporaryFile(dir=existing).close()
    except OSError as error:
        raise ValueError(f"cannot write in {existing}: {error.strerror}") from None
    return value


def _token(value: str) -> str:
    if value != value.strip():
        raise ValueError("has spaces around it (the console would take them, the API never)")
    return value


@dataclass(frozen=True)
class Setting:
    env: str
    default: Any
    parse: Callable[[str], Any]
    meaning: str
    shown: str | None = None  # the default as the docs show it, when not the value itself
    secret: bool = False  # a refusal names the variable, never its value

    def default_text(self) -> str:
        if self.shown is not None:
            return self.shown
        if self.default is None:
            return "unset"
        if isinstance(self.default, bool):
            return "1" if self.default else "0"
        return f"`{self.default:g}`" if isinstance(self.default, float) else f"`{self.default}`"


SETTINGS = [
    Setting(
        "SMS_HANDLER",
        "service.counter:handle",
        _text,
        'The conversation logic, `package.module:function` (README: "Write your own '
        "conversation\"); its module's `on_end`, if any, is the end hook.",
    ),
    Setting(
        "HANDLER_INLINE_BUDGET",
        0.8,
        _between(float, 0.01, 5, "a number of seconds"),
        "Seconds a webhook waits for the handler to answer inline (TwiML); past them Twilio gets "
        "an empty answer at once (within a second of its request, with the default) and the "
        "reply goes out through the outbound sender when the handler returns (0.01 to 5, and "
        "under `HANDLER_TIMEOUT`).",
    ),
    Setting(
        "HANDLER_TIMEOUT",
        120.0,
        _between(float, 0.1, 3600, "a number of seconds"),
        "Seconds a handler may run (0.1 to 3600): past them it is cancelled (async) or abandoned "
        "(a plain function), nothing is saved and the conversation's next message goes on.",
    ),
    Setting(
        "HANDLER_TIMEOUT_REPLY",
        "",
        _text,
        "Text sent to the user when their message's handler ran past `HANDLER_TIMEOUT`; unset: "
        "nothing is sent.",
        shown="unset",
    ),
    Setting(
        "APP_ENV",
        "development",
        _one_of("development", "production"),
        "`production` refuses to start without `TWILIO_AUTH_TOKEN` (or `TWILIO_ACCOUNTS`), with "
        "`TWILIO_VALIDATE_SIGNATURE=0`, without `REDIS_URL` (the embedded store) or when "
        "Redis turns its credentials down; `development` only warns.",
    ),
    Setting(
        "REDIS_URL",
        None,
        _text,
        "Redis to keep conversations in; the scheme picks the topology: `redis://`, "
        "`rediss://` (TLS), `unix://` one server; "
        "`redis+sentinel://host:port[,host:port…]/service_name[/db]` the master Sentinel "
        "names; `redis+cluster://host:port[,host:port…]` a Redis Cluster. User and password "
        "go before the hosts (`redis://:secret@host:6379/0`). Unset: the embedded in-memory "
        "store (per process), with a warning.",
    ),
    Setting(
        "REDIS_WAIT_REPLICAS",
        0,
        _non_negative_int,
        "Replicas that must confirm each script's writes (`WAIT`, pipelined with the script: "
        "no extra round trip) before the answer; fewer answers 503. Set it to "
        "`min-replicas-to-write` behind Sentinel, the replicas of each master on a Cluster. Not "
        "with the embedded store.",
    ),
    Setting("REDIS_KEY_PREFIX", "sms:", _text, "Prefix of every key the service writes."),
    Setting(
        "REDIS_TIMEOUT",
        0.5,
        _between(float, 0.01, math.inf, "a number of seconds"),
        "Socket connect/read timeout in seconds (at least 0.01, and `LOCK_WAIT` + 2 × "
        "`REDIS_TIMEOUT` under gunicorn's 10 s worker timeout); a slower Redis answers 503.",
    ),
    Setting(
        "TWILIO_AUTH_TOKEN",
        None,
        accounts.parse_token_setting,
        "The auth token that signs Twilio's webhooks, or up to 4 separated by commas, the "
        "primary first: each is accepted (rotating a token: docs/operating.md). Unset, and "
        "`TWILIO_ACCOUNTS` too: every webhook is refused (403). `make run` uses `dev-auth-token`.",
        secret=True,
    ),
    Setting(
        "TWILIO_ACCOUNTS",
        None,
        accounts.parse_accounts,
        'Several accounts (subaccounts, regions), instead of `TWILIO_AUTH_TOKEN`: `{"AC…": '
        '{"auth_tokens": ["primary", …], "shared_keys": {"key id": "secret"}}, …}` inline, or '
        "the path of a file holding it. The request's `AccountSid` chooses the keys tried; an "
        "account not listed is refused (403). Up to 4 auth tokens an account; `shared_keys` "
        "validate SharedKey signatures by the key id their header names (docs/operating.md).",
        secret=True,
    ),
    Setting(
        "TWILIO_VALIDATE_SIGNATURE",
        True,
        _bool,
        "`0` only for local development: skips signature validation (warns at start; refused in production).",
    ),
    # Outbound messages (service/delivery.py): one account's credentials, its sender, where
    # its REST API is and how failed calls are retried.
    Setting(
        "TWILIO_ACCOUNT_SID",
        None,
        _sid("AC"),
        "The Twilio account outbound messages are sent from (`AC` and 32 hex digits), with "
        "`TWILIO_AUTH_TOKEN` or an API key.",
    ),
    Setting(
        "TWILIO_API_KEY",
        None,
        _sid("SK"),
        "API key (`SK` and 32 hex digits) to send with instead of the auth token (Twilio's "
        "advice for production; it can be revoked alone); needs `TWILIO_API_SECRET`.",
    ),
    Setting("TWILIO_API_SECRET", None, _text, "The secret of `TWILIO_API_KEY`."),
    Setting(
        "TWILIO_FROM_NUMBER",
        None,
        _address,
        "Number outbound messages come from when they name none (E.164, or a channel address "
        "such as `whatsapp:+15550001111`).",
    ),
    Setting(
        "TWILIO_MESSAGING_SERVICE_SID",
        None,
        _sid("MG"),
        "Messaging Service to send through (`MG` and 32 hex digits): Twilio picks the sender "
        "from its pool unless a message names one.",
    ),
    Setting(
        "TWILIO_API_BASE_URL",
        None,
        _base_url,
        "Where Twilio's REST API is called instead of `https://api.twilio.com`: the stand-in "
        "(docs/outbound.md), e.g. `http://127.0.0.1:8765`. Refused with "
        "`APP_ENV=production`.",
    ),
    Setting(
        "TWILIO_API_TIMEOUT",
        10.0,
        _between(float, 0.5, 60, "a number of seconds"),
        "Seconds a call to Twilio's REST API may take before it counts as failed and is "
        "retried later, 0.5 to 60.",
    ),
    Setting(
        "DELIVERY_RETRY_BASE",
        1.0,
        _between(float, 0.1, 60, "a number of seconds"),
        "Seconds before the first retry of a message Twilio did not take (429, 5xx, timeout, "
        "lost connection), 0.1 to 60; doubled at each attempt, with jitter.",
    ),
    Setting(
        "DELIVERY_RETRY_MAX",
        300.0,
        _between(float, 1, 3600, "a number of seconds"),
        "Longest wait between two attempts to send a message, 1 to 3600, not less than "
        "`DELIVERY_RETRY_BASE`.",
    ),
    Setting(
        "SENDER_INTERVAL",
        0.2,
        _between(float, 0.01, 60, "a number of seconds"),
        "Seconds the outbound sender waits before looking for due messages again when it found "
        "none and its own process queued none meanwhile, 0.01 to 60.",
    ),
    Setting(
        "SENDER_YIELD",
        0.2,
        _between(float, 0, 60, "a number of seconds"),
        "Seconds between two outbound messages a serving process' sender hands Twilio while the "
        "process is answering webhook requests, 0 to 60: it sends in the webhook's pauses, and "
        "this often however busy the webhook is (inbound messages first: Twilio gives up on an "
        "answer after 15 s, an outbound message waits); 0 sends without yielding.",
    ),
    Setting(
        "SENDER_LEASE",
        60.0,
        _between(float, 1, 3600, "a number of seconds"),
        "Seconds a sender holds a conversation's next outbound message while it delivers it, 1 "
        "to 3600 (three times `TWILIO_API_TIMEOUT` when that is longer: a create and a lookup "
        "must fit); a sender that dies holding one is replaced after this long.",
    ),
    Setting(
        "SENDER_THREADS",
        4,
        _between(int, 1, 64, "a number of threads"),
        "Conversations each sender delivers to at once, 1 to 64 (one conversation's messages "
        "always go one after the other).",
    ),
    Setting(
        "PUBLIC_BASE_URL",
        None,
        _base_url,
        "The scheme and host Twilio calls, e.g. `https://sms.example.com` (with the path "
        "prefix a proxy strips, if any); the signed URL is rebuilt from it. Use behind TLS "
        "proxies and tunnels.",
    ),
    Setting(
        "TRUSTED_PROXY_HOPS",
        0,
        _non_negative_int,
        "Proxies in front whose `X-Forwarded-Proto`, `-Host`, `-Port` and `-For` headers are "
        "trusted (werkzeug's `ProxyFix`); never `-Prefix`.",
    ),
    Setting(
        "CONVERSATION_TTL",
        14400,
        _between(int, 1, 30 * 24 * 3600, "a whole number of seconds"),
        "Seconds a conversation lives after its last message (Twilio's cookie window: 4 h), "
        "at most 30 days (2592000).",
    ),
    Setting(
        "SESSION_COOKIE_SECURE",
        False,
        _bool,
        "Mark the cookies `Secure`: Twilio's conversation cookie and the console's sign-in "
        "cookie (set it when the service is reached over https).",
    ),
    Setting(
        "CALLERS_FILE",
        str(ROOT / "config" / "callers.json"),
        _text,
        'JSON object mapping phone numbers to names (`message.caller_name`); unknown senders are "Friend".',
        shown="`config/callers.json`",
    ),
    Setting(
        "LOCK_TTL",
        3.0,
        _between(float, 0.1, 60, "a number of seconds"),
        "Seconds after which a conversation lock held by a crashed request lapses "
        "(0.1 to 60: a lock must outlive a request's two round trips, and a crash must "
        "not block a conversation for long).",
    ),
    Setting(
        "LOCK_WAIT",
        5.0,
        _between(float, 0.01, math.inf, "a number of seconds"),
        "Seconds a message waits for its conversation's lock before answering 503 "
        "(at least 0.01, and `LOCK_WAIT` + 2 × `REDIS_TIMEOUT` under gunicorn's 10 s "
        "worker timeout).",
    ),
    Setting(
        "REDELIVERY_WINDOW",
        60,
        _between(int, 1, 3600, "a number of seconds"),
        "Seconds during which a redelivered `MessageSid` gets its first answer again instead of "
        "counting twice (Twilio's retries end within 15 s), 1 to 3600.",
    ),
    Setting(
        "REPLIES_KEPT",
        100,
        _between(int, 1, 10_000, "a number of answers"),
        "Most answers a conversation remembers within `REDELIVERY_WINDOW` (a memory guard), 1 to 10000.",
    ),
    Setting(
        "SWEEP_INTERVAL",
        5.0,
        _between(float, 0.05, 3600, "a number of seconds"),
        "Seconds between two sweeps of conversations whose time ran out (their `ended` "
        "event, their end hook) and of due timers (sooner when a timer falls due first), 0.05 "
        "to 3600; one process sweeps at a time.",
    ),
    Setting(
        "END_HOOK_TIMEOUT",
        30.0,
        _between(float, 0.1, 3600, "a number of seconds"),
        "Seconds an end hook (`on_end`) call may take, 0.1 to 3600: one still running then is "
        "counted as failed, its conversation's entry dropped and its thread left to finish, "
        "so that a hanging hook holds up neither the sweep nor the other hooks.",
    ),
    Setting(
        "EVENTS_RETENTION",
        7 * 24 * 3600,
        _between(int, 1, 366 * 24 * 3600, "a number of seconds"),
        "Seconds the lifecycle events stream keeps an event (`XTRIM MINID`), up to a year.",
    ),
    Setting(
        "EVENTS_MAX",
        1_000_000,
        _between(int, 10, 100_000_000, "a number of events"),
        "Most events the stream keeps, whatever their age (`XADD MAXLEN ~`), 10 to 100000000.",
    ),
    Setting(
        "TRANSCRIPTS",
        False,
        _bool,
        "`1` keeps each conversation's transcript: every message in and every reply, in "
        "order, with its time and direction, written by the script that saves the message "
        "(docs/operating.md: Transcripts).",
    ),
    Setting(
        "TRANSCRIPT_RETENTION",
        30 * 24 * 3600,
        _between(int, 1, 366 * 24 * 3600, "a number of seconds"),
        "Seconds a transcript is kept after its conversation ends (30 days), 1 to 31622400 "
        "(a year); a pair's new conversation drops its entries older than this.",
    ),
    Setting(
        "TRANSCRIPT_MAX",
        1000,
        _between(int, 1, 100_000, "a number of entries"),
        "Most entries a pair's transcript keeps (the oldest go first), 1 to 100000.",
    ),
    Setting(
        "HANDOFF_TIMEOUT",
        1800,
        _between(int, 1, 24 * 3600, "a number of seconds"),
        'Seconds an operator\'s "Take over" holds a conversation (the bot paused, the '
        "conversation kept alive) unless handed back sooner; then the bot answers again. 1 to "
        "86400 (a day).",
    ),
    Setting(
        "EVENTS_NUMBERS",
        "plain",
        _one_of("plain", "hashed"),
        "`plain`: events carry the phone numbers; `hashed`: a keyed hash of each instead "
        "(HMAC-SHA256 with `EVENTS_HASH_KEY`, 16 bytes in hex), the same for a number every "
        "time, so that consumers can still join on it.",
    ),
    Setting(
        "EVENTS_HASH_KEY",
        None,
        _text,
        "The secret key of `EVENTS_NUMBERS=hashed`, at least 16 characters; required with it.",
        secret=True,
    ),
    Setting(
        "MAX_BODY_BYTES",
        65536,
        _between(int, 32768, 16 * 1024 * 1024, "a number of bytes"),
        "Largest webhook body (or GET query string) accepted; larger answers 413 (414). "
        "32768 to 16777216: Twilio's longest message takes up to ~15 KB.",
    ),
    Setting(
        "LOG_FORMAT",
        "json",
        _one_of("json", "text"),
        "`json`: one JSON object per line, for log pipelines; `text`: readable lines for a "
        "terminal (`make run` sets it). Either way phone numbers are masked.",
    ),
    Setting(
        "OPS_TOKEN",
        None,
        _token,
        "Bearer token of the operators' JSON API under `/ops`, and what operators type to "
        "sign in to the console at `/console/`. Unset: both are off (404 for every method "
        f"on every `/ops` and `/console` path). `production` wants at least {MIN_OPS_TOKEN} "
        "characters (`python3 -c 'import secrets; print(secrets.token_urlsafe(32))'`); wrong "
        "tries are slowed per client address.",
        secret=True,
    ),
    Setting(
        "CONSOLE_SESSION_TTL",
        8 * 3600,
        _between(int, 60, 7 * 24 * 3600, "a whole number of seconds"),
        "Seconds a console sign-in lasts (8 h: a shift), from 60 to 604800 (a week); then "
        "the operator signs in again.",
    ),
    # Read by config/gunicorn.conf.py (and prometheus-client), listed here to be documented.
    Setting(
        "WEB_CONCURRENCY",
        None,
        _between(int, 1, MAX_WORKERS, "a number of processes"),
        f"gunicorn worker processes (`config/gunicorn.conf.py`), 1 to {MAX_WORKERS}: each "
        "serves up to 1,000 connections at once under `gevent` (2 × workers + 8 under "
        "`gthread`, one under `sync`) and has its own Redis connections.",
        shown="2 × CPUs + 1",
    ),
    Setting(
        "WORKER_CLASS",
        "gevent",
        _one_of("gevent", "gthread", "sync"),
        "gunicorn's worker class: `gevent` (a greenlet per connection: stalled clients and "
        "handlers waiting on I/O hold no place other conversations need), `gthread` (threads; "
        "at most 4 requests a worker run the app at once) or `sync` (one request at a time; "
        "only behind a proxy that buffers whole requests). docs/deploying.md compares them.",
    ),
    Setting(
        "CLIENT_TIMEOUT",
        5,
        _between(int, 1, 9, "a whole number of seconds"),
        "Seconds a client has to send a request's body (then 408 and the connection closed) "
        "and, under `gevent`, its line and headers; also how long an idle keep-alive "
        "connection stays open. 1 to 9 (under gunicorn's 10 s worker timeout).",
    ),
    Setting(
        "PORT", 5000, _between(int, 1, 65535, "a port number"), "Port gunicorn listens on (all interfaces)."
    ),
    Setting(
        "BIND",
        None,
        _bind,
        "Full gunicorn bind address (`127.0.0.1:8000`, `[::1]:8000`, `unix:/run/sms.sock`); "
        "overrides `PORT`.",
    ),
    Setting(
        "PROMETHEUS_MULTIPROC_DIR",
        None,
        _directory,
        "Directory where gunicorn's workers share their metrics. Unset: gunicorn makes a "
        "temporary one (outside gunicorn the metrics are the process's own).",
    ),
]


def table() -> str:
    """The configuration reference (``docs/configuration.md``), written from ``SETTINGS``."""
    rows = [f"| `{s.env}` | {s.default_text()} | {s.meaning} |" for s in SETTINGS]
    return "\n".join(
        [
            "# Configuration",
            "",
            "Every setting is an environment variable. A malformed value, or one outside its range,",
            "stops start-up with one line naming the variable and a non-zero exit (in `create_app`, in",
            "gunicorn's master and in the CLI). This page is written from `service/settings.py`",
            "(`make docs`); a test checks that it still is.",
            "",
            "| Variable | Default | Meaning |",
            "| --- | --- | --- |",
            *rows,
            "",
        ]
    )


def bind_address(config: Mapping[str, Any]) -> str:
    """Where gunicorn listens (config/gunicorn.conf.py) and the healthcheck asks: ``BIND`` if
    set, else every interface on ``PORT``."""
    return config["BIND"] or f"0.0.0.0:{config['PORT']}"


def check(config: dict[str, Any]) -> None:
    """Refuses settings that contradict each other and, with ``APP_ENV=production``, settings
    that are only safe on a developer's machine."""
    if config["TWILIO_AUTH_TOKEN"] and config["TWILIO_ACCOUNTS"]:
        raise ConfigError(
            "TWILIO_AUTH_TOKEN and TWILIO_ACCOUNTS are both set: list every account in "
            "TWILIO_ACCOUNTS (that token's under its AccountSid) and unset TWILIO_AUTH_TOKEN"
        )
    budget = config["HANDLER_INLINE_BUDGET"]
    timeout = config["HANDLER_TIMEOUT"]
    if budget >= timeout:
        raise ConfigError(f"HANDLER_INLINE_BUDGET={budget:g}: must stay under HANDLER_TIMEOUT ({timeout:g})")
    _hash_key(config)
    if config["APP_ENV"] != "production":
        return
    if not config["TWILIO_AUTH_TOKEN"] and not config["TWILIO_ACCOUNTS"]:
        raise ConfigError(
            "TWILIO_AUTH_TOKEN is not set (nor TWILIO_ACCOUNTS): APP_ENV=production needs it "
            "to verify Twilio's signatures"
        )
    if not config["TWILIO_VALIDATE_SIGNATURE"]:
        raise ConfigError(
            "TWILIO_VALIDATE_SIGNATURE is off: APP_ENV=production always validates Twilio's signatures"
        )
    if not config["REDIS_URL"]:
        raise ConfigError(
            "REDIS_URL is not set: APP_ENV=production needs a real Redis, not the embedded in-memory store"
        )
    if config["TWILIO_API_BASE_URL"]:
        raise ConfigError(
            "TWILIO_API_BASE_URL is set: APP_ENV=production sends through Twilio's own API, not a stand-in"
        )
    if config["OPS_TOKEN"] and len(config["OPS_TOKEN"]) < MIN_OPS_TOKEN:
        raise ConfigError(
            f"OPS_TOKEN is {len(config['OPS_TOKEN'])} characters: APP_ENV=production needs at least "
            f"{MIN_OPS_TOKEN} (python3 -c 'import secrets; print(secrets.token_urlsafe(32))')"
        )


def init_app(app, test_config: dict[str, Any] | None = None) -> None:
    """The settings into ``app.config`` (``test_config`` overriding the environment), checked."""
    app.config.from_mapping(load())
    if test_config:
        app.config.from_mapping(test_config)
    check(app.config)
    app.config["MAX_CONTENT_LENGTH"] = app.config["MAX_BODY_BYTES"]


def load(environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Flask config from the environment: each setting under its variable's name."""
    environ = os.environ if environ is None else environ
    config: dict[str, Any] = {}
    for setting in SETTINGS:
        raw = environ.get(setting.env)
        if raw is None or raw == "":
            config[setting.env] = setting.default
            continue
        try:
            config[setting.env] = setting.parse(raw)
        except ValueError as error:
            named = setting.env if setting.secret else f"{setting.env}={raw!r}"
            raise ConfigError(f"{named}: {error}") from None
    _one_sender(config)
    _answered_in_time(
        config,
        blamed="REDIS_TIMEOUT"
        if environ.get("REDIS_TIMEOUT") and not environ.get("LOCK_WAIT")
        else "LOCK_WAIT",
    )
    return config


def _answered_in_time(config: dict[str, Any], blamed: str) -> None:
    """A message waits up to LOCK_WAIT for its lock, then up to REDIS_TIMEOUT for each of its
    two round trips; all of it must fit in gunicorn's worker timeout, or the worker is killed
    mid-message (and Twilio, at 15 s, gives up too). ``blamed``: the variable named first."""
    wait, timeout = config["LOCK_WAIT"], config["REDIS_TIMEOUT"]
    if wait + 2 * timeout >= WORKER_TIMEOUT:
        raise ConfigError(
            f"{blamed}={config[blamed]:g}: LOCK_WAIT ({wait:g}) + 2 × REDIS_TIMEOUT "
            f"({timeout:g}) must stay under gunicorn's {WORKER_TIMEOUT} s worker timeout"
        )


def _one_sender(config: dict[str, Any]) -> None:
    """Outbound messages' settings that only make sense together."""
    if bool(config["TWILIO_API_KEY"]) != bool(config["TWILIO_API_SECRET"]):
        present, missing = (
            ("TWILIO_API_KEY", "TWILIO_API_SECRET")
            if config["TWILIO_API_KEY"]
            else ("TWILIO_API_SECRET", "TWILIO_API_KEY")
        )
        raise ConfigError(f"{present} is set without {missing}: an API key is used with its secret")
    if config["TWILIO_API_KEY"] and not config["TWILIO_ACCOUNT_SID"]:
        raise ConfigError("TWILIO_API_KEY is set without TWILIO_ACCOUNT_SID: the key sends for an account")
    if config["DELIVERY_RETRY_BASE"] > config["DELIVERY_RETRY_MAX"]:
        raise ConfigError(
            f"DELIVERY_RETRY_BASE={config['DELIVERY_RETRY_BASE']:g}: more than DELIVERY_RETRY_MAX "
            f"({config['DELIVERY_RETRY_MAX']:g})"
        )


def _hash_key(config: dict[str, Any]) -> None:
    """``EVENTS_NUMBERS=hashed`` hashes with a key of its own, long enough not to be guessed."""
    if config["EVENTS_NUMBERS"] == "hashed" and len(config["EVENTS_HASH_KEY"] or "") < MIN_HASH_KEY:
        raise ConfigError(
            f"EVENTS_HASH_KEY: EVENTS_NUMBERS=hashed needs a secret key of at least {MIN_HASH_KEY} characters"
        )
