"""The app on real sockets: in a thread of the test (``LiveServer``) or under gunicorn in a
subprocess (``Gunicorn``, also the benchmark's launcher for every contender)."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

from werkzeug.serving import make_server

from service.settings import SETTINGS

from . import ROOT
from .app import TOKEN
from .ports import free_port
from .waiting import wait_for_http

GUNICORN_CONF = "config/gunicorn.conf.py"
GUNICORN_APP = "service:create_app()"


class LiveServer:
    """The app on a threaded werkzeug server: real sockets, real concurrency."""

    def __init__(self, app):
        self.server = make_server("127.0.0.1", 0, app, threaded=True)
        self.url = f"http://127.0.0.1:{self.server.server_port}/sms"
        # Polled every 50 ms instead of 0.5 s: shutdown() waits for the next poll.
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.thread.join()


def bin_path(name: str) -> str:
    """A program this virtualenv installed (gunicorn, sms-sessions)."""
    return str(Path(sys.executable).parent / name)


def hermetic_environment() -> dict[str, str]:
    """This process's environment without any of the service's settings."""
    return {k: v for k, v in os.environ.items() if k not in {s.env for s in SETTINGS}}


def gunicorn_settings(env: dict[str, str]) -> dict[str, str]:
    """What gunicorn makes of config/gunicorn.conf.py under ``env`` (over this process's
    environment without the service's settings), as ``gunicorn --print-config`` prints it: in a
    process of its own, since the file may have gevent patch the standard library."""
    with tempfile.TemporaryDirectory() as metrics:
        printed = subprocess.run(
            [bin_path("gunicorn"), "--print-config", "-c", GUNICORN_CONF, GUNICORN_APP],
            cwd=ROOT,
            env={
                **hermetic_environment(),
                "TWILIO_AUTH_TOKEN": TOKEN,
                "PROMETHEUS_MULTIPROC_DIR": metrics,
                **env,
            },
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        ).stdout
    return {
        name.strip(): value.strip()
        for name, equals, value in (line.partition("=") for line in printed.splitlines())
        if equals
    }


class Gunicorn:
    """An app under gunicorn in a subprocess, the way it runs in production.

    With ``config`` the command is the Dockerfile's (``gunicorn -c CONFIG APP``) and workers
    and address come from the environment (``WEB_CONCURRENCY``, ``BIND``) as in the container;
    without, from flags. The environment is the caller's ``env`` over this process's without
    the service's settings, never the developer's settings. Output (stdout and stderr) goes to a
    file: ``output()`` reads it at any time. As a context manager it waits for ``/healthz``.
    """

    def __init__(
        self,
        env: dict[str, str],
        workers: int = 2,
        config: str | None = None,
        extra_args: tuple[str, ...] = (),
        app: str = GUNICORN_APP,
        root: Path = ROOT,
    ):
        """``root``: the source tree it serves (another commit's worktree, for a comparison)."""
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/sms"
        self.base = f"http://127.0.0.1:{self.port}"
        address = f"127.0.0.1:{self.port}"
        self.env = {**hermetic_environment(), "TWILIO_AUTH_TOKEN": TOKEN, **env}
        args = [bin_path("gunicorn")]
        if config:
            args += ["-c", config]
            self.env.setdefault("WEB_CONCURRENCY", str(workers))
            self.env["BIND"] = address
        else:
            args += ["-w", str(workers), "-b", address]
        self.launch([*args, *extra_args, app], prefix="gunicorn-", cwd=root)

    def launch(self, args: list[str], prefix: str, cwd: Path = ROOT) -> None:
        """Starts ``args`` in ``cwd`` (the project directory) with ``self.env``; output to a file
        that ``output()`` reads (it outlives this call: closed with the server)."""
        self.args = args
        self.log = tempfile.NamedTemporaryFile("w+", prefix=prefix, suffix=".log")  # noqa: SIM115
        self.process = subprocess.Popen(
            args,
            cwd=cwd,
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            text=True,
        )

    def cpu_seconds(self) -> float:
        """CPU seconds of the gunicorn master and the workers alive now, from /proc."""
        ticks = os.sysconf("SC_CLK_TCK")
        total = 0
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if self.process.pid in (int(entry.name), int(fields[1])):
                total += int(fields[11]) + int(fields[12])
        return total / ticks

    def output(self) -> str:
        return Path(self.log.name).read_text()

    def wait_exit(self, seconds: float = 30) -> int:
        """For a server expected to refuse to start: its exit code."""
        return self.process.wait(timeout=seconds)

    def wait_ready(self, seconds: float = 30) -> None:
        wait_for_http(self.base + "/healthz", self.process, seconds)

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def __enter__(self):
        try:
            self.wait_ready()
        except BaseException:
            self.stop()  # __exit__ will not run
            raise
        return self

    def __exit__(self, *exc):
        self.stop()


def sms_sessions(*args: str, stdin: str | None = None, **env: str) -> subprocess.CompletedProcess:
    """The installed console script in its own process; only the settings given here."""
    return subprocess.run(
        [bin_path("sms-sessions"), *args],
        env={**hermetic_environment(), **env},
        cwd=ROOT,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
    )
