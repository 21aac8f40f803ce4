"""How big a request body may be: ``MAX_BODY_BYTES``, however the body arrives.

Flask's ``MAX_CONTENT_LENGTH`` answers 413 to a body whose ``Content-Length`` is too big. A
chunked body has none, and for it werkzeug's stream just ends at the limit, so the form (and
the signature checked over it) would be a truncated body answered 200. ``BoundedRequest``
reads such a body, when it is first needed, up to one byte past the limit: that byte is what
tells "too big" (413, as with a ``Content-Length``) from "exactly the limit".
"""

from __future__ import annotations

import io
from typing import IO

from flask import Flask, Request
from werkzeug.exceptions import ClientDisconnected, RequestEntityTooLarge
from werkzeug.utils import cached_property


class BoundedRequest(Request):
    """Flask's request, whose stream refuses a body without ``Content-Length`` over
    ``max_content_length`` instead of cutting it there, and reads one within it at once."""

    @cached_property
    def stream(self) -> IO[bytes]:
        limit, environ = self.max_content_length, self.environ
        declared = environ.get("CONTENT_LENGTH", "")  # the usual case without werkzeug's headers
        plain = declared.isascii() and declared.isdigit() and "HTTP_TRANSFER_ENCODING" not in environ
        length = int(declared) if plain else self.content_length
        if length is not None and limit is not None and length <= limit:
            # Read in one call: werkzeug's LimitedStream reads through a Python loop of
            # readinto calls (the better part of the webhook's form reading).
            body = environ["wsgi.input"].read(length)
            if len(body) < length and "wsgi.input_terminated" not in environ:
                raise ClientDisconnected()  # as LimitedStream: the client left mid-body
            return io.BytesIO(body)
        # Only a server that ends the stream itself (chunked) says so; without it werkzeug
        # reads no body that lacks a Content-Length at all.
        if length is not None or limit is None or not environ.get("wsgi.input_terminated"):
            return super().stream
        body = _read(self.environ["wsgi.input"], limit + 1)
        if len(body) > limit:
            raise RequestEntityTooLarge()
        return io.BytesIO(body)


def _read(stream, most: int) -> bytes:
    """Up to ``most`` bytes: a server's stream may return less per read (one chunk)."""
    chunks, size = [], 0
    while size < most:
        chunk = stream.read(most - size)
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)


def init_app(app: Flask) -> None:
    """``settings.init_app`` has set ``MAX_CONTENT_LENGTH`` to ``MAX_BODY_BYTES``."""
    app.request_class = BoundedRequest
