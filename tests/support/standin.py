"""The Twilio stand-in on a real socket, and a receiver for the status callbacks it posts."""

from __future__ import annotations

import threading
from dataclasses import dataclass

import requests
from flask import Flask, request

from service.settings import load
from service.twilio_standin import create_standin

from .app_servers import LiveServer
from .numbers import OURS, REY

ACCOUNT_SID = "AC" + "1" * 32
AUTH_TOKEN = "standin-auth-token"
API_KEY = "SK" + "2" * 32
API_SECRET = "standin-api-secret"
OUR_NUMBER, PHONE = OURS, REY


class StandinServer(LiveServer):
    """The stand-in on a threaded werkzeug server on a free port (``base``), with a
    ``control`` session for its ``/_standin`` endpoints."""

    def __init__(self):
        self.app = create_standin(ACCOUNT_SID, AUTH_TOKEN, {API_KEY: API_SECRET})
        super().__init__(self.app)
        self.base = f"http://127.0.0.1:{self.server.server_port}"
        self.control = requests.Session()

    def __exit__(self, *exc):
        super().__exit__(*exc)
        self.state.close()

    @property
    def state(self):
        return self.app.extensions["twilio_standin"]

    def fault(self, **rule) -> dict:
        response = self.control.post(self.base + "/_standin/faults", json=rule, timeout=5)
        assert response.status_code == 201, response.text
        return response.json()

    def inbox(self, to: str | None = None) -> list[dict]:
        params = {"to": to} if to else {}
        return self.control.get(self.base + "/_standin/messages", params=params, timeout=5).json()

    def config(self, **overrides) -> dict:
        """The service's settings for sending through this stand-in (``overrides`` as
        environment variables)."""
        environment = {
            "TWILIO_ACCOUNT_SID": ACCOUNT_SID,
            "TWILIO_AUTH_TOKEN": AUTH_TOKEN,
            "TWILIO_FROM_NUMBER": OUR_NUMBER,
            "TWILIO_API_BASE_URL": self.base,
            **overrides,
        }
        return load({name: value for name, value in environment.items() if value is not None})


@dataclass
class Callback:
    url: str
    form: dict[str, str]
    signature: str | None


class CallbackReceiver(LiveServer):
    """Records every status callback posted to ``url`` (any path under it, any query)."""

    def __init__(self):
        self.received: list[Callback] = []
        self.lock = threading.Lock()
        app = Flask(__name__)

        @app.post("/status", defaults={"rest": ""})
        @app.post("/status/<path:rest>")
        def status(rest):
            with self.lock:
                self.received.append(
                    Callback(request.url, request.form.to_dict(), request.headers.get("X-Twilio-Signature"))
                )
            return "", 204

        super().__init__(app)
        self.url = f"http://127.0.0.1:{self.server.server_port}/status"

    def about(self, sid: str) -> list[Callback]:
        with self.lock:
            return [callback for callback in self.received if callback.form.get("MessageSid") == sid]
