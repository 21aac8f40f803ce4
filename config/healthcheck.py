"""The container's healthcheck: exit 0 when ``/readyz`` answers 200 where gunicorn listens.

The address is config/gunicorn.conf.py's (``bind_address``); an "every interface" host is
reached on loopback.
"""

import sys
import urllib.request

from service.settings import bind_address, load

host, _, port = bind_address(load()).rpartition(":")
host = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "[::]": "[::1]"}.get(host, host)
try:
    urllib.request.urlopen(f"http://{host}:{port}/readyz", timeout=3)  # raises on a 503
except OSError as error:
    sys.exit(f"not ready: {error}")
