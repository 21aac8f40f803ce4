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
from datetime import UTC, datetime
from urllib.parse import unquote

import click
from flask import Flask, g, has_request_context
from gunicorn.glogging import Logger as GunicornBaseLogger

from .masking import mask

# A phone number, raw or percent-encoded (%2B…), not part of a longer word or number:
# E.164 allows 15 digits; 8 keeps short service numbers, ports and pids readable.
PHONE_NUMBER = re.compile(r"(?<![\w%])(?:\+|%2[Bb])?\d{8,15}(?!\w)")
ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*m")
# Health probes are not access-logged: one every few seconds would drown the rest.
PROBE_PATHS = ("/healthz", "/readyz")  # service/health.py


def scrub(text: str) -> str:
    """``text`` with every phone number masked and terminal colours removed."""
    return PHONE_NUMBER.sub(lambda found: mask(unquote(found.group())), ANSI_ESCAPE.sub("", text))


def _scrubbed(value):
    return scrub(value) if isinstance(value, str) else value


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": scrub(record.getMessage()),
        }
        line.update({key: _scrubbed(value) for key, value in getattr(record, "fields", {}).items()})
        if record.exc_info:
            line["error"] = scrub(self.formatException(record.exc_info))
        return json.dumps(line, ensure_ascii=False, default=str)


class TextFormatter(logging.Formatter):
    """``2026-11-25 12:42:21.906 INFO service.webhook: webhook replied from=+1555***0001 …``"""

    def format(self, record: logging.LogRecord) -> str:
        moment = datetime.fromtimestamp(record.created).isoformat(sep=" ", timespec="milliseconds")
        fields = "".join(f" {key}={_scrubbed(value)}" for key, value in getattr(record, "fields", {}).items())
        line = f"{moment} {record.levelname} {record.name}: {scrub(record.getMessage())}{fields}"
        if record.exc_info:
            line += "\n" + scrub(self.formatException(record.exc_info))
        return line


FORMATTERS = {"json": JsonFormatter, "text": TextFormatter}


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
        self.setFormatter(JsonFormatter())

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


class _DevServerRequestLines(logging.Filter):
    """werkzeug's request lines (``make run``), without query strings."""

    QUERY = re.compile(r"\?[^\s\"]*")

    def filter(self, record: logging.LogRecord) -> bool:
        is_request_line = isinstance(record.msg, str) and record.msg.endswith('"%s" %s %s')
        if is_request_line and getattr(_summarised, "request", False):  # log_request's form
            _summarised.request = False
            return False
        record.msg, record.args = self.QUERY.sub("", record.getMessage()), ()
        return True


class GunicornLogger(GunicornBaseLogger):
    """gunicorn's own lines in the service's form (``logger_class`` in config/gunicorn.conf.py).

    Access lines name the path only (never the query), with method, status, size and duration
    as fields. Health probes get none, and neither does a webhook request: its own summary line
    (method, status, latency, client) is its one line (a second one cost ~100 µs a message).
    """

    def setup(self, cfg):
        super().setup(cfg)
        from .settings import load  # the master checked every setting before this runs

        formatter = FORMATTERS[load()["LOG_FORMAT"]]()
        for log in (self.error_log, self.access_log):
            for handler in log.handlers:
                handler.setFormatter(formatter)

    def access(self, resp, req, environ, request_time):
        path = environ.get("PATH_INFO", "")
        if getattr(_summarised, "request", False):  # gunicorn logs it on the thread that served it
            _summarised.request = False
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


def open_summary(**fields) -> None:
    """Starts collecting fields for the current request's one summary line."""
    g.log_fields = fields
    _summarised.request = True


def annotate(**fields) -> bool:
    """Adds fields to the current request's summary line; False when none will be written."""
    if not has_request_context() or "log_fields" not in g:
        return False
    g.log_fields.update(fields)
    return True


def report(logger: logging.Logger, problem: str) -> None:
    """A problem met while serving: the ``reason`` of the request's summary line if it has
    one (one line per webhook request), else a warning line of its own."""
    if not annotate(reason=problem):
        logger.warning(problem)


def summary_fields() -> dict:
    return g.get("log_fields", {})


def init_app(app: Flask) -> None:
    """Installs the handler on the root logger once per process (apps may be many), in the
    form the app's ``LOG_FORMAT`` asks for.

    No line says where in the source it was logged from, nor the thread or multiprocessing
    process: logging then skips collecting them for every record (the logging HOWTO's
    "Optimization"; the caller's frame walk was a tenth of the webhook's log line).
    """
    logging._srcfile = None
    logging.logThreads = False
    logging.logMultiprocessing = False
    root = logging.getLogger()
    handler = next((h for h in root.handlers if isinstance(h, _Handler)), None)
    if handler is None:
        handler = _Handler()
        root.addHandler(handler)
        logging.getLogger("werkzeug").addFilter(_DevServerRequestLines())
    handler.setFormatter(FORMATTERS[app.config["LOG_FORMAT"]]())
    root.setLevel(logging.INFO)
