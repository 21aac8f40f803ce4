"""The worker model the repository ships (config/gunicorn.conf.py: gevent) against what
production meets with no proxy in front: many stalled and idle connections, slow handlers.

A good signed client must keep getting its answers meanwhile. Its requests have generous
bounded timeouts that only a blocked service would exceed; how fast it is answered is the
benchmark's to say (bench/stalls.py), never asserted here."""

from __future__ import annotations

import socket
import threading
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import requests

from service.keys import Keys
from service.simulator import TwilioSimulator
from tests.support.app import TOKEN
from tests.support.app_servers import GUNICORN_CONF, Gunicorn
from tests.support.numbers import OURS, crowd
from tests.support.prometheus import scrape
from tests.support.replies import count_reply, thanks
from tests.support.waiting import wait_until

WORKERS = 2
STALLED_PER_WORKER = 100
IDLE = 500
ANSWER_WITHIN = 10  # seconds a good request may take before the test calls the service blocked


def connect(server: Gunicorn) -> socket.socket:
    return socket.create_connection(("127.0.0.1", server.port), timeout=ANSWER_WITHIN)


def unfinished_headers(server: Gunicorn) -> socket.socket:
    sock = connect(server)
    sock.sendall(b"POST /sms HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/x-www")
    return sock


def unfinished_body(server: Gunicorn) -> socket.socket:
    sock = connect(server)
    sock.sendall(
        b"POST /sms HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/x-www-form-urlencoded\r\n"
        b"Content-Length: 1000\r\nX-Twilio-Signature: x\r\n\r\nFrom=%2B1555123"
    )
    return sock


def idle(server: Gunicorn) -> socket.socket:
    return connect(server)


def still_open(sock: socket.socket) -> bool:
    """Nothing came back and the server has not closed it."""
    sock.setblocking(False)
    try:
        return not sock.recv(1)  # b"": closed
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        sock.setblocking(True)


def good_client_answered(server: Gunicorn, sender: str, messages: int) -> list[str]:
    twilio = TwilioSimulator(server.url, TOKEN, timeout=ANSWER_WITHIN)
    return [twilio.send(sender, OURS, f"message {n}").reply for n in range(1, messages + 1)]


@pytest.mark.slow
@pytest.mark.parametrize(
    "attack, count",
    [
        (unfinished_headers, STALLED_PER_WORKER * WORKERS),
        (unfinished_body, STALLED_PER_WORKER * WORKERS),
        (idle, IDLE),
    ],
    ids=["unfinished-headers", "unfinished-bodies", "idle"],
)
def test_stalled_and_idle_connections_leave_the_service_answering(redis_url, redis_client, attack, count):
    """100 connections per worker with unfinished headers, or with unfinished bodies, or 500
    idle ones, held open (CLIENT_TIMEOUT at its longest): a good signed client's messages are
    all answered and counted exactly meanwhile, and no worker is replaced."""
    [sender] = crowd(1)
    env = {"REDIS_URL": redis_url, "CLIENT_TIMEOUT": "9"}
    with Gunicorn(env, workers=WORKERS, config=GUNICORN_CONF) as server:
        held = [attack(server) for _ in range(count)]
        try:
            replies = good_client_answered(server, sender, 10)
            assert replies == [thanks("Friend"), *(count_reply("Friend", n) for n in range(2, 11))]
            assert sum(still_open(sock) for sock in held) == count  # held all along
        finally:
            for sock in held:
                sock.close()
        assert redis_client.hget(Keys().conversation(sender, OURS).conversation, "seq") == "10"
        counted = scrape(requests.get(server.base + "/metrics", timeout=5).text)
        assert counted["sms_messages_received_total{outcome=replied}"] == 10
        output = server.output()
        assert output.count("Booting worker") == WORKERS
        assert "MonkeyPatchWarning" not in output  # gevent patched before ssl was imported
        assert "Traceback" not in output


def closed_after(sock: socket.socket, received: bytearray) -> bool:
    """Whether the server has closed ``sock``; what it sent so far goes to ``received``."""
    sock.setblocking(False)
    try:
        while chunk := sock.recv(4096):
            received += chunk
    except BlockingIOError:
        return False
    except OSError:
        pass
    finally:
        sock.setblocking(True)
    return True


@pytest.mark.slow
def test_stalled_and_idle_connections_are_closed_after_client_timeout(redis_url):
    """CLIENT_TIMEOUT bounds a request's headers, its body (408), and an idle connection, each
    from a few per worker; a client sending a byte of its body now and then is cut off too."""
    with Gunicorn(
        {"REDIS_URL": redis_url, "CLIENT_TIMEOUT": "1"}, workers=WORKERS, config=GUNICORN_CONF
    ) as server:
        headers = [unfinished_headers(server) for _ in range(4)]
        bodies = [unfinished_body(server) for _ in range(4)]
        idles = [idle(server) for _ in range(4)]
        dribbling = unfinished_body(server)
        stop = threading.Event()

        def dribble():
            while not stop.wait(0.2):
                try:
                    dribbling.sendall(b"1")
                except OSError:
                    return

        threading.Thread(target=dribble, daemon=True).start()
        everyone = [*headers, *bodies, *idles, dribbling]
        received = [bytearray() for _ in everyone]
        closed: set[int] = set()
        try:

            def all_closed():
                for number, sock in enumerate(everyone):
                    if number not in closed and closed_after(sock, received[number]):
                        closed.add(number)
                return len(closed) == len(everyone)

            wait_until(all_closed, seconds=30, what="every stalled connection closed by the server")
        finally:
            stop.set()
            for sock in everyone:
                sock.close()
        answers = [bytes(answer) for answer in received]
        assert [answers[n] for n in range(len(headers))] == [b""] * len(headers)
        for number in range(len(headers), len(headers) + len(bodies)):
            assert answers[number].startswith(b"HTTP/1.1 408 "), answers[number]
        assert [answers[n] for n in range(8, 12)] == [b""] * len(idles)
        assert answers[len(everyone) - 1].startswith(b"HTTP/1.1 408 ")
        assert "Traceback" not in server.output()


class SlowService:
    """A local HTTP service that holds every request until ``release()``: the booking API or
    language model a slow handler waits on."""

    def __init__(self):
        self.released = threading.Event()
        self.arrived = 0
        self.lock = threading.Lock()
        outer = self

        class Hold(BaseHTTPRequestHandler):
            def do_GET(self):
                with outer.lock:
                    outer.arrived += 1
                outer.released.wait(60)
                self.send_response(200)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Hold)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_port}/answer"
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()

    def release(self):
        self.released.set()

    def close(self):
        self.released.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.mark.slow
def test_slow_handlers_do_not_delay_other_conversations(redis_url, redis_client):
    """Eight conversations whose handler waits on a slow service (through requests) at once:
    while all eight wait, other conversations' messages are answered and counted; then the
    eight are answered too, each counted once."""
    slow = SlowService()
    env = {
        "REDIS_URL": redis_url,
        "SMS_HANDLER": "tests.support.slow_handler:handle",
        "SLOW_SERVICE_URL": slow.url,
        "LOCK_TTL": "60",  # the lock outlives the wait (how long a handler may take is not this test's)
    }
    waiting, others = crowd(8), crowd(4, start=100)
    try:
        with (
            Gunicorn(env, workers=WORKERS, config=GUNICORN_CONF) as server,
            ThreadPoolExecutor(len(waiting)) as pool,
        ):
            held = [
                pool.submit(TwilioSimulator(server.url, TOKEN, timeout=60).send, sender, OURS, "wait for it")
                for sender in waiting
            ]
            wait_until(lambda: slow.arrived == len(waiting), what="all eight handlers waiting at once")
            for sender in others:
                assert good_client_answered(server, sender, 4) == [f"{n} handled" for n in (1, 2, 3, 4)]
            assert slow.arrived == len(waiting)
            assert not any(future.done() for future in held)  # the eight still wait
            slow.release()
            assert [future.result().reply for future in held] == ["waited, 1 handled"] * len(waiting)
        for sender in waiting:
            assert redis_client.hget(Keys().conversation(sender, OURS).conversation, "seq") == "1"
        for sender in others:
            assert redis_client.hget(Keys().conversation(sender, OURS).conversation, "seq") == "4"
        assert "MonkeyPatchWarning" not in server.output()
    finally:
        slow.close()
