# sms-sessions under gunicorn. Build: docker build -t sms-sessions .  (or `make up`)
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

# The package with its dependencies, from pyproject.toml's ranges (a code change rebuilds this
# layer; gunicorn then imports `service` from /app, the working directory).
COPY pyproject.toml ./
COPY service ./service
RUN pip install .

COPY config ./config
ENV CALLERS_FILE=/app/config/callers.json

RUN useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin sms
USER sms

EXPOSE 5000
CMD ["gunicorn", "-c", "config/gunicorn.conf.py", "service:create_app()"]
