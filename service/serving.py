"""How gunicorn's workers serve the app (config/gunicorn.conf.py configures gunicorn with it).

Threads read requests; a few at a time run the app. With no proxy in front (a PaaS) nothing
buffers requests: a client that sends its headers and then stalls mid-body would hold a sync
worker until it gave up. Here each worker has threads for 2 × workers such clients (even if
they all land on it) plus 8, and a thread first reads its request's whole body (``BodyFirst``),
so a stalled client holds a thread, never a place in the app. At most ``APP_SLOTS`` requests
per worker then run the app at once: enough that one waiting for a busy conversation's lock
does not hold up the others, few enough that a burst on one conversation queues here rather
than on its lock (where every waiter polls Redis, fights for the GIL, and LOCK_WAIT bounds
the wait).
"""

from __future__ import annotations

import io
import threading
from typing import Any

from gunicorn.http import message

APP_SLOTS = 4
# Room in a request line for the method, the path and the protocol, besides the query string.
REQUEST_LINE_ROOM = 8190


def threads(workers: int) -> int:
    """Threads per worker: room for 2 × ``workers`` stalled clients, plus 8."""
    return 2 * workers + 8


def request_line_limit(max_body: int) -> int:
    """gunicorn's ``limit_request_line``: a GET webhook carries the whole message in its query
    string (Twilio's longest, 1,600 characters of up to 9 bytes percent-encoded, is ~15 KB, over
    gunicorn's 4,094-byte default), which the app bounds by MAX_BODY_BYTES (414 beyond); the
    line gets that and room for the rest. Unbounded (0), gunicorn's parser reads a line of any
    length, copying its buffer at each read (quadratic in the line's length).

    gunicorn takes no limit above its ``MAX_REQUEST_LINE`` (8,190) but 0 (none): the module's
    ceiling is raised to this limit, the one way to a bound in between."""
    limit = max_body + REQUEST_LINE_ROOM
    message.MAX_REQUEST_LINE = max(message.MAX_REQUEST_LINE, limit)
    return limit


class BodyFirst:
    """WSGI middleware: reads the request body (at most MAX_BODY_BYTES + 1 bytes: the app
    answers 413 beyond that), then runs the app in one of ``slots`` places."""

    def __init__(self, app, max_body: int, slots: int = APP_SLOTS):
        self.app = app
        self.max_body = max_body
        self.slots = threading.BoundedSemaphore(slots)

    def __call__(self, environ, start_response):
        declared = environ.get("CONTENT_LENGTH") or ""
        if not declared.isdigit() or int(declared) <= self.max_body:  # larger: never read
            size = int(declared) if declared.isdigit() else self.max_body + 1  # chunked
            environ["wsgi.input"] = io.BytesIO(environ["wsgi.input"].read(size))
        with self.slots:
            response = self.app(environ, start_response)
            try:
                return list(response)
            finally:
                if hasattr(response, "close"):
                    response.close()


def serve(worker: Any, max_body: int) -> None:
    """gunicorn's ``post_worker_init``: each worker runs the lifecycle sweeper in a thread (a
    lease in Redis lets one sweep at a time), so conversations end on time without any request
    arriving, and the outbound sender (claims in Redis let any number deliver at once); and
    serves the app behind ``BodyFirst``."""
    from .lifecycle import start_sweeper
    from .sender import start_sender

    start_sweeper(worker.wsgi)
    start_sender(worker.wsgi)
    worker.wsgi = BodyFirst(worker.wsgi, max_body)
