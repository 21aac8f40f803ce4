"""gunicorn settings for sms-sessions: ``gunicorn -c config/gunicorn.conf.py 'service:create_app()'``.

Environment (``service/settings.py``): ``WEB_CONCURRENCY`` (workers), ``WORKER_CLASS``
(gevent, gthread or sync), ``CLIENT_TIMEOUT``, ``PORT`` / ``BIND`` (address),
``PROMETHEUS_MULTIPROC_DIR`` (where workers share metrics), ``LOG_FORMAT``.
``GUNICORN_CMD_ARGS`` still overrides anything here (gunicorn's own rule); choose the worker
class with ``WORKER_CLASS``, which also decides whether gevent patches the standard library.
"""

import os

# gevent's worker needs the standard library patched before anything imports socket, ssl or
# threading: this file imports the service (and with it redis, requests, prometheus-client)
# into the master, whose workers inherit it all, so the patch comes first, here (gunicorn's
# worker patches again at boot, which changes nothing then). An unknown WORKER_CLASS is
# refused below, unpatched.
if (os.environ.get("WORKER_CLASS") or "gevent") == "gevent":
    from gevent import monkey

    monkey.patch_all()

import fcntl  # noqa: E402
import multiprocessing  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

# Metrics across workers: prometheus-client's multiprocess mode needs a directory shared by
# the workers, set before anything imports prometheus_client (so before `service`). Made here
# when not given, in the temporary directory. The master holds a lock on it for its lifetime
# (a raw descriptor, released only once the master and its workers are gone), so that one left
# behind by an unclean exit (kill -9, a crash) is recognised at the next start and removed.
METRICS_PREFIX = "sms-sessions-metrics-"


def _remove_stale_metrics_dirs():
    for directory in Path(tempfile.gettempdir()).glob(METRICS_PREFIX + "*"):
        try:
            owner = os.open(directory / ".owner", os.O_RDONLY)
        except OSError:
            continue  # not made by this file, or being made right now
        try:
            fcntl.flock(owner, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            continue  # a running instance's
        finally:
            os.close(owner)
        shutil.rmtree(directory, ignore_errors=True)


if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
    _remove_stale_metrics_dirs()
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix=METRICS_PREFIX)
    fcntl.flock(
        os.open(Path(os.environ["PROMETHEUS_MULTIPROC_DIR"]) / ".owner", os.O_WRONLY | os.O_CREAT),
        fcntl.LOCK_EX | fcntl.LOCK_NB,
    )
# Ours also when this file is read again (gunicorn reloads it on SIGHUP) after setting it.
_made_metrics_dir = Path(os.environ["PROMETHEUS_MULTIPROC_DIR"]).name.startswith(METRICS_PREFIX)

from service import check_environment, serving  # noqa: E402  (after the metrics directory)
from service.settings import ConfigError, bind_address  # noqa: E402

# Every setting is checked once, here in the master, before gunicorn starts anything: a bad
# one is one line naming it, not a traceback from this file or one per worker.
try:
    _settings = check_environment()
except ConfigError as error:
    print(f"sms-sessions: refusing to start: {error}", file=sys.stderr, flush=True)
    if _made_metrics_dir:
        shutil.rmtree(os.environ["PROMETHEUS_MULTIPROC_DIR"], ignore_errors=True)
    sys.exit(1)


# service/serving.py says what each worker class does with stalled clients and slow handlers.
workers = _settings["WEB_CONCURRENCY"] or multiprocessing.cpu_count() * 2 + 1
worker_class = _settings["WORKER_CLASS"]
threads = serving.threads(worker_class, workers)
worker_connections = serving.WORKER_CONNECTIONS

# A request's line and headers (under gevent) and its body (every class) arrive within
# CLIENT_TIMEOUT, and a keep-alive connection idle that long is closed.
keepalive = _settings["CLIENT_TIMEOUT"]


# All interfaces inside a container; BIND (e.g. 127.0.0.1:8000) overrides the whole address.
bind = bind_address(_settings)

# Twilio gives up after 15 s. A request is bounded well below that (LOCK_WAIT 5 s plus short
# Redis timeouts); a worker whose main loop is silent for 10 s is stuck and gets replaced.
timeout = 10
graceful_timeout = 10

# A GET webhook carries the whole message in its query string (bounded by MAX_BODY_BYTES).
limit_request_line = serving.request_line_limit(_settings["MAX_BODY_BYTES"])

# gunicorn's own lines (errors on stderr, access on stdout) in the app's form (LOG_FORMAT):
# JSON objects with masked numbers, the path without its query, no line for health probes.
logger_class = "service.logs.GunicornLogger"
accesslog = "-"
errorlog = "-"

# gunicorn ≥ 25's control socket (for gunicornc) is unused here; its default path in $HOME
# would collide between two instances and needs a writable home the container user lacks.
control_socket_disable = True

# Worker heartbeats on tmpfs when there is one (a container's /tmp may be a slow overlay).
if os.path.isdir("/dev/shm"):
    worker_tmp_dir = "/dev/shm"


def on_starting(server):
    """A previous run's counts must not add up with ours (a directory that was given)."""
    metrics_dir = Path(os.environ["PROMETHEUS_MULTIPROC_DIR"])
    metrics_dir.mkdir(parents=True, exist_ok=True)
    for stale in metrics_dir.glob("*.db"):
        stale.unlink()


def post_worker_init(worker):
    serving.serve(worker, _settings)


def child_exit(server, worker):
    """prometheus-client's rule for multiprocess mode: a dead worker's live gauges go."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)


def on_exit(server):
    if _made_metrics_dir:
        shutil.rmtree(os.environ["PROMETHEUS_MULTIPROC_DIR"], ignore_errors=True)
