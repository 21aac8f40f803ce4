"""CPU per component of one webhook request, in process: where each contender's time goes.

The contender's WSGI app is called as a gunicorn worker calls it (an environ per request, the
body in ``wsgi.input``, the response iterated) on a real redis-server, with ``make bench``'s
messages (``bench/loadgen.py``'s signed bodies, 10 per pair, a cookie jar per pair, 5 % of them
redelivered). Passes without instrumentation give the CPU per request; then the functions
that own each concern are wrapped, and further passes are split among components:

    signature     the Twilio signature check (the service's, or twilio's validator + request.url)
    form          reading and parsing the body (and the service's UTF-8 check)
    redis         Redis calls, client side: the service's two scripts (OPEN, SAVE), or
                  Flask-Session's GET and SET; their CPU only (waiting for Redis is not CPU)
    session       the glue around them: the session interface, binding, saving, the cookie
    handler       the conversation logic (the service's handler, or the baselines' view)
    twiml         the reply's TwiML and its Response
    log           the request's log line (and the fields gathered for it)
    metrics       Prometheus counters and histograms (multiprocess mode, as the service ships)
    framework     the rest: Flask and werkzeug (environ, routing, contexts, hooks, headers)

A component's figure excludes the components it calls. Two ways to split:

- µs (``Timers``): this thread's CPU time (``CLOCK_THREAD_CPUTIME_ID``); each timer's own cost
  (two clock reads, measured at start) is taken out. Other processes do not add to it, but
  on a busy machine caches and the hypervisor do: take these figures on a quiet one.
- instructions (``--instructions``, ``Trampolines``): the same passes under valgrind's
  callgrind, which counts instructions, the same however busy the machine is. Each wrapped
  call runs through a C function of CPython's own that nothing else on the request path uses
  (``map``'s iterator, the slot behind ``-x``, …), one per (component, calling component), so
  callgrind's inclusive count of that C function is what the wrapped calls cost; a
  component's own count is its calls' minus those of the components they call, and the
  wrapping's own cost (calibrated) is taken out. Instructions are user space only (the
  kernel's share of socket calls is not counted).

What runs outside the app under gunicorn (HTTP parsing, sockets) is in neither: ``make bench``
measures whole workers.

    .venv/bin/python -m bench.profile --contender service --redis-url redis://127.0.0.1:PORT
    .venv/bin/python -m bench.profile --contender service --redis-url … --instructions
"""

from __future__ import annotations

import argparse
import functools
import io
import itertools
import json
import math
import operator
import os
import random
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from http.cookies import SimpleCookie
from pathlib import Path

CONTENDERS = ("service", "validated", "plain", "cookie")
COMPONENTS = ("signature", "form", "redis", "session", "handler", "twiml", "log", "metrics", "framework")
TOKEN = "bench-auth-token"
HOST = "127.0.0.1:8000"
URL = f"http://{HOST}/sms"
RECIPIENT = "+15550001111"
ROOT = Path(__file__).resolve().parent.parent
clock = time.thread_time_ns


class Timers:
    """Own CPU time per component: a timed call's time minus that of the timed calls it makes."""

    def __init__(self):
        self.own: dict[str, int] = defaultdict(int)
        self.calls: dict[str, int] = defaultdict(int)
        self.stack: list[list[int]] = []
        # What a timed call adds: inside its own span (half of each clock read) and to its
        # caller (the wrapper, the other halves); measured by ``calibrate``, then taken out.
        self.inner = self.outer = 0

    def wrap(self, component: str, function):
        stack, own, calls = self.stack, self.own, self.calls

        @functools.wraps(function)
        def timed(*args, **kwargs):
            children = [0]
            stack.append(children)
            started = clock()
            try:
                return function(*args, **kwargs)
            finally:
                elapsed = clock() - started
                stack.pop()
                own[component] += elapsed - children[0] - self.inner
                calls[component] += 1
                if stack:
                    stack[-1][0] += elapsed + self.outer

        return timed

    def calibrate(self, runs: int = 20000) -> None:
        """Measures ``inner`` and ``outer`` with timed calls of a function doing nothing."""
        noop = self.wrap("_noop", lambda: None)
        outer = self.wrap("_outer", lambda: [noop() for _ in range(runs)])
        empty = self.wrap("_empty", lambda: [None for _ in range(runs)])
        outer()
        empty()
        self.inner = self.own["_noop"] // runs
        self.outer = max(0, (self.own["_outer"] - self.own["_empty"]) // runs)
        for name in ("_noop", "_outer", "_empty"):
            self.own.pop(name, None)
            self.calls.pop(name, None)

    def reset(self) -> None:
        self.own.clear()
        self.calls.clear()


class _Dunder:
    """Hands ``call`` to the special method an operator invokes (``-x`` → ``__neg__``…)."""

    def __init__(self, call):
        self.call = call

    def __neg__(self, *_):
        return self.call()

    __pos__ = __invert__ = __abs__ = __ceil__ = __trunc__ = __neg__
    __matmul__ = __lshift__ = __rshift__ = __xor__ = __floordiv__ = __neg__


_NEVER = object()  # iter(call, sentinel)'s sentinel: no call returns it


def _through_predicate(iterator_type, keep: bool):
    """Runs the call as the predicate of ``iterator_type`` (filter, dropwhile…), result kept."""

    def via(call):
        result = []
        next(iterator_type(lambda item: result.append(item()) or keep, (call,)))
        return result[0]

    return via


# (the C function of CPython's that callgrind sees, how a call runs through it). The first
# three toggle callgrind's collection: a request, and the two calibration loops.
TRAMPOLINES = (
    ("functools_reduce", lambda call: functools.reduce(lambda _, item: item(), (call,), None)),
    ("slot_nb_matrix_multiply", lambda call: _Dunder(call) @ 0),
    ("slot_nb_lshift", lambda call: _Dunder(call) << 0),
    ("slot_nb_positive", lambda call: +_Dunder(call)),
    ("slot_nb_invert", lambda call: ~_Dunder(call)),
    ("slot_nb_absolute", lambda call: abs(_Dunder(call))),
    ("slot_nb_rshift", lambda call: _Dunder(call) >> 0),
    ("slot_nb_xor", lambda call: _Dunder(call) ^ 0),
    ("slot_nb_floor_divide", lambda call: _Dunder(call) // 0),
    ("math_ceil", lambda call: math.ceil(_Dunder(call))),
    ("math_trunc", lambda call: math.trunc(_Dunder(call))),
    ("map_next", lambda call: next(map(operator.methodcaller("__call__"), (call,)))),
    ("starmap_next", lambda call: next(itertools.starmap(call, ((),)))),
    ("groupby_next", lambda call: next(itertools.groupby((call,), key=lambda item: item()))[0]),
    ("calliter_iternext", lambda call: next(iter(call, _NEVER))),
    ("_operator_call", lambda call: operator.call(call)),
    ("dropwhile_next", _through_predicate(itertools.dropwhile, False)),
    ("takewhile_next", _through_predicate(itertools.takewhile, True)),
    ("filterfalse_next", _through_predicate(itertools.filterfalse, False)),
)
TOGGLES = 3
REQUEST, CALIBRATED, EMPTY = (function for function, _ in TRAMPOLINES[:TOGGLES])


class Trampolines:
    """Runs each wrapped call through the C function of its (component, calling component), for
    callgrind to count; ``calls`` counts them on the Python side, to check that callgrind saw
    exactly these calls of that function (no other code on the path uses it).

    A wrapped call costs instructions of its own (the wrapper, the trampoline), in the caller
    and in the callee: ``calibrate`` measures both with calls of a function doing nothing, in
    loops that toggle collection themselves, and ``instructions`` takes them out.
    """

    def __init__(self):
        self.stack: list[str] = []
        self.pairs: dict[tuple[str, str | None], int] = {("framework", None): 0}  # → TRAMPOLINES
        self.calls: dict[tuple[str, str | None], int] = defaultdict(int)
        self.calibration_calls = 0

    def pair(self, component: str, parent: str | None) -> int:
        key = (component, parent)
        if key not in self.pairs:
            index = len(self.pairs) + TOGGLES - 1
            if index == len(TRAMPOLINES):
                raise RuntimeError(f"more (component, caller) pairs than trampolines: {key}")
            self.pairs[key] = index
        return self.pairs[key]

    def wrap(self, component: str, function):
        stack, calls = self.stack, self.calls

        @functools.wraps(function)
        def traced(*args, **kwargs):
            parent = stack[-1] if stack else None
            if parent == component or (parent is None and component != "framework"):
                return function(*args, **kwargs)  # within itself, or outside any request
            key = (component, parent)
            via = TRAMPOLINES[self.pair(component, parent)][1]
            calls[key] += 1
            stack.append(component)
            try:
                return via(lambda: function(*args, **kwargs))
            finally:
                stack.pop()

        return traced

    def calibrate(self, runs: int = 2000) -> None:
        """``runs`` wrapped calls of a function doing nothing, and ``runs`` plain ones, each
        loop through its own toggling trampoline."""
        noop = self.wrap("_noop", lambda: None)
        plain = lambda: None  # noqa: E731
        self.stack.append("_calibration")
        try:
            TRAMPOLINES[1][1](lambda: [noop() for _ in range(runs)])
            TRAMPOLINES[2][1](lambda: [plain() for _ in range(runs)])
        finally:
            self.stack.pop()
        self.calibration_calls = runs

    def report(self) -> list[dict]:
        return [
            {
                "component": component,
                "caller": parent,
                "function": TRAMPOLINES[index][0],
                "calls": self.calls[(component, parent)],
            }
            for (component, parent), index in self.pairs.items()
        ]


def patch(timers, component: str, owner, name: str) -> None:
    """Wraps ``owner.name`` (a function, method or werkzeug cached_property) as ``component``
    (``timers``: a ``Timers`` or ``Trampolines``)."""
    from werkzeug.utils import cached_property

    original = owner.__dict__[name] if isinstance(owner, type) else getattr(owner, name)
    if isinstance(original, cached_property):
        setattr(owner, name, cached_property(timers.wrap(component, original.fget), name))
    elif isinstance(original, classmethod):
        setattr(owner, name, classmethod(timers.wrap(component, original.__func__)))
    else:
        setattr(owner, name, timers.wrap(component, original))


def instrument_common(timers) -> None:
    """What every contender shares: werkzeug's body and form parsing, Flask's log calls."""
    import logging

    import flask.wrappers
    import werkzeug.wrappers.request

    patch(timers, "form", flask.wrappers.Request, "_load_form_data")
    patch(timers, "form", werkzeug.wrappers.request.Request, "get_data")
    patch(timers, "log", logging.Logger, "_log")


def instrument_service(timers, app) -> None:
    import prometheus_client.metrics as prometheus

    from service import callers, handler, logs, sessions, signature, store, webhook
    from service.wiring import current

    patch(timers, "signature", signature.SignatureCheck, "refusal")
    patch(timers, "form", webhook, "_fields")
    for name in ("open_summary", "annotate", "write"):
        patch(timers, "log", logs, name)
    patch(timers, "log", webhook, "mask")
    for owner in (prometheus.Counter, prometheus.Histogram):
        patch(timers, "metrics", owner, "inc" if owner is prometheus.Counter else "observe")
    patch(timers, "metrics", prometheus.MetricWrapperBase, "labels")
    current(app).store.on_lock_wait = timers.wrap("metrics", current(app).store.on_lock_wait)
    run = store.ConversationStore._run
    open_script, save_script = timers.wrap("redis:OPEN", run), timers.wrap("redis:SAVE", run)

    def scripts(conversations, script, keys, args):
        return (open_script if script is conversations._open else save_script)(
            conversations, script, keys, args
        )

    store.ConversationStore._run = scripts
    for name in ("open_session", "save_session"):
        patch(timers, "session", sessions.ConversationSessionInterface, name)
    for name in ("bind", "save"):
        patch(timers, "session", sessions.ConversationSession, name)
    patch(timers, "session", handler.Message, "from_params")
    patch(timers, "session", callers.Callers, "name")
    current(app).handler = timers.wrap("handler", current(app).handler)
    for name in ("render", "memo", "recall", "twiml"):
        patch(timers, "twiml", webhook, name)


def instrument_baseline(timers, app, name: str) -> None:
    import flask.sessions
    import flask_session.base
    import redis
    import werkzeug.sansio.request
    from twilio.request_validator import RequestValidator

    import bench.baseline

    if name == "validated":
        patch(timers, "signature", RequestValidator, "__init__")
        patch(timers, "signature", RequestValidator, "validate")
        patch(timers, "signature", werkzeug.sansio.request.Request, "url")
    interface = (
        flask.sessions.SecureCookieSessionInterface
        if name == "cookie"
        else flask_session.base.ServerSideSessionInterface
    )
    for method in ("open_session", "save_session"):
        patch(timers, "session", interface, method)
    patch(timers, "redis", redis.Redis, "execute_command")
    patch(timers, "twiml", bench.baseline, "twiml")
    app.view_functions["sms"] = timers.wrap("handler", app.view_functions["sms"])


def handle_inline(runs) -> None:
    """The service's handler called in the request's thread instead of one of its handler
    threads (service/runs.py): a thread's CPU clock and callgrind's collection (toggled per
    thread) see the request's thread only. The hand-off to a handler thread and back is thus
    not in these figures; ``make bench``'s whole-worker CPU has it."""
    from service.runs import Run

    def start(message, conversation, inbound=False):
        run = Run(runs, message, conversation, inbound)
        try:
            run.settle("reply", runs.handler_of()(message, conversation))
        except Exception as error:
            run.settle("error", error)
        return run

    runs.start = start


def build(name: str, redis_url: str):
    """The contender's WSGI app, built as its gunicorn worker builds it."""
    os.environ["REDIS_URL"] = redis_url
    os.environ["TWILIO_AUTH_TOKEN"] = TOKEN
    if name == "service":
        # As config/gunicorn.conf.py runs it: metrics in multiprocess mode.
        os.environ.setdefault("PROMETHEUS_MULTIPROC_DIR", tempfile.mkdtemp(prefix="sms-profile-"))
        from service import create_app
        from service.wiring import current

        app = create_app({"REDIS_URL": redis_url, "TWILIO_AUTH_TOKEN": TOKEN})
        handle_inline(current(app).runs)
        return app
    module = {
        "validated": "bench.validated_app",
        "plain": "bench.plain_session_app",
        "cookie": "bench.cookie_app",
    }[name]
    return __import__(module, fromlist=["app"]).app


class Requests:
    """``make bench``'s messages for ``pairs`` pairs, sent one at a time with a jar per pair.

    Shapes follow ``seed``; senders and MessageSids are new on every call, so that a pass
    never meets conversations or answers an earlier one left in Redis.
    """

    def __init__(self, pairs: int, seed: int):
        from twilio.request_validator import RequestValidator

        from bench.loadgen import Pair

        plan = {
            "messages": 10,
            "burst_first": 0,
            "burst": 0,
            "redeliver": 0.05,
            "url": URL,
            "recipient": RECIPIENT,
        }
        rng = random.Random(seed)
        validator = RequestValidator(TOKEN)
        unique = secrets.randbelow(10**6)
        self.pairs = [
            Pair(f"+1557{unique:06d}{n:04d}", plan, rng, validator, "AC" + "b" * 32, f"{unique:06d}{n:04d}")
            for n in range(pairs)
        ]

    def environs(self):
        """Yields (environ, pair): each pair's steps in turn, round-robin over the pairs."""
        for number in range(max(len(pair.steps) for pair in self.pairs)):
            for pair in self.pairs:
                if number < len(pair.steps):
                    for index, _ in pair.steps[number]:
                        yield environ(pair, index), pair


def environ(pair, index: int) -> dict:
    body, signature = pair.signed[index]
    env = {
        "REQUEST_METHOD": "POST",
        "SCRIPT_NAME": "",
        "PATH_INFO": "/sms",
        "QUERY_STRING": "",
        "RAW_URI": "/sms",
        "SERVER_NAME": "127.0.0.1",
        "SERVER_PORT": "8000",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "REMOTE_ADDR": "127.0.0.1",
        "REMOTE_PORT": "40000",
        "HTTP_HOST": HOST,
        "CONTENT_TYPE": "application/x-www-form-urlencoded",
        "CONTENT_LENGTH": str(len(body)),
        "HTTP_X_TWILIO_SIGNATURE": signature.decode(),
        "HTTP_CONNECTION": "close",
        "wsgi.input": io.BytesIO(body),
        "wsgi.errors": sys.stderr,
        "wsgi.url_scheme": "http",
        "wsgi.version": (1, 0),
        "wsgi.multithread": False,
        "wsgi.multiprocess": True,
        "wsgi.run_once": False,
    }
    if pair.jar:
        env["HTTP_COOKIE"] = "; ".join(f"{k.decode()}={v.decode()}" for k, v in pair.jar.items())
    return env


def serve(app, requests: Requests) -> tuple[int, int, dict[int, int]]:
    """Sends every request; returns (requests, thread CPU ns, statuses)."""
    statuses: dict[int, int] = defaultdict(int)
    count, cpu = 0, 0
    for env, pair in requests.environs():
        answer: dict = {}

        def start_response(status, headers, exc_info=None, answer=answer):
            answer["status"], answer["headers"] = status, headers

        started = clock()
        body = b"".join(app(env, start_response))
        cpu += clock() - started
        count += 1
        statuses[int(answer["status"].split()[0])] += 1
        for name, value in answer["headers"]:
            if name.lower() == "set-cookie":
                for morsel in SimpleCookie(value).values():
                    pair.jar[morsel.key.encode()] = morsel.value.encode()
        del body
    return count, cpu, dict(statuses)


def instrumented(name: str, app, splitter):
    """The app as ``splitter`` sees it: every component's functions wrapped, the request too."""
    instrument_common(splitter)
    if name == "service":
        instrument_service(splitter, app)
    else:
        instrument_baseline(splitter, app, name)
    return splitter.wrap("framework", lambda env, start_response: [b"".join(app(env, start_response))])


def answered(name: str, results) -> None:
    statuses = {code for _, _, counted in results for code in counted}
    if statuses != {200}:
        raise RuntimeError(f"{name} did not answer every message 200: {statuses}")


def profile(name: str, redis_url: str, pairs: int, passes: int) -> dict:
    """CPU µs per request and per component: medians over ``passes`` passes of each kind."""
    app = build(name, redis_url)
    serve(app, Requests(max(2, pairs // 10), seed=90))  # warm-up: first calls, script loading
    whole = [serve(app, Requests(pairs, seed=91 + n)) for n in range(passes)]
    timers = Timers()
    timers.calibrate()
    root = instrumented(name, app, timers)
    split, shares = [], []
    for n in range(passes):
        timers.reset()
        split.append(serve(root, Requests(pairs, seed=91 + n)))
        shares.append({component: ns / split[-1][0] / 1000 for component, ns in timers.own.items()})
    answered(name, whole + split)

    def median(component: str) -> float:
        return statistics.median(share.get(component, 0.0) for share in shares)

    return {
        "contender": name,
        "requests_per_pass": whole[0][0],
        "passes": passes,
        "cpu_us_per_request": round(statistics.median(cpu / count / 1000 for count, cpu, _ in whole), 1),
        "components_us": {
            c: round(sum(median(k) for k in timers.own if k.partition(":")[0] == c), 1) for c in COMPONENTS
        },
        "redis_scripts_us": {
            k.partition(":")[2]: round(median(k), 1) for k in timers.own if k.startswith("redis:")
        },
        "instrumented_cpu_us_per_request": round(
            statistics.median(cpu / count / 1000 for count, cpu, _ in split), 1
        ),
        "timer_overhead_ns": {"inner": timers.inner, "outer": timers.outer},
    }


def traced_pass(name: str, redis_url: str, pairs: int) -> dict:
    """Under callgrind (see ``instructions``): one pass through the trampolines."""
    app = build(name, redis_url)
    serve(app, Requests(max(2, pairs // 10), seed=90))
    trampolines = Trampolines()
    root = instrumented(name, app, trampolines)
    trampolines.calibrate()
    result = serve(root, Requests(pairs, seed=91))
    answered(name, [result])
    return {
        "requests": result[0],
        "pairs": trampolines.report(),
        "calibration_calls": trampolines.calibration_calls,
    }


def instructions(name: str, redis_url: str, pairs: int) -> dict:
    """Instructions per request and per component: one pass of ``pairs`` pairs under callgrind,
    which collects only inside requests and the calibration loops (their trampolines toggle
    it). Each wrapped call's own cost, measured by the calibration, is taken out of the
    component called and of its caller."""
    with tempfile.TemporaryDirectory(prefix="sms-callgrind-") as directory:
        out, traced = Path(directory) / "callgrind.out", Path(directory) / "pairs.json"
        subprocess.run(
            [
                "valgrind",
                "--tool=callgrind",
                "--collect-atstart=no",
                *(f"--toggle-collect={function}" for function in (REQUEST, CALIBRATED, EMPTY)),
                "--compress-strings=no",
                f"--callgrind-out-file={out}",
                *command(name, redis_url, "--pairs", str(pairs), "--traced-pass", str(traced)),
            ],
            cwd=ROOT,
            check=True,
            capture_output=True,
            text=True,
            timeout=900,
        )
        seen = calls_into(out, {function for function, _ in TRAMPOLINES})
        run = json.loads(traced.read_text())
    shared = [
        f"{pair['function']} (callgrind saw {seen[pair['function']][0]} calls, the profile "
        f"made {pair['calls']})"
        for pair in run["pairs"]
        if seen[pair["function"]][0] != pair["calls"]
    ]
    if shared:
        raise RuntimeError("other code on the request path uses " + ", ".join(shared))
    requests, runs = run["requests"], run["calibration_calls"]
    noop = next(pair["function"] for pair in run["pairs"] if pair["component"] == "_noop")
    callee = seen[noop][1] / runs  # inside the trampoline, per wrapped call
    caller = (seen[CALIBRATED][1] - seen[noop][1] - seen[EMPTY][1]) / runs  # around it
    own: dict[str, float] = defaultdict(float)
    for pair in run["pairs"]:
        if pair["caller"] == "_calibration":
            continue
        calls, cost = pair["calls"], seen[pair["function"]][1]
        own[pair["component"]] += (cost - calls * callee) / requests
        if pair["caller"]:
            own[pair["caller"]] -= (cost + calls * caller) / requests
    return {
        "contender": name,
        "requests": requests,
        "instructions_per_request": round(sum(own.values())),
        "components": {
            c: round(sum(v for k, v in own.items() if k.partition(":")[0] == c)) for c in COMPONENTS
        },
        "redis_scripts": {k.partition(":")[2]: round(v) for k, v in own.items() if k.startswith("redis:")},
        "wrapped_calls_per_request": sum(p["calls"] for p in run["pairs"] if p["caller"] != "_calibration")
        / requests,
        "instructions_per_wrapped_call": {"caller": round(caller), "callee": round(callee)},
    }


def calls_into(callgrind_out: Path, functions: set[str]) -> dict[str, tuple[int, int]]:
    """(calls, inclusive instructions) of each of ``functions``, summed over every call site
    (callgrind's format: a ``cfn=`` line names the callee of the ``calls=`` lines that follow,
    each followed by a cost line ending with the calls' inclusive count)."""
    seen = {function: [0, 0] for function in functions}
    callee = None
    with open(callgrind_out, encoding="utf-8", errors="replace") as lines:
        for line in lines:
            if line.startswith("cfn="):
                callee = line[4:].strip()
            elif line.startswith("calls=") and callee in seen:
                seen[callee][0] += int(line[6:].split()[0])
                seen[callee][1] += int(next(lines).split()[-1])
    return {function: (calls, cost) for function, (calls, cost) in seen.items()}


def command(name: str, redis_url: str, *options: str) -> list[str]:
    """This module run for contender ``name`` against ``redis_url``, with ``options`` (those
    ``main`` reads below)."""
    return [sys.executable, "-m", "bench.profile", "--contender", name, "--redis-url", redis_url, *options]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contender", choices=CONTENDERS, required=True)
    parser.add_argument("--redis-url", required=True)
    parser.add_argument("--pairs", type=int, default=200, help="pairs of 10 messages per pass")
    parser.add_argument("--passes", type=int, default=3, help="passes with and without timers")
    parser.add_argument(
        "--instructions",
        action="store_true",
        help="instructions per component under callgrind instead of CPU µs",
    )
    parser.add_argument("--traced-pass", help=argparse.SUPPRESS)  # the run under callgrind
    parser.add_argument("--output", help="write the JSON here (stdout carries the app's log lines)")
    args = parser.parse_args(argv)
    if args.instructions:
        result = instructions(args.contender, args.redis_url, args.pairs)
    else:
        with tempfile.TemporaryFile("w") as log_lines:  # the app's lines go to a file, as under gunicorn
            stdout, sys.stdout = sys.stdout, log_lines
            try:
                if args.traced_pass:
                    Path(args.traced_pass).write_text(
                        json.dumps(traced_pass(args.contender, args.redis_url, args.pairs))
                    )
                    return
                result = profile(args.contender, args.redis_url, args.pairs, args.passes)
            finally:
                sys.stdout = stdout
    text = json.dumps(result, indent=2)
    if args.output:
        Path(args.output).write_text(text + "\n")
    else:
        print(text)


if __name__ == "__main__":
    main()
