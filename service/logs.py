"""Log lines, one per record: JSON objects for log pipelines, or text for a developer's terminal.

``LOG_FORMAT`` picks the form (``json`` by default, ``text`` under ``make run``). Fields given
as ``extra={"fields": {...}}`` become top-level keys of a JSON line (``key=value`` in text).
Whatever logger wrote a line (the service, Flask, werkzeug, gunicorn), every phone number in
it is masked here, and request lines carry no query string (a GET webhook holds From, To and
Body there). Callers still never log a message body or the auth token.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import sys
import threading
import time
from collections.abc import Callable
from contextvars import ContextVar, Token
from datetime import UTC, datetime
from urllib.parse import unquote

import click
import orjson
from flask import Flask
from gunicorn.glogging import Logger as GunicornBaseLogger

from .masking import mask

# A phone number, raw or percent-encoded (%2B…), not part of a longer word or number:
# E.164 allows 15 digits; 8 keeps short service numbers, ports and pids readable.
PHONE_NUMBER = re.compile(r"(?<![\w%])(?:\+|%2[Bb])?\d{8,15}(?!\w)")
ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*m")
# Health probes are not access-logged: one every few seconds would drown the rest.
PROBE_PATHS = ("/healthz", "/readyz")  # service/health.py
# An operator's pair in a path (service/ops.py), masked whole: typed as "+1 415 555 0123" or
# "(415)5550123" a number escapes PHONE_NUMBER.
OPS_PAIR = "/ops/conversations/"
OPS_PAIR_IN_LINE = re.compile(r"/ops/conversations/[^\s\"?]*")  # a request line's path is quoted


def mask_ops_pair(path: str) -> str:
    """``path`` with the numbers of an ``/ops/conversations/FROM/TO`` masked."""
    if not path.startswith(OPS_PAIR):
        return path
    return OPS_PAIR + "/".join(mask(unquote(part)) for part in path[len(OPS_PAIR) :].split("/"))


# What every phone number and terminal colour has: a text without it needs no scrubbing.
SUSPECT = re.compile(r"\d{8}|\x1b")
# ASCII text with each digit made 0 and all else not: one ``bytes.translate``, no regex scan.
DIGITS = bytes(48 if 48 <= byte <= 57 else 46 for byte in range(256))


def scrub(text: str) -> str:
    """``text`` with every phone number masked and terminal colours removed."""
    return PHONE_NUMBER.sub(lambda found: mask(unquote(found.group())), ANSI_ESCAPE.sub("", text))


def _scrubbed(value):
    return scrub(value) if isinstance(value, str) else value


def _clean(message: str, fields: dict) -> tuple[str, dict]:
    """``message`` and ``fields`` scrubbed, the usual line settled without substitutions
    (instead of two regex passes per field): a value of letters and
    digits alone (a MessageSid, a method) holds a number only when it is all digits, since a
    number starts after a character that is not a word's; the rest is searched at once, for
    what every number and colour has."""
    texts = [message]
    for value in fields.values():
        if isinstance(value, str) and not (value.isalnum() and not value.isdecimal()):
            texts.append(value)
    text = "\n".join(texts)
    if text.isascii():
        suspect = "\x1b" in text or b"00000000" in text.encode().translate(DIGITS)
    else:
        suspect = SUSPECT.search(text) is not None
    if not suspect:
        return message, fields
    return scrub(message), {key: _scrubbed(value) for key, value in fields.items()}


class _Moments:
    """A line's time, its second written once per second (instead of ``datetime`` and
    ``isoformat`` for every line): ``2026-11-25T12:42:21.906+00:00`` in UTC
    for JSON, ``2026-11-25 12:42:21.906`` in local time for text."""

    def __init__(self, utc: bool):
        self.utc = utc
        self.second = (-1, "")  # (epoch second, its text)
        self.milliseconds = [f".{n:03d}" + ("+00:00" if utc else "") for n in range(1000)]

    def __call__(self, created: float) -> str:
        second, milliseconds = divmod(int(created * 1000), 1000)
        written, text = self.second
        if written != second:
            if self.utc:
                text = datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%dT%H:%M:%S")
            else:
                text = datetime.fromtimestamp(second).strftime("%Y-%m-%d %H:%M:%S")
            self.second = (second, text)
        return text + self.milliseconds[milliseconds]


def _default(value):
    return str(value)


def json_line(created: float, level: str, logger: str, message: str, fields: dict, error: str | None) -> str:
    """One JSON line; the formatter's and the webhook's direct line alike (orjson, which
    encodes a line in one C call)."""
    message, fields = _clean(message, fields)
    line = {"time": _utc(created), "level": level.lower(), "logger": logger, "message": message, **fields}
    if error is not None:
        line["error"] = scrub(error)
    try:
        return orjson.dumps(line, default=_default).decode()
    except (orjson.JSONEncodeError, TypeError):  # an int over 64 bits, a key that is not text
        return json.dumps(line, ensure_ascii=False, separators=(",", ":"), default=str)


def text_line(created: float, level: str, logger: str, message: str, fields: dict, error: str | None) -> str:
    """``2026-11-25 12:42:21.906 INFO service.webhook: webhook replied from=+1555***0001 …``"""
    message, fields = _clean(message, fields)
    line = f"{_local(created)} {level} {logger}: {message}" + "".join(
        f" {key}={value}" for key, value in fields.items()
    )
    if error is not None:
        line += "\n" + scrub(error)
    return line


_utc, _local = _Moments(utc=True), _Moments(utc=False)


class LineFormatter(logging.Formatter):
    """A record as ``line`` (``json_line`` or ``text_line``) writes it; ``write`` calls the same
    function without a record."""

    def __init__(self, line: Callable[..., str]):
        super().__init__()
        self.line = line

    def format(self, record: logging.LogRecord) -> str:
        # exc_info's traceback, or one a caller wrote without the exception's text (a log
        # call's ``extra={"error": …}``: handler.failure's frames)
        error = self.formatException(record.exc_info) if record.exc_info else getattr(record, "error", None)
        fields = getattr(record, "fields", {})
        return self.line(record.created, record.levelname, record.name, record.getMessage(), fields, error)


LINES = {"json": json_line, "text": text_line}  # LOG_FORMAT → its line


class _Quiet:
    """Below which level the service's own handler stays silent (operators' commands)."""

    level = logging.NOTSET


@contextlib.contextmanager
def quiet():
    """Only errors are written meanwhile: an operator's command prints its output alone."""
    before, _Quiet.level = _Quiet.level, logging.ERROR
    try:
        yield
    finally:
        _Quiet.level = before


class _Handler(logging.StreamHandler):
    """Writes to whatever ``sys.stdout`` is at the time (pytest swaps it per test), or to
    ``sys.stderr`` inside a CLI command, whose stdout is its output (``--json | jq``)."""

    def __init__(self):
        super().__init__()
        self.setFormatter(LineFormatter(json_line))

    @property
    def stream(self):
        return sys.stderr if click.get_current_context(silent=True) else sys.stdout

    @stream.setter
    def stream(self, value):
        pass

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= _Quiet.level and super().filter(record)


# A request that wrote its own summary line (the webhook's) gets no second, server's request
# line (werkzeug's under ``make run``, gunicorn's access line); both log it on the thread that
# served it, right after.
_summarised = threading.local()


def _take_summarised() -> bool:
    """Whether this thread's last request wrote its own summary line (its server's request
    line is then left out); cleared as it is read."""
    if getattr(_summarised, "request", False):
        _summarised.request = False
        return True
    return False


class _DevServerRequestLines(logging.Filter):
    """werkzeug's request lines (``make run``), without query strings."""

    QUERY = re.compile(r"\?[^\s\"]*")

    def filter(self, record: logging.LogRecord) -> bool:
        is_request_line = isinstance(record.msg, str) and record.msg.endswith('"%s" %s %s')
        if is_request_line and _take_summarised():  # log_request's form
            return False
        line = self.QUERY.sub("", record.getMessage())
        record.msg, record.args = OPS_PAIR_IN_LINE.sub(lambda found: mask_ops_pair(found.group()), line), ()
        return True


class GunicornLogger(GunicornBaseLogger):
    """gunicorn's own lines in the service's form (``logger_class`` in config/gunicorn.conf.py).

    Access lines name the path only (never the query), with method, status, size and duration
    as fields. Health probes get none, and neither does a webhook request: its own summary line
    (method, status, latency, client) is its one line (a second would cost a
    formatted record per message).
    """

    def setup(self, cfg):
        super().setup(cfg)
        from .settings import load  # the master checked every setting before this runs

        formatter = LineFormatter(LINES[load()["LOG_FORMAT"]])
        for log in (self.error_log, self.access_log):
            for handler in log.handlers:
                handler.setFormatter(formatter)

    def access(self, resp, req, environ, request_time):
        path = environ.get("PATH_INFO", "")
        path = mask_ops_pair(path)
        if _take_summarised():  # gunicorn logs it on the thread that served it
            return
        if not self.access_log_enabled or path in PROBE_PATHS:
            return
        status = resp.status.split(None, 1)[0] if isinstance(resp.status, str) else resp.status
        method = environ.get("REQUEST_METHOD", "-")
        self.access_log.info(
            "%s %s %s",
            method,
            path,
            status,
            extra={
                "fields": {
                    "method": method,
                    "path": path,
                    "status": int(status),
                    "bytes": getattr(resp, "sent", None),
                    "duration_ms": round(request_time.total_seconds() * 1000, 2),
                    "remote": environ.get("REMOTE_ADDR", "-"),
                }
            },
        )


def write(logger: logging.Logger, level: int, message: str, fields: dict) -> None:
    """The line ``logger.log(level, message, extra={"fields": fields})`` writes, written here
    when the service's handler is the only one it would reach (as under gunicorn and ``make
    run``): no LogRecord, no handler chain (logging's machinery, which the line does not
    need). Otherwise (a test's capturing handler, another handler, a filter, the logger
    or the level turned off) it goes through logging. Same format, same masking either way."""
    handler = _sole_handler(logger, level)
    formatter = handler.formatter if handler is not None else None
    if handler is None or not isinstance(formatter, LineFormatter):
        logger.log(level, message, extra={"fields": fields})
        return
    handler.acquire()
    try:
        stream = handler.stream
        stream.write(
            formatter.line(time.time(), logging.getLevelName(level), logger.name, message, fields, None)
            + "\n"
        )
        stream.flush()
    except RecursionError:  # as logging's own handlers do
        raise
    except Exception:
        handler.handleError(logger.makeRecord(logger.name, level, "", 0, message, (), None))
    finally:
        handler.release()


def _sole_handler(logger: logging.Logger, level: int) -> _Handler | None:
    """The service's handler when it alone would write ``logger``'s record at ``level``."""
    if logger.filters or not logger.isEnabledFor(level):
        return None
    found = None
    current: logging.Logger | None = logger
    while current is not None:
        for handler in current.handlers:
            if found is not None or type(handler) is not _Handler:
                return None
            found = handler
        if not current.propagate:
            break
        current = current.parent
    if found is None or found.filters or level < found.level or level < _Quiet.level:
        return None
    return found


# The current webhook request's summary fields (None outside one): a context variable set by
# the webhook's WSGI layer, since its line is opened before Flask's contexts and written after.
_summary: ContextVar[dict | None] = ContextVar("sms_summary", default=None)


def open_summary(fields: dict) -> Token:
    """Starts collecting ``fields`` (the dict itself) for the current request's one summary
    line; ``close_summary`` with the token returned ends it."""
    _summarised.request = True
    return _summary.set(fields)


def close_summary(token: Token) -> None:
    _summary.reset(token)


def annotate(**fields) -> bool:
    """Adds fields to the current request's summary line; False when none will be written."""
    summary = _summary.get()
    if summary is None:
        return False
    summary.update(fields)
    return True


def report(logger: logging.Logger, problem: str) -> None:
    """A problem met while serving: the ``reason`` of the request's summary line if it has
    one (one line per webhook request), else a warning line of its own."""
    if not annotate(reason=problem):
        logger.warning(problem)


def init_app(app: Flask) -> None:
    """Installs the handler on the root logger once per process (apps may be many), in the
    form the app's ``LOG_FORMAT`` asks for. Logging's process-wide switches stay as they are:
    a bot author's own loggers keep the caller, thread and process of their records.
    """
    root = logging.getLogger()
    handler = next((h for h in root.handlers if isinstance(h, _Handler)), None)
    if handler is None:
        handler = _Handler()
        root.addHandler(handler)
        logging.getLogger("werkzeug").addFilter(_DevServerRequestLines())
    handler.setFormatter(LineFormatter(LINES[app.config["LOG_FORMAT"]]))
    root.setLevel(logging.INFO)
