"""Liveness: ``/healthz`` says the process serves requests; it never touches Redis."""

from flask import Blueprint, Flask

bp = Blueprint("health", __name__)


@bp.get("/healthz")
def healthz():
    return {"status": "ok"}


def init_app(app: Flask) -> None:
    app.register_blueprint(bp)
