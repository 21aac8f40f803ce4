"""``sms-sessions``: serve (production or development), play Twilio, operate live conversations.

A click group of its own (not Flask's ``flask`` command): its own ``--version`` and only its
own commands. ``run`` is Flask's development server; the app is built only by the commands
that need it, so ``--help`` and ``simulate`` never touch settings or Redis.
"""

from __future__ import annotations

import logging
import os
import sys
from importlib.metadata import version

import click
import requests
from flask.cli import ScriptInfo, run_command

from . import create_app, logs, settings
from .handler import load
from .lifecycle import events_command, start_sweeper, sweep_command
from .ops import conversations_cli
from .settings import ConfigError
from .simulator import TwilioSimulator

OPERATORS = (conversations_cli.name, events_command.name)


@click.group(help="SMS conversations: serve, simulate and operate.")
@click.version_option(version("sms-sessions"), prog_name="sms-sessions", message="%(prog)s %(version)s")
@click.pass_context
def cli(ctx: click.Context) -> None:
    ctx.obj = ScriptInfo(create_app=create_app, set_debug_flag=False)
    if ctx.invoked_subcommand in OPERATORS:  # their output only: no start-up warnings, no info lines
        ctx.with_resource(logs.quiet())


def _serve(**options):
    """Flask's development server, with the lifecycle sweeper running beside it."""
    context = click.get_current_context()
    start_sweeper(context.ensure_object(ScriptInfo).load_app())
    context.invoke(run_command, **options)


cli.add_command(
    click.Command(
        "run",
        params=run_command.params,
        callback=_serve,
        help="Serve the webhook with Flask's development server (and sweep).",
    )
)


for command in (conversations_cli, events_command, sweep_command):
    cli.add_command(command)


@cli.command("serve")
@click.option(
    "--config",
    default="config/gunicorn.conf.py",
    show_default=True,
    type=click.Path(exists=True, dir_okay=False),
    help="gunicorn's configuration file.",
)
def serve(config):
    """Serve in production: gunicorn with its configuration (what the image runs).

    The settings are read first, so a bad one is one line: gunicorn itself would stop with a
    traceback on a malformed WEB_CONCURRENCY, which it reads when imported, before its
    configuration file checks everything else.
    """
    settings.load()
    os.execv(sys.executable, [sys.executable, "-m", "gunicorn", "-c", config, "service:create_app()"])


@cli.command("simulate")
@click.option("--from", "sender", required=True, help="The texting phone number (Twilio's From).")
@click.option("--to", "recipient", required=True, help="Our Twilio number (Twilio's To).")
@click.option(
    "--url",
    default="http://127.0.0.1:5000/sms",
    show_default=True,
    help="The webhook URL, exactly as Twilio would call it (it is signed).",
)
@click.option(
    "--auth-token",
    envvar="TWILIO_AUTH_TOKEN",
    show_envvar=True,
    help="Token to sign with; without one requests go unsigned.",
)
@click.option("--message", help="Send this text instead of reading lines from the terminal.")
@click.option(
    "--repeat",
    default=1,
    show_default=True,
    type=click.IntRange(min=1),
    help="With --message: how many times to send it.",
)
@click.option(
    "--media",
    multiple=True,
    metavar="URL",
    help="Attach this media URL to each message (repeat for several, Twilio takes 10).",
)
@click.option(
    "--handler",
    "handler_spec",
    metavar="MODULE:FUNCTION",
    help="Run this handler in this process on the embedded store instead of calling --url.",
)
def simulate(sender, recipient, url, auth_token, message, repeat, media, handler_spec):
    """Hold a conversation with the webhook as Twilio would (signed, per-pair cookie)."""
    twilio = _in_process(handler_spec) if handler_spec else TwilioSimulator(url, auth_token)
    lines = [message] * repeat if message is not None else _typed_lines(sender, recipient)
    failed = False
    for line in lines:
        try:
            delivery = twilio.send(sender, recipient, line, media=list(media))
        except requests.RequestException as error:
            raise click.ClickException(
                f"no answer from {url}: {type(error).__name__} (is the service running? `make run`)"
            ) from None
        if delivery.status == 200:
            for reply in delivery.replies:
                click.echo(reply.text)
                for address in reply.media:
                    click.echo(f"[media] {address}")
            if not delivery.replies:
                click.echo("(no reply)")
        else:
            failed = True
            hint = HINTS.get(delivery.status, "")
            click.echo(f"HTTP {delivery.status}: {delivery.body.strip()}{hint}", err=True)
    sys.exit(1 if failed else 0)


# What a refusal most likely means to someone trying the service.
HINTS = {
    403: " (sign with the service's TWILIO_AUTH_TOKEN, and --url exactly as the service is "
    "reached: `make run` prints both)",
    503: " (the service cannot reach Redis, or the conversation is busy: its /readyz says which)",
}


def _in_process(spec: str) -> TwilioSimulator:
    """The service with ``spec`` as its handler, in this process on the embedded store; only
    warnings and errors are logged, as readable lines (a failing handler's among them)."""
    config = {"REDIS_URL": None, "TWILIO_AUTH_TOKEN": "simulated", "LOG_FORMAT": "text"}
    app = create_app(config, handler=load(spec))
    logging.getLogger().setLevel(logging.WARNING)
    return TwilioSimulator.for_app(app)


def _typed_lines(sender, recipient):
    if sys.stdin.isatty():
        click.echo(f"Texting from {sender} to {recipient}. Type a message, Ctrl-D to stop.")
    for line in sys.stdin:
        if line.strip():  # an empty line is not a message
            yield line.rstrip("\n")


def main() -> None:
    try:
        cli(prog_name="sms-sessions")
    except ConfigError as error:  # one line naming the variable, not a traceback
        click.echo(f"sms-sessions: refusing to start: {error}", err=True)
        sys.exit(1)
