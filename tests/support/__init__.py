"""What the tests (and ``bench/``) use besides fixtures: ``conftest.py`` holds only fixtures.

- ``app``: the app with a test token, signed webhook requests;
- ``app_servers``: the app on real sockets, in a thread (``LiveServer``) or under gunicorn;
- ``redis_servers``: redis-server processes, Cluster and Sentinel topologies;
- ``conversations``: conversations planted straight through the key schema (``plant``);
- ``numbers``: the phone numbers the tests talk with; ``replies``: the counter's replies;
- ``programs``: the programs a test needs, or a skip (a failure under ``REQUIRE_PROGRAMS=1``);
- ``ports``, ``waiting``: free loopback ports, bounded waits;
- ``prometheus``: the text format read back into samples;
- ``browser``: a headless Chromium driven by selenium.
"""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
