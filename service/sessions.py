"""Flask-Session's Redis backend, customised for conversations.

Differences from the stock ``RedisSessionInterface``, each for a reason in DESIGN.md:
- ``open_session`` touches no Redis: the cookie is only a hint, and a request is bound to its
  conversation (``bind``) by the webhook once its signature and its From/To are proven. Other
  routes never open a conversation.
- The conversation, not the cookie, finds the session: state lives under the (From, To) pair,
  so a stale, forged or other-pair cookie can neither split nor leak a conversation.
- State is JSON (``JsonSerializer``); nothing read from Redis reaches pickle.
- Load and save are the store's two atomic scripts, with the conversation locked in between;
  a Redis failure in ``save_session`` turns the response into a 503 instead of a 500.
"""

from __future__ import annotations

import json
import logging

import redis
from flask import Flask, Request, Response
from flask_session.base import Serializer, ServerSideSession
from flask_session.redis import RedisSessionInterface
from redis.cluster import RedisCluster

from .conversations import ConversationStore, LockLost, Opened
from .keys import ConversationKeys
from .logs import annotate, report
from .metrics import count_redis_error
from .responses import unavailable
from .redis_client import UNAVAILABLE, LazyCluster

log = logging.getLogger(__name__)


class JsonSerializer(Serializer):
    """Flask-Session's serializer slot, JSON only: its stock one falls back to pickle."""

    def encode(self, session: ServerSideSession) -> str:
        return json.dumps(dict(session), separators=(",", ":"))

    def decode(self, serialized_data: str) -> dict:
        state = json.loads(serialized_data)
        if not isinstance(state, dict):
            raise ValueError("session state is not a JSON object")
        return state


class ConversationSession(ServerSideSession):
    """``flask.session`` during a webhook: the conversation's state dict.

    ``reply`` is what the handler answered; it is stored with the ``MessageSid`` so that a
    redelivery gets it again.
    """

    def __init__(self, initial=None, sid=None):
        super().__init__(initial, sid=sid)
        self.keys: ConversationKeys | None = None
        self.opened: Opened | None = None
        self.fresh = False
        self.message_sid = ""
        self.reply: str | None = None


class ConversationSessionInterface(RedisSessionInterface):
    session_class = ConversationSession

    def __init__(self, app: Flask, client, store: ConversationStore):
        # Deliberately not RedisSessionInterface.__init__: it silently falls back to
        # localhost:6379 for a client it does not recognise. The client is ours, built by redis_client;
        # anything else stops start-up here rather than quietly talking to another Redis.
        if not isinstance(client, (redis.Redis, RedisCluster, LazyCluster)):
            raise TypeError(f"sessions need a redis.Redis or RedisCluster client, not {type(client).__name__}")
        super(RedisSessionInterface, self).__init__(app)
        self.serializer = JsonSerializer()
        self.client = client
        self.store = store
        self.ttl = app.config["CONVERSATION_TTL"]

    def open_session(self, app: Flask, request: Request) -> ConversationSession:
        return self.session_class(sid=request.cookies.get(self.get_cookie_name(app)))

    def bind(self, session: ConversationSession, keys: ConversationKeys, message_sid: str) -> str | None:
        """Round trip 1: lock the conversation and load it into ``session``.

        Returns the stored reply when ``message_sid`` was answered before (nothing is locked
        then), else None with the conversation held until ``save_session``.
        """
        opened = self.store.open(keys, message_sid)
        session.keys, session.opened, session.message_sid = keys, opened, message_sid
        if opened.duplicate_reply is not None:
            session.sid = opened.sid
            return opened.duplicate_reply
        state = self._decode(opened.state) if opened.state else None
        if opened.sid and state is not None:
            if session.sid and session.sid != opened.sid:
                annotate(cookie="not this conversation's; ignored")
            session.sid = opened.sid
            session.update(state)
        else:
            session.sid = self._generate_sid(self.sid_length)
            session.fresh = True
        session.modified = False
        return None

    def save_session(self, app: Flask, session: ConversationSession, response: Response) -> None:
        """Round trip 2 on a 200 answer; otherwise the lock is released unsaved."""
        if session.keys is None:
            return
        if session.opened.duplicate_reply is None:
            if response.status_code != 200 or session.reply is None:
                self._release(session)
                return
            try:
                self.store.save(session.keys, session.opened, session.sid, self.serializer.encode(session),
                                session.fresh, session.message_sid, session.reply)
            except (*UNAVAILABLE, LockLost) as error:
                if not isinstance(error, LockLost):
                    count_redis_error()
                report(log, f"could not save the conversation: {type(error).__name__}")
                unavailable(response)
                return
            if session.fresh:
                app.extensions["metrics"].conversations_started.inc()
        self._set_cookie(app, session, response)

    def _set_cookie(self, app: Flask, session: ConversationSession, response: Response) -> None:
        response.set_cookie(
            self.get_cookie_name(app),
            session.sid,
            max_age=self.ttl,
            httponly=True,
            secure=self.get_cookie_secure(app),
            samesite=self.get_cookie_samesite(app),
            domain=self.get_cookie_domain(app),
            path=self.get_cookie_path(app),
        )

    def _release(self, session: ConversationSession) -> None:
        try:
            self.store.release(session.keys, session.opened)
        except UNAVAILABLE as error:
            count_redis_error()
            report(log, f"could not release the lock (it lapses by itself): {type(error).__name__}")

    def _decode(self, raw: str) -> dict | None:
        """Undecodable state is reported and replaced by a fresh conversation."""
        try:
            return self.serializer.decode(raw)
        except ValueError:
            report(log, "stored state is not a JSON object; conversation started afresh")
            return None

