"""Baseline 2, the tutorial's approach: the counter in Flask's default signed-cookie session.

No server state at all; the cookie Twilio hands back is the whole conversation.
Run: ``gunicorn bench.cookie_app:app``.
"""

from __future__ import annotations

from flask import Flask

from bench.baseline import add_counter_webhook

app = Flask(__name__)
app.secret_key = "bench-cookie-secret"
add_counter_webhook(app)
