"""How gunicorn's workers serve the app (config/gunicorn.conf.py configures gunicorn with it).

``WORKER_CLASS`` picks gunicorn's worker:

- ``gevent`` (the default): one greenlet per connection, up to ``WORKER_CONNECTIONS`` a
  worker. Every blocking call the app makes (Redis, HTTP through requests and so twilio's REST
  client, ``time.sleep``, the sweeper's waits) yields to the others, so a client that stalls,
  an idle connection or a slow handler holds its own greenlet and nothing that other
  conversations need. gevent patches the standard library (``monkey.patch_all``) at the top of
  config/gunicorn.conf.py, before anything imports ``socket``, ``ssl`` or ``threading``
  (gevent's rule: patched later, a lock or TLS socket made before would block the whole
  worker). A handler that computes for seconds without any I/O still holds its worker.
- ``gthread``: threads read requests (2 × workers + 8 a worker, room for that many stalled
  clients even if all land on one worker) and at most ``APP_SLOTS`` at a time run the app, so
  that a burst on one conversation queues here rather than on its lock.
- ``sync``: one request at a time per worker; for a deployment behind a proxy that buffers
  whole requests.

Under every class a request's whole body is read before the app runs (``BodyFirst``), within
``CLIENT_TIMEOUT`` (408 past it, and the rest never read). gunicorn's ``keepalive`` is
``CLIENT_TIMEOUT`` too: under gevent it bounds the time a request's line and headers may take
to arrive, and every class closes a keep-alive connection idle that long.
"""

from __future__ import annotations

import contextlib
import io
import socket
import threading
from typing import Any

from gunicorn.http import message

APP_SLOTS = 4  # gthread: requests of one worker running the app at once
# gevent: connections one worker holds at once (gunicorn's worker_connections); past it the
# worker accepts no more until one closes, and CLIENT_TIMEOUT closes the stalled ones.
WORKER_CONNECTIONS = 1000
# Room in a request line for the method, the path and the protocol, besides the query string.
REQUEST_LINE_ROOM = 8190


def threads(worker_class: str, workers: int) -> int:
    """Threads per worker: under gthread room for 2 × ``workers`` stalled clients, plus 8."""
    return 2 * workers + 8 if worker_class == "gthread" else 1


def app_slots(worker_class: str) -> int | None:
    """Requests of one worker that run the app at once (None: as many as arrive)."""
    return APP_SLOTS if worker_class == "gthread" else None


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


def read_within(environ: dict, size: int, seconds: float, cooperative: bool) -> bytes:
    """Up to ``size`` bytes of the request body within ``seconds`` (TimeoutError past them).

    Under gevent (``cooperative``) the bound is on the whole body (a ``gevent.Timeout``); under
    threads it is on each read (a timeout on gunicorn's socket, put back afterwards): a client
    that goes silent is cut off, one that sends a byte now and then is not."""
    stream = environ["wsgi.input"]
    if cooperative:
        from gevent import Timeout

        with Timeout(seconds, TimeoutError):
            return stream.read(size)
    sock = environ.get("gunicorn.socket")
    if sock is None:
        return stream.read(size)
    before = sock.gettimeout()
    sock.settimeout(seconds)
    try:
        return stream.read(size)
    finally:
        sock.settimeout(before)


class BodyFirst:
    """WSGI middleware: reads the request body (at most MAX_BODY_BYTES + 1 bytes: the app
    answers 413 beyond that) within ``client_timeout`` (``read_within``), then runs the app
    (in one of ``slots`` places, when given)."""

    def __init__(
        self,
        app,
        max_body: int,
        client_timeout: float = 5,
        slots: int | None = None,
        cooperative: bool = False,
    ):
        self.app = app
        self.max_body = max_body
        self.client_timeout = client_timeout
        self.cooperative = cooperative
        self.slots = threading.BoundedSemaphore(slots) if slots else contextlib.nullcontext()

    def __call__(self, environ, start_response):
        declared = environ.get("CONTENT_LENGTH") or ""
        if not declared.isdigit() or int(declared) <= self.max_body:  # larger: never read
            size = int(declared) if declared.isdigit() else self.max_body + 1  # chunked
            try:
                body = read_within(environ, size, self.client_timeout, self.cooperative)
            except TimeoutError:
                return self.too_slow(environ, start_response)
            environ["wsgi.input"] = io.BytesIO(body)
        with self.slots:
            response = self.app(environ, start_response)
            try:
                return list(response)
            finally:
                if hasattr(response, "close"):
                    response.close()

    @staticmethod
    def too_slow(environ, start_response) -> list[bytes]:
        """408 to a body that did not arrive in time; the rest of it is never read (the
        connection's reading side is shut, so gunicorn closes it after the answer)."""
        sock = environ.get("gunicorn.socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RD)
        body = b"request body not received within CLIENT_TIMEOUT\n"
        start_response(
            "408 Request Timeout",
            [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(body)))],
        )
        return [body]


def serve(worker: Any, settings: dict) -> None:
    """gunicorn's ``post_worker_init``: each worker runs the lifecycle sweeper in a thread (a
    greenlet under gevent; a lease in Redis lets one sweep at a time), so conversations end on
    time without any request arriving, and the outbound sender (claims in Redis let any number
    deliver at once); and serves the app behind ``BodyFirst``."""
    from .lifecycle import start_sweeper
    from .sender import start_sender

    start_sweeper(worker.wsgi)
    start_sender(worker.wsgi)
    worker.wsgi = BodyFirst(
        worker.wsgi,
        settings["MAX_BODY_BYTES"],
        settings["CLIENT_TIMEOUT"],
        app_slots(settings["WORKER_CLASS"]),
        cooperative=settings["WORKER_CLASS"] == "gevent",
    )
