"""How big a request body may be: ``MAX_BODY_BYTES``, however the body arrives.

Flask's ``MAX_CONTENT_LENGTH`` answers 413 to a body whose ``Content-Length`` is too big. A
chunked body has none, and for it werkzeug's stream just ends at the limit, so the form (and
the signature checked over it) would be a truncated body answered 200. ``BoundedRequest``
reads such a body, when it is first needed, up to one byte past the limit: that byte is what
tells "too big" (413, as with a ``Content-Length``) from "exactly the limit".
"""

from __future__ import annotations

import io
from typing import IO, cast

from flask import Flask, Request
from werkzeug.datastructures import ImmutableMultiDict
from werkzeug.exceptions import RequestEntityTooLarge
from werkzeug.http import parse_cookie
from werkzeug.utils import cached_property


class BoundedRequest(Request):
    """Flask's request, whose stream refuses a body without ``Content-Length`` over
    ``max_content_length`` instead of cutting it there."""

    @cached_property
    def cookies(self) -> ImmutableMultiDict[str, str]:
        """The request's cookies, from the one ``HTTP_COOKIE`` a WSGI server gives: werkzeug
        joins ``headers.getlist("Cookie")``, which walks the whole environ to find it
        (every message reads the conversation's cookie: -56k instructions per request)."""
        cookies = parse_cookie(self.environ.get("HTTP_COOKIE", ""), cls=self.dict_storage_class)
        return cast(ImmutableMultiDict[str, str], cookies)  # the class asked for, as werkzeug's

    @cached_property
    def stream(self) -> IO[bytes]:
        limit = self.max_content_length
        # Only a server that ends the stream itself (chunked) says so; without it werkzeug
        # reads no body that lacks a Content-Length at all.
        if self.content_length is not None or limit is None or not self.environ.get("wsgi.input_terminated"):
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
