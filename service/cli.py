"""``sms-sessions``: the Flask CLI over ``create_app`` plus the Twilio simulator.

``sms-sessions run`` serves the app like ``flask run``; commands that need the app register
themselves on ``app.cli`` in their module's ``init_app``.
"""

from __future__ import annotations

import logging
import os
import sys

import click
import requests
from flask.cli import FlaskGroup, ScriptInfo, run_command

from . import create_app
from .handler import load
from .lifecycle import start_sweeper
from .settings import ConfigError
from .simulator import TwilioSimulator

cli = FlaskGroup(create_app=create_app, help="SMS conversations: serve, simulate and operate.")


def _serve(**options):
    """Flask's development server, with the lifecycle sweeper running beside it."""
    context = click.get_current_context()
    start_sweeper(context.ensure_object(ScriptInfo).load_app())
    context.invoke(run_command, **options)


cli.add_command(click.Command("run", params=run_command.params, callback=_serve,
                              help="Serve the webhook with Flask's development server (and sweep)."))


@cli.command("simulate", with_appcontext=False)
@click.option("--from", "sender", required=True, help="The texting phone number (Twilio's From).")
@click.option("--to", "recipient", required=True, help="Our Twilio number (Twilio's To).")
@click.option("--url", default="http://127.0.0.1:5000/sms", show_default=True,
              help="The webhook URL, exactly as Twilio would call it (it is signed).")
@click.option("--auth-token", envvar="TWILIO_AUTH_TOKEN", show_envvar=True,
              help="Token to sign with; without one requests go unsigned.")
@click.option("--message", help="Send this text instead of reading lines from the terminal.")
@click.option("--repeat", default=1, show_default=True, type=click.IntRange(min=1),
              help="With --message: how many times to send it.")
@click.option("--handler", "handler_spec", metavar="MODULE:FUNCTION",
              help="Run this handler in this process on the embedded store instead of calling --url.")
def simulate(sender, recipient, url, auth_token, message, repeat, handler_spec):
    """Hold a conversation with the webhook as Twilio would (signed, per-pair cookie)."""
    twilio = _in_process(handler_spec) if handler_spec else TwilioSimulator(url, auth_token)
    lines = [message] * repeat if message is not None else _typed_lines(sender, recipient)
    failed = False
    for line in lines:
        try:
            delivery = twilio.send(sender, recipient, line)
        except requests.RequestException as error:
            raise click.ClickException(f"no answer from {url}: {type(error).__name__} "
                                       "(is the service running? `make run`)") from None
        if delivery.status == 200:
            click.echo(delivery.reply if delivery.reply is not None else "(no reply)")
        else:
            failed = True
            click.echo(f"HTTP {delivery.status}: {delivery.body.strip()}", err=True)
    sys.exit(1 if failed else 0)


def _in_process(spec: str) -> TwilioSimulator:
    """The service with ``spec`` as its handler, in this process on the embedded store; only
    warnings and errors are logged (a failing handler's traceback among them)."""
    app = create_app({"REDIS_URL": None, "TWILIO_AUTH_TOKEN": "simulated"}, handler=load(spec))
    logging.getLogger().setLevel(logging.WARNING)
    return TwilioSimulator.for_app(app)


def _typed_lines(sender, recipient):
    if sys.stdin.isatty():
        click.echo(f"Texting from {sender} to {recipient}. Type a message, Ctrl-D to stop.")
    for line in sys.stdin:
        yield line.rstrip("\n")


def main() -> None:
    os.environ.setdefault("FLASK_APP", "service:create_app")
    try:
        cli(prog_name="sms-sessions")
    except ConfigError as error:  # one line naming the variable, not a traceback
        click.echo(f"sms-sessions: refusing to start: {error}", err=True)
        sys.exit(1)
