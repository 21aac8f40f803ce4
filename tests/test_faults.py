"""Faults that must lose nothing: Redis stopped or stalled under load, a worker killed mid-message.

The app runs under gunicorn as in production; the Twilio side redelivers a message answered
503 with the same ``MessageSid`` (as Twilio does with ``#rc``), so a message is either answered
200 exactly once in the count, or not counted at all.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import redis
import requests

from service import settings
from service.keys import Keys
from service.simulator import TwilioSimulator, new_message_sid
from service.store import ConversationStore
from tests.support.app import TOKEN
from tests.support.app_servers import Gunicorn
from tests.support.numbers import OURS
from tests.support.redis_servers import REDIS_CONF
from tests.support.replies import count_reply
from tests.support.waiting import wait_until
from tests.test_webhook import count_in

pytestmark = pytest.mark.slow  # gunicorn under load while Redis fails

KEYS = Keys()


def deliver(
    twilio: TwilioSimulator,
    sender: str,
    statuses: list[int],
    message_sid: str | None = None,
    attempts: int = 120,
    pause: float = 0.25,
) -> int | None:
    """One message, redelivered on 503; its count, or None if every attempt got 503."""
    message_sid = message_sid or new_message_sid()
    for _ in range(attempts):
        delivery = twilio.send(sender, OURS, "load", message_sid=message_sid)
        statuses.append(delivery.status)
        if delivery.status == 200:
            return count_in(delivery.reply)
        time.sleep(pause)
    return None


def stored_count(client, sender: str) -> int:
    return int(client.hget(KEYS.conversation(sender, OURS).conversation, "seq") or 0)


def test_redis_stopped_mid_load_loses_no_message_answered_200(redis_processes):
    server = redis_processes(config=REDIS_CONF)
    senders = [f"+1555400{n:04d}" for n in range(6)]
    counts: dict[str, list[int]] = {s: [] for s in senders}
    statuses: list[int] = []
    stop = threading.Event()

    def load(sender):
        twilio = TwilioSimulator(gunicorn.url, TOKEN, timeout=15)  # a hung worker fails here
        while not stop.is_set():
            count = deliver(twilio, sender, statuses)
            assert count is not None, "a message got 503 for 30 s"
            counts[sender].append(count)

    with (
        Gunicorn({"REDIS_URL": server.url}, workers=2) as gunicorn,
        ThreadPoolExecutor(len(senders)) as pool,
    ):
        running = [pool.submit(load, s) for s in senders]
        wait_until(lambda: statuses.count(200) >= 30, what="load under way")
        server.shutdown()
        wait_until(lambda: 503 in statuses, what="503 while Redis is down")
        time.sleep(0.5)  # a real outage, not a blip
        server.start()
        after = len(statuses)
        # Once Redis answers again, so does the service, at the first try (each worker's
        # dead pooled connection is replaced transparently): the "within 2 s".
        probe = TwilioSimulator(gunicorn.url, TOKEN, timeout=15)
        assert [probe.send("+15554009999", OURS, "probe").status for _ in range(4)] == [200] * 4
        wait_until(lambda: 200 in statuses[after:], what="200 again after Redis returned")
        wait_until(lambda: statuses[after:].count(200) >= 30, what="load after the restart")
        stop.set()
        for future in running:
            future.result()
    assert set(statuses) == {200, 503}
    for sender in senders:
        assert counts[sender] == list(range(1, len(counts[sender]) + 1))
    server.shutdown()  # clean stop: the AOF is fsynced
    server.start()
    client = server.client()
    assert {s: stored_count(client, s) for s in senders} == {s: len(counts[s]) for s in senders}
    assert sum(len(c) for c in counts.values()) == statuses.count(200)


def test_stalled_redis_answers_503_and_workers_stay_free(redis_url, redis_client):
    sender = "+15554100001"
    with Gunicorn({"REDIS_URL": redis_url, "REDIS_TIMEOUT": "0.2", "LOCK_TTL": "1"}, workers=2) as gunicorn:
        twilio = TwilioSimulator(gunicorn.url, TOKEN)
        assert twilio.send(sender, OURS, "before").status == 200
        redis_client.execute_command("CLIENT", "PAUSE", "4000", "ALL")
        with ThreadPoolExecutor(4) as pool:
            stalled = list(pool.map(lambda _: twilio.send(sender, OURS, "stalled").status, range(4)))
        health = requests.get(gunicorn.url.replace("/sms", "/healthz"), timeout=5)
        still_paused = twilio.send(sender, OURS, "still stalled").status
        statuses: list[int] = []
        after = deliver(twilio, sender, statuses)
    assert stalled == [503] * 4
    assert health.status_code == 200  # answered while Redis was still paused
    assert still_paused == 503
    assert after == 2
    assert stored_count(redis_client, sender) == 2


class FreezingProxy:
    """A TCP proxy in front of Redis that can hold back the SAVE script of one message, or
    lose SAVE's replies.

    With ``freeze_save`` set, the first ``EVALSHA <save sha>`` is never forwarded: the worker
    sits between its two round trips, holding the conversation's lock, ready to be killed.
    With ``lose_save_replies`` at n, the next n ``EVALSHA <save sha>`` are forwarded, so Redis
    runs them, but their replies are dropped: the connection is then cut (``cut_on_loss``) or
    left silent until the client's read times out.
    """

    def __init__(self, upstream_port: int, env: dict[str, str]):
        self.upstream_port = upstream_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        store = ConversationStore.from_config(redis.Redis(), settings.load(env))  # the app's scripts
        self.save_sha = store._save.sha.encode()
        self.freeze_save = threading.Event()
        self.frozen = threading.Event()
        self.lose_save_replies = 0
        self.cut_on_loss = True
        self.lost_replies = 0
        self.losing: set[socket.socket] = set()  # upstream connections whose next reply is dropped
        self.sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            self.sockets += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, False), daemon=True).start()

    def _pump(self, source, target, to_redis):
        try:
            while data := source.recv(65536):
                if to_redis and self.freeze_save.is_set() and self.save_sha in data:
                    self.freeze_save.clear()
                    self.frozen.set()
                    continue
                if to_redis and self.lose_save_replies and self.save_sha in data:
                    self.lose_save_replies -= 1
                    self.losing.add(target)
                elif not to_redis and source in self.losing:
                    self.losing.discard(source)
                    self.lost_replies += 1
                    if self.cut_on_loss:
                        break  # both ends shut below
                    continue
                target.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, target):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self):
        for sock in (self.listener, *self.sockets):
            sock.close()


def gunicorn_workers(master_pid: int) -> list[int]:
    workers = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == master_pid:
            workers.append(int(stat.parent.name))
    return workers


def test_worker_killed_holding_the_lock_lapses_and_counting_continues(redis_server, redis_client):
    sender = "+15554200002"
    env = {
        "REDIS_TIMEOUT": "4",
        "LOCK_TTL": "4",
        "LOCK_WAIT": "0.2",
    }  # the lock outlives the kill
    proxy = FreezingProxy(redis_server.port, env)
    env["REDIS_URL"] = f"redis://127.0.0.1:{proxy.port}/0"
    statuses: list[int] = []
    try:
        with Gunicorn(env, workers=1) as gunicorn:
            twilio = TwilioSimulator(gunicorn.url, TOKEN, timeout=60)
            counts = [deliver(twilio, sender, statuses) for _ in range(3)]
            proxy.freeze_save.set()
            killed_sid = new_message_sid()
            doomed = threading.Thread(target=lambda: _swallow(twilio, sender, killed_sid))
            doomed.start()
            wait_until(proxy.frozen.is_set, what="SAVE held back")
            [worker] = gunicorn_workers(gunicorn.process.pid)
            os.kill(worker, signal.SIGKILL)
            doomed.join(timeout=60)
            lock = KEYS.conversation(sender, OURS).lock
            assert redis_client.pttl(lock) > 0  # the dead worker's lock is still there
            wait_until(
                lambda: gunicorn_workers(gunicorn.process.pid) not in ([], [worker]),
                what="gunicorn replaced the worker",
            )
            counts += [deliver(twilio, sender, statuses) for _ in range(3)]
            counts.append(deliver(twilio, sender, statuses, message_sid=killed_sid))  # Twilio retries it
    finally:
        proxy.close()
    assert counts == list(range(1, 8))  # the killed message counted once, when answered 200
    assert statuses.count(200) == 7
    assert set(statuses) <= {200, 503}
    assert stored_count(redis_client, sender) == 7


@pytest.mark.parametrize("cut", [True, False], ids=["connection-cut", "read-timeout"])
def test_a_save_whose_reply_is_lost_is_counted_once(redis_server, redis_client, cut):
    """docs/deploying.md: Redis applied the save but its reply never came back; the message is
    counted although answered 503, and Twilio's redelivery of its MessageSid gets the stored
    reply without counting it again. A cut connection is retried once by redis-py on a fresh
    one (that SAVE finds the message saved): its reply is lost too."""
    sender = "+15554300003"
    env = {"REDIS_TIMEOUT": "0.5"}
    proxy = FreezingProxy(redis_server.port, env)
    proxy.cut_on_loss = cut
    env["REDIS_URL"] = f"redis://127.0.0.1:{proxy.port}/0"
    try:
        with Gunicorn(env, workers=1) as gunicorn:
            twilio = TwilioSimulator(gunicorn.url, TOKEN, timeout=30)
            answers: list[requests.Response] = []
            twilio.http.hooks["response"].append(lambda response, *args, **kwargs: answers.append(response))
            assert twilio.send(sender, OURS, "one").status == 200
            proxy.lose_save_replies = 2 if cut else 1
            message_sid = new_message_sid()
            lost = twilio.send(sender, OURS, "two", message_sid=message_sid)
            assert (lost.status, answers[-1].headers.get("Retry-After")) == (503, "1")
            assert proxy.lost_replies == (2 if cut else 1)
            assert proxy.lose_save_replies == 0
            assert stored_count(redis_client, sender) == 2  # counted although answered 503
            stored = redis_client.hget(KEYS.conversation(sender, OURS).conversation, f"m:{message_sid}")
            again = twilio.send(sender, OURS, "two", message_sid=message_sid)
            assert (again.status, again.reply) == (200, count_reply("Friend", 2))
            assert stored is not None
            assert stored.endswith(again.reply)  # the answer SAVE stored
            assert stored_count(redis_client, sender) == 2  # not counted twice
    finally:
        proxy.close()


def _swallow(twilio, sender, message_sid):
    """The request whose worker is killed: its connection just drops."""
    try:
        twilio.send(sender, OURS, "doomed", message_sid=message_sid)
    except requests.RequestException:
        pass
