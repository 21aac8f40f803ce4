"""``sms-sessions``: serve (production or development), play Twilio, operate live conversations.

A click group of its own (not Flask's ``flask`` command): its own ``--version`` and only its
own commands. ``run`` is Flask's development server; the app is built only by the commands
that need it, so ``--help`` and ``simulate`` never touch settings or Redis.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
from importlib.metadata import version
from pathlib import Path

import click
import requests
from flask import Flask
from flask.cli import ScriptInfo, run_command

from . import create_app, logs, redis_client, settings
from .handler import load
from .lifecycle import events_command, start_sweeper, sweep_command
from .ops import (
    conversations_cli,
    forget_command,
    handoff_cli,
    outbox_command,
    timers_command,
    transcript_command,
)
from .sender import sender_command, start_sender
from .sending import send_command
from .settings import ConfigError
from .simulator import Phone, Reply, TwilioSimulator
from .twilio_standin import DEV_ACCOUNT_SID, serve_in_background
from .wiring import current

OPERATORS = tuple(
    command.name
    for command in (
        conversations_cli,
        outbox_command,
        events_command,
        send_command,
        transcript_command,
        forget_command,
        handoff_cli,
        timers_command,
    )
)


@click.group(help="SMS conversations: serve, simulate and operate.")
@click.version_option(version("sms-sessions"), prog_name="sms-sessions", message="%(prog)s %(version)s")
@click.pass_context
def cli(ctx: click.Context) -> None:
    ctx.obj = ScriptInfo(create_app=create_app, set_debug_flag=False)
    if ctx.invoked_subcommand in OPERATORS:  # their output only: no start-up warnings, no info lines
        ctx.with_resource(logs.quiet())


def _serve(**options):
    """Flask's development server, with the lifecycle sweeper running beside it; first the
    settings are checked and Redis asked (one line if either is wrong), then the banner says
    what serves."""
    context = click.get_current_context()
    standin = _standin(options.pop("twilio_standin"), options["host"], options["port"])
    app = context.ensure_object(ScriptInfo).load_app()
    if app.config["REDIS_URL"]:
        try:
            current(app).redis.ping()
        except redis_client.UNAVAILABLE as error:
            raise ConfigError(
                f"REDIS_URL={masked_url(app.config['REDIS_URL'])}: cannot reach Redis "
                f"({type(error).__name__}); start it, or unset REDIS_URL for the embedded store"
            ) from None
    click.echo(banner(app, options["host"], options["port"], standin))
    start_sweeper(app)
    start_sender(app)
    context.invoke(run_command, **options)


# The Makefile's DEV_TOKEN: `make run`'s token, shown in the banner; any other is not printed.
DEV_TOKEN = "dev-auth-token"
DEV_NUMBER = "+15550001111"  # our number in development: the simulator's default --to


def _standin(port: int | None, host: str, serving_port: int) -> str | None:
    """With ``--twilio-standin PORT``: the Twilio stand-in in this process, and the service
    pointed at it through the environment the app loads from (the account, our number, and
    ``PUBLIC_BASE_URL`` so that its status callbacks come back, unless set); its URL."""
    if port is None:
        return None
    if os.environ.get("TWILIO_ACCOUNT_SID"):
        raise ConfigError("--twilio-standin: TWILIO_ACCOUNT_SID is set (a Twilio of your own); unset one")
    token = os.environ.get("TWILIO_AUTH_TOKEN") or DEV_TOKEN
    try:
        base = serve_in_background("127.0.0.1", port, token)
    except OSError:
        raise ConfigError(
            f"--twilio-standin {port}: the port is in use; choose another (make run STANDIN_PORT=8766)"
        ) from None
    os.environ.update(TWILIO_ACCOUNT_SID=DEV_ACCOUNT_SID, TWILIO_AUTH_TOKEN=token, TWILIO_API_BASE_URL=base)
    os.environ.setdefault("TWILIO_FROM_NUMBER", DEV_NUMBER)
    os.environ.setdefault("PUBLIC_BASE_URL", f"http://{host}:{serving_port}")
    return base


def banner(app: Flask, host: str, port: int, standin: str | None = None) -> str:
    """What ``run`` serves and how to talk to it: the store, the handler, the console, where
    outbound messages go."""
    base = f"http://{host}:{port}"
    config = app.config
    store = (
        f"Redis at {masked_url(config['REDIS_URL'])}"
        if config["REDIS_URL"]
        else "the embedded in-memory store (lost on exit; set REDIS_URL for Redis)"
    )
    console = (
        f"{base}/console/ (sign in with OPS_TOKEN)"
        if config["OPS_TOKEN"]
        else "off (set OPS_TOKEN to turn it on)"
    )
    handle = current(app).handler
    token = config["TWILIO_AUTH_TOKEN"]
    shown = token if token == DEV_TOKEN else "<this service's TWILIO_AUTH_TOKEN>"
    program = os.path.relpath(Path(sys.executable).parent / "sms-sessions")
    if standin:
        twilio = f"the local Twilio stand-in at {standin} (its inbox: {standin}/_standin/messages)"
    elif config["TWILIO_ACCOUNT_SID"]:
        twilio = f"Twilio's REST API, account {config['TWILIO_ACCOUNT_SID'][:6]}…"
    else:
        twilio = "nowhere: they wait (set TWILIO_ACCOUNT_SID, or use make run's stand-in)"
    return "\n".join(
        [
            f"Serving the webhook on {base}/sms",
            f"  handler: {handle.__module__}:{handle.__qualname__}",
            f"  store:   {store}",
            f"  console: {console}",
            f"  sending: {twilio}",
            "Talk to it from another terminal:",
            f"  TWILIO_AUTH_TOKEN={shown} {program} simulate --from +15551230001 "
            f"--to {DEV_NUMBER} --url {base}/sms" + (f" --standin {standin}" if standin else ""),
        ]
    )


def masked_url(url: str) -> str:
    """``url`` without its password (``redis://:***@host:6379/0``)."""
    scheme, separator, rest = url.partition("://")
    credentials, at, hosts = rest.rpartition("@")
    if not at:
        return url
    user, colon, _ = credentials.partition(":")
    return f"{scheme}{separator}{user}{':' if colon else ''}***@{hosts}"


cli.add_command(
    click.Command(
        "run",
        params=[
            *run_command.params,
            click.Option(
                ["--twilio-standin"],
                type=click.IntRange(0, 65535),
                metavar="PORT",
                help="Start the local Twilio stand-in on this port (0: any free one) and send "
                "through it; make run does when TWILIO_ACCOUNT_SID is not set.",
            ),
        ],
        callback=_serve,
        help="Serve the webhook with Flask's development server (and sweep, and send).",
    )
)


for command in (
    conversations_cli,
    outbox_command,
    events_command,
    sweep_command,
    sender_command,
    send_command,
    transcript_command,
    forget_command,
    handoff_cli,
    timers_command,
):
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
    "--standin",
    metavar="URL",
    help="The Twilio stand-in the service sends through (`make run` prints it): print the "
    "messages it delivers to --from, as they arrive.",
)
@click.option(
    "--linger",
    default=2.0,
    show_default=True,
    type=click.FloatRange(0, 60),
    help="With --standin and --message: seconds to wait for messages after the last reply.",
)
@click.option(
    "--handler",
    "handler_spec",
    metavar="MODULE:FUNCTION",
    help="Run this handler in this process on the embedded store instead of calling --url.",
)
def simulate(sender, recipient, url, auth_token, message, repeat, media, standin, linger, handler_spec):
    """Hold a conversation with the webhook as Twilio would (signed, per-pair cookie)."""
    twilio = _in_process(handler_spec) if handler_spec else TwilioSimulator(url, auth_token)
    lines = [message] * repeat if message is not None else _typed_lines(sender, recipient)
    screen = threading.Lock()  # one message printed at a time: a reply, or what the phone got
    try:
        listener = _Listener(Phone(standin, sender, recipient), screen) if standin else None
    except requests.RequestException as error:
        raise click.ClickException(
            f"no Twilio stand-in at {standin}: {type(error).__name__} (`make run` prints its URL)"
        ) from None
    failed = False
    shown: set[str] = set()
    try:
        for line in lines:
            with screen:  # what this message brings is printed after its reply
                try:
                    delivery = twilio.send(sender, recipient, line, media=list(media))
                except requests.RequestException as error:
                    raise click.ClickException(
                        f"no answer from {url}: {type(error).__name__} (is the service running? `make run`)"
                    ) from None
                if delivery.status == 200:
                    _print(delivery.replies, "")
                    if not delivery.replies:
                        click.echo("(no reply)")
                    if twilio.app is not None:  # in process: what the handler sent, also past the webhook
                        for later in _sent_later(twilio.app, sender, recipient, shown):
                            click.echo(f"[later] {later}")
                else:
                    failed = True
                    hint = HINTS.get(delivery.status, "")
                    click.echo(f"HTTP {delivery.status}: {delivery.body.strip()}{hint}", err=True)
        if listener and message is not None:
            time.sleep(linger)
    finally:
        if listener:
            listener.stop()
    sys.exit(1 if failed else 0)


def _print(replies: list[Reply], prefix: str) -> None:
    for reply in replies:
        click.echo(prefix + reply.text)
        for address in reply.media:
            click.echo(f"{prefix}[media] {address}")


class _Listener:
    """Prints what the simulated phone receives from the service's outbound messages
    (``[outbound] …``), polling the stand-in's inbox in a thread, between the replies."""

    EVERY = 0.25  # seconds between polls

    def __init__(self, phone: Phone, screen: threading.Lock):
        self.phone, self.screen = phone, screen
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, name="simulate-phone", daemon=True)
        self.thread.start()

    def _poll(self) -> None:
        try:
            news = self.phone.news()
        except requests.RequestException as error:
            news = []
            click.echo(f"(the stand-in did not answer: {type(error).__name__})", err=True)
        with self.screen:
            _print(news, "[outbound] ")

    def _run(self) -> None:
        while not self.stopping.wait(self.EVERY):
            self._poll()

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join()
        self._poll()  # the last ones


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


def _sent_later(app: Flask, sender: str, recipient: str, shown: set[str]) -> list[str]:
    """In process, where nothing delivers outbound messages: once the conversation's handler
    runs are done (a slow one's reply comes after the webhook's empty answer), the texts of its
    outbound messages not shown yet, in commit order (and ``[media] URL`` lines)."""
    wired = current(app)
    keys = wired.keys.conversation(sender, recipient)
    deadline = time.monotonic() + app.config["HANDLER_TIMEOUT"] + 5
    while (wired.redis.exists(keys.inbound) or wired.redis.exists(keys.lock)) and time.monotonic() < deadline:
        time.sleep(0.05)
    texts = []
    for outbound_id in wired.redis.lrange(keys.outbound, 0, -1):
        stored = wired.redis.hget(keys.sent, outbound_id)
        if outbound_id in shown or stored is None:
            continue
        shown.add(outbound_id)
        queued = json.loads(stored)
        texts.append(queued.get("body") or "")
        texts += [f"[media] {address}" for address in queued.get("media") or ()]
    return texts


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
