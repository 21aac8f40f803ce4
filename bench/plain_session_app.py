"""Baseline 3, bare: plain Flask-Session 0.8 on Redis with its default settings.

Whole-blob ``GET``/``SET session:<sid>`` per request (msgpack, 31-day sliding TTL), no locking.
Run: ``REDIS_URL=redis://… gunicorn bench.plain_session_app:app``.
"""

from __future__ import annotations

import os

import redis
from flask import Flask
from flask_session import Session

from bench.baseline import add_counter_webhook

app = Flask(__name__)
app.config.update(SESSION_TYPE="redis", SESSION_REDIS=redis.Redis.from_url(os.environ["REDIS_URL"]))
Session(app)
add_counter_webhook(app)
