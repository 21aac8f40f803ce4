"""Logs as JSON lines on stdout, one object per record, so a log pipeline can parse them.

Fields given as ``extra={"fields": {...}}`` become top-level keys of the line; everything
else is the usual time, level, logger and message. What goes in is the caller's duty: phone
numbers only through ``masking.mask``, never a message body or the auth token.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from datetime import datetime, timezone
from urllib.parse import unquote

import click
from flask import Flask, g, has_request_context

from .masking import mask


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = {
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        line.update(getattr(record, "fields", {}))
        if record.exc_info:
            line["error"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False, default=str)


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


class _ScrubbedRequestLines(logging.Filter):
    """Request lines (werkzeug's under ``make run``, gunicorn's access log) without query
    strings, since a GET webhook carries From, To and Body there, and with the numbers in
    ``/ops/conversations/<from>/<to>`` masked."""

    QUERY = re.compile(r"\?[^\s\"]*")
    OPS_PAIR = re.compile(r"(/ops/conversations/)([^/\s\"?]+)/([^/\s\"?]+)")

    def filter(self, record: logging.LogRecord) -> bool:
        line = self.QUERY.sub("", record.getMessage())
        line = self.OPS_PAIR.sub(lambda m: m.group(1) + mask(unquote(m.group(2))) + "/"
                                 + mask(unquote(m.group(3))), line)
        record.msg, record.args = line, ()
        return True


def open_summary() -> None:
    """Starts collecting fields for the current request's one summary line."""
    g.log_fields = {}


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
    """Installs the JSON handler on the root logger once per process (apps may be many)."""
    root = logging.getLogger()
    if not any(isinstance(handler, _Handler) for handler in root.handlers):
        root.addHandler(_Handler())
        for name in ("werkzeug", "gunicorn.access"):
            logging.getLogger(name).addFilter(_ScrubbedRequestLines())
    root.setLevel(logging.INFO)
