"""The repository's gunicorn setup (config/gunicorn.conf.py) against what production meets with
no proxy in front: clients that stall mid-body, and masters that die without cleaning up."""

from __future__ import annotations

import fcntl
import os
import signal
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests

from service.keys import Keys
from service.simulator import TwilioSimulator
from tests.support.app import TOKEN
from tests.support.app_servers import GUNICORN_CONF, Gunicorn
from tests.support.numbers import FINN, OURS, REY
from tests.support.prometheus import scrape
from tests.support.replies import count_reply, thanks
from tests.support.waiting import wait_until

WORKERS = 2
TIMEOUT = 10  # config/gunicorn.conf.py's worker timeout


def stall(server: Gunicorn) -> socket.socket:
    """A client that sends a webhook's headers and the start of its body, then nothing."""
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    sock.sendall(
        b"POST /sms HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/x-www-form-urlencoded\r\n"
        b"Content-Length: 1000\r\nX-Twilio-Signature: x\r\n\r\nFrom=%2B1555123"
    )
    return sock


def messages(client, sender=REY) -> int:
    """Messages saved in the conversation, as Redis holds it."""
    return int(client.hget(Keys().conversation(sender, OURS).conversation, "seq"))


@pytest.mark.slow
def test_stalled_clients_do_not_stop_the_service(redis_url, redis_client):
    """2 × WEB_CONCURRENCY clients stall mid-body (CLIENT_TIMEOUT cuts them off; many more:
    tests/test_workers.py): signed messages are answered meanwhile (a client gives up after
    5 s here, Twilio after 15 s) and past the worker timeout, counts stay exact, and no worker
    is killed."""
    with Gunicorn({"REDIS_URL": redis_url}, workers=WORKERS, config=GUNICORN_CONF) as server:
        twilio = TwilioSimulator(server.url, TOKEN, timeout=5)
        stalled = [stall(server) for _ in range(2 * WORKERS)]
        try:
            sent = [twilio.send(REY, OURS, f"while stalled {n}") for n in range(3)]
            assert [d.status for d in sent] == [200, 200, 200]
            with ThreadPoolExecutor(8) as pool:  # a burst on one conversation, each its own connection
                burst = list(
                    pool.map(
                        lambda n: TwilioSimulator(server.url, TOKEN, timeout=5).send(REY, OURS, f"burst {n}"),
                        range(8),
                    )
                )
            assert [d.status for d in burst] == [200] * 8
            time.sleep(TIMEOUT + 1)  # a stalled sync worker would be killed by now
            assert twilio.send(REY, OURS, "after the worker timeout").reply == count_reply("Rey", 12)
        finally:
            for sock in stalled:
                sock.close()
        assert messages(redis_client) == 12
        counted = scrape(requests.get(server.base + "/metrics", timeout=5).text)
        assert counted["sms_messages_received_total{outcome=replied}"] == 12
        output = server.output()
        assert "WORKER TIMEOUT" not in output
        assert "Traceback" not in output


def owner_locked(directory: Path) -> bool:
    with open(directory / ".owner") as owner:
        try:
            fcntl.flock(owner, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        return False


@pytest.mark.slow
def test_metrics_directories_of_dead_masters_are_removed_at_start(tmp_path):
    """Without PROMETHEUS_MULTIPROC_DIR gunicorn makes one in the temporary directory; one
    left by a master killed with SIGKILL goes at the next start, a running one's stays."""
    env = {"TMPDIR": str(tmp_path)}
    made = lambda: set(tmp_path.glob("sms-sessions-metrics-*"))  # noqa: E731
    foreign = tmp_path / "sms-sessions-metrics-foreign"  # no owner file: maybe in use, never ours
    foreign.mkdir()

    killed = Gunicorn(env, workers=1, config=GUNICORN_CONF)
    with killed:
        [killed_dir] = made() - {foreign}
        with Gunicorn(env, workers=1, config=GUNICORN_CONF):
            [running_dir] = made() - {foreign, killed_dir}
            assert killed_dir.exists()
            assert owner_locked(killed_dir)  # the other one's: kept
            os.kill(killed.process.pid, signal.SIGKILL)
            killed.process.wait(timeout=10)
            wait_until(lambda: not owner_locked(killed_dir), what="the killed master's workers gone")
            assert killed_dir.exists()  # nobody cleaned up
            with Gunicorn(env, workers=1, config=GUNICORN_CONF):
                assert not killed_dir.exists()
                assert running_dir.exists()
                assert foreign.exists()
        wait_until(lambda: not running_dir.exists(), what="a clean stop removing its own")


@pytest.mark.slow
def test_an_oversized_body_is_refused_without_being_read(redis_url):
    """The body is read before the app runs, but one announced over MAX_BODY_BYTES never is:
    413 at once, though the client has not sent a byte of it."""
    with (
        Gunicorn(
            {"REDIS_URL": redis_url, "MAX_BODY_BYTES": "40000"}, workers=1, config=GUNICORN_CONF
        ) as server,
        socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock,
    ):
        sock.sendall(
            b"POST /sms HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Content-Type: application/x-www-form-urlencoded\r\n"
            b"Content-Length: 40001\r\n\r\n"
        )
        assert sock.recv(64).startswith(b"HTTP/1.1 413 ")


@pytest.mark.slow
def test_whatever_a_handler_raises_fails_only_its_message(redis_url, redis_client, tmp_path):
    """KeyboardInterrupt, sys.exit(3)/(4), argparse's SystemExit, CancelledError and
    GeneratorExit from a handler are each that message's 500 (nothing saved, lock released),
    never the worker's or the master's end; an end hook's KeyboardInterrupt is a counted
    end-hook failure, and the sweeper goes on."""
    env = {
        "REDIS_URL": redis_url,
        "TMPDIR": str(tmp_path),
        "SMS_HANDLER": "tests.support.raising_handler:handle",
        "SWEEP_INTERVAL": "0.1",
    }
    with Gunicorn(env, workers=WORKERS, config=GUNICORN_CONF) as server:
        [metrics_dir] = tmp_path.glob("sms-sessions-metrics-*")
        twilio = TwilioSimulator(server.url, TOKEN, timeout=5)
        assert twilio.send(REY, OURS, "first").reply == "1 handled"
        raising = ["interrupt", "exit 3", "exit 4", "exit 0", "--oops", "cancelled", "generator"]
        for body in raising * 2:  # each worker meets each, whichever serves it
            assert twilio.send(REY, OURS, body).status == 500, body
            assert not redis_client.exists(Keys().conversation(REY, OURS).lock), body
        assert twilio.send(REY, OURS, "after").reply == "2 handled"
        for sender in (REY, FINN):  # two ends: the hook runs (and raises) twice
            assert twilio.send(sender, OURS, "bye").status == 200
            wait_until(
                lambda: not any(redis_client.exists(Keys().ending(s)) for s in Keys().shards()),
                what="the end hook run",
            )
        counted = scrape(requests.get(server.base + "/metrics", timeout=5).text)
        assert counted["sms_messages_received_total{outcome=error}"] == 2 * len(raising)
        assert counted["sms_end_hook_failures_total"] == 2
        assert metrics_dir.is_dir()
        output = server.output()
        assert server.process.poll() is None
        assert output.count("Booting worker") == WORKERS  # none died, none replaced
        assert "Worker exiting" not in output
        assert "Shutting down" not in output
        plain = [line for line in output.splitlines() if not line.startswith("{")]
        assert all(line.startswith(("usage: bot", "bot: error")) for line in plain), plain  # argparse's


def raw_request(server: Gunicorn, head: bytes) -> bytes:
    """The status line of the answer to ``head`` (a request without a body), sent as is."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        sock.sendall(head)
        return sock.makefile("rb").readline()


@pytest.mark.slow
def test_a_cookie_that_is_not_utf8_is_ignored_on_every_route(redis_url):
    """A Cookie header with a byte that is not UTF-8 reaches no 500: /healthz answers, an
    unsigned webhook is refused as unsigned, and nothing is logged as an error."""
    with Gunicorn({"REDIS_URL": redis_url}, workers=1, config=GUNICORN_CONF) as server:
        for path, status in ((b"/healthz", b"200"), (b"/sms?From=x", b"403")):
            for cookie in (b"sms_session=\xff", b"a=1; b=\xc3\x28"):
                head = b"GET " + path + b" HTTP/1.1\r\nHost: 127.0.0.1\r\nCookie: " + cookie + b"\r\n\r\n"
                assert raw_request(server, head).split()[1] == status, (path, cookie)
        counted = scrape(requests.get(server.base + "/metrics", timeout=5).text)
        assert counted.get("sms_messages_received_total{outcome=error}", 0) == 0
        assert counted["sms_messages_received_total{outcome=rejected_signature}"] == 2
        output = server.output()
        assert "Traceback" not in output
        assert '"level":"error"' not in output


@pytest.mark.slow
def test_the_request_line_is_bounded_above_twilios_longest_get(redis_url):
    """A GET webhook longer than Twilio's longest (~15 KB): 1,600 characters of 4 bytes, ~19 KB
    percent-encoded, is answered; a request line past MAX_BODY_BYTES plus room for the rest is
    refused as soon as that much has arrived, without waiting for its end, and the server
    answers the next."""
    from urllib.parse import urlencode

    from tests.support.app import sign, webhook_params

    with Gunicorn({"REDIS_URL": redis_url}, workers=1, config=GUNICORN_CONF) as server:
        query = urlencode(webhook_params(sender=REY, recipient=OURS, body="\U0001f600" * 1600))
        assert len(query) > 19_000
        url = f"{server.url}?{query}"
        answer = requests.get(url, headers={"X-Twilio-Signature": sign(url, {})}, timeout=5)
        assert answer.status_code == 200
        assert thanks("Rey") in answer.text

        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
            sock.sendall(b"GET /sms?Body=" + b"a" * (65536 + 8190 + 1024))  # no end of line yet
            assert sock.makefile("rb").readline().split()[1] == b"414"  # gunicorn's answer
        assert requests.get(server.base + "/healthz", timeout=5).status_code == 200


@pytest.mark.slow
def test_access_lines_mask_numbers_in_ops_paths_however_typed(redis_url):
    """``/ops/conversations/FROM/TO`` with numbers as an operator may type them: the access
    line masks them all the same."""
    with Gunicorn({"REDIS_URL": redis_url, "OPS_TOKEN": "x" * 32}, workers=1, config=GUNICORN_CONF) as server:
        for pair in ("+1 415 555 0123/(415)5550123", "%2B14155550123/+1-415-555-0123"):
            answer = requests.get(f"{server.base}/ops/conversations/{pair}", timeout=5)
            assert answer.status_code == 401
        wait_until(lambda: server.output().count('"gunicorn.access"') == 2, what="the access lines")
        output = server.output()
        assert "5550123" not in output
        assert "555 0123" not in output
        assert "555-0123" not in output
        assert "/ops/conversations/+1 41***0123/(415)***0123" in output
