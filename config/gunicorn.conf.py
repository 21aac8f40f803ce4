"""gunicorn settings for sms-sessions: ``gunicorn -c config/gunicorn.conf.py 'service:create_app()'``.

Environment: ``WEB_CONCURRENCY`` (workers), ``PORT`` / ``BIND`` (address),
``PROMETHEUS_MULTIPROC_DIR`` (where workers share metrics). ``GUNICORN_CMD_ARGS`` still
overrides anything here (gunicorn's own rule).
"""

import multiprocessing
import os
import shutil
import sys
import tempfile
from pathlib import Path

# Workers: the webhook mostly waits on Redis, so gunicorn's usual 2 × CPUs + 1 sync workers.
workers = int(os.environ.get("WEB_CONCURRENCY") or multiprocessing.cpu_count() * 2 + 1)

# All interfaces inside a container; BIND (e.g. 127.0.0.1:8000) overrides the whole address.
bind = os.environ.get("BIND") or f"0.0.0.0:{os.environ.get('PORT') or 5000}"

# Twilio gives up after 15 s. A request is bounded well below that (LOCK_WAIT 5 s plus short
# Redis timeouts); a worker silent for 10 s is stuck and gets replaced.
timeout = 10
graceful_timeout = 10

# A GET webhook carries the whole message in its query string: Twilio's longest (1,600
# characters, each up to 9 bytes percent-encoded) is ~15 KB, over gunicorn's 4,094-byte
# default, and gunicorn takes no limit above 8,190 but 0 (none). The app answers a query
# string longer than MAX_BODY_BYTES with 414, as it answers a body with 413.
limit_request_line = 0

# Access log on stdout, next to the app's JSON lines. The path only (%(U)s), never the query:
# a GET webhook carries From, To and Body in it. No user agent or referer either.
accesslog = "-"
access_log_format = '%(h)s "%(m)s %(U)s" %(s)s %(B)s %(M)sms'
errorlog = "-"

# gunicorn ≥ 25's control socket (for gunicornc) is unused here; its default path in $HOME
# would collide between two instances and needs a writable home the container user lacks.
control_socket_disable = True

# Worker heartbeats on tmpfs when there is one (a container's /tmp may be a slow overlay).
if os.path.isdir("/dev/shm"):
    worker_tmp_dir = "/dev/shm"

# Metrics across workers: prometheus-client's multiprocess mode needs a directory shared by
# the workers, set before any worker imports prometheus_client. Made here when not given.
_made_metrics_dir = not os.environ.get("PROMETHEUS_MULTIPROC_DIR")
if _made_metrics_dir:
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="sms-sessions-metrics-")


def on_starting(server):
    """Refuses bad settings once, in one line, before any worker starts; clears old metrics."""
    from service import check_environment
    from service.settings import ConfigError

    try:
        check_environment()
    except ConfigError as error:
        print(f"sms-sessions: refusing to start: {error}", file=sys.stderr, flush=True)
        on_exit(server)
        sys.exit(1)
    metrics_dir = Path(os.environ["PROMETHEUS_MULTIPROC_DIR"])
    metrics_dir.mkdir(parents=True, exist_ok=True)
    for stale in metrics_dir.glob("*.db"):  # a previous run's counts must not add up with ours
        stale.unlink()


def post_worker_init(worker):
    """Each worker runs the lifecycle sweeper in a thread (a lease in Redis lets one sweep at a
    time), so conversations end on time without any request arriving."""
    from service.lifecycle import start_sweeper

    start_sweeper(worker.wsgi)


def child_exit(server, worker):
    """prometheus-client's rule for multiprocess mode: a dead worker's live gauges go."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)


def on_exit(server):
    if _made_metrics_dir:
        shutil.rmtree(os.environ["PROMETHEUS_MULTIPROC_DIR"], ignore_errors=True)
