# sms-sessions under gunicorn. Build: docker build -t sms-sessions .  (or `make up`)

# The service as a wheel. Building it leaves build/ and *.egg-info behind: they stay in this
# stage, the image below gets the wheel only.
FROM python:3.11-slim AS wheel
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml ./
COPY service ./service
RUN pip wheel --no-deps --wheel-dir /wheels .

FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# The user the service runs as, with a group of its own.
RUN groupadd --gid 10001 sms \
 && useradd --uid 10001 --gid sms --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin sms

WORKDIR /app

# Dependencies from the lock (`make lock`; the versions CI tests), in a layer of their own:
# a code change does not reinstall them. Production dependencies only, no dev extra.
COPY requirements.txt ./
RUN pip install --require-hashes -r requirements.txt

# The service itself, without dependencies (they are all above).
COPY --from=wheel /wheels /tmp/wheels
RUN pip install --no-deps /tmp/wheels/*.whl && rm -r /tmp/wheels

COPY config ./config
ENV CALLERS_FILE=/app/config/callers.json

USER sms:sms

EXPOSE 5000
# Ready = /readyz answers 200 on the address gunicorn binds (PORT or BIND, as it does).
HEALTHCHECK --interval=10s --timeout=5s --start-period=10s --retries=3 CMD ["python", "config/healthcheck.py"]
# gunicorn with config/gunicorn.conf.py, once the settings passed their check (`sms-sessions serve`).
CMD ["sms-sessions", "serve"]
