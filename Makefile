# Everything a developer needs; Python 3.11 or newer has to be on the machine (CI tests 3.11, 3.13).
# PYTHON: the first of these that runs and is 3.11 or newer (`make install PYTHON=…` to choose).
PYTHON ?= $(shell for p in python3 python3.13 python3.12 python3.11; do \
	$$p -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null && command -v $$p && break; done)
PYTHON_OK = $(if $(PYTHON),$(shell $(PYTHON) -c 'import sys; print(sys.version_info >= (3, 11))' 2>/dev/null))
PYTHON_VERSION = $(or $(if $(PYTHON),$(shell $(PYTHON) --version 2>/dev/null | head -1)),not found)
VENV ?= .venv
BIN := $(VENV)/bin
# make run's token; service/cli.py's DEV_TOKEN, the one token the banner prints.
DEV_TOKEN ?= dev-auth-token
HOST ?= 127.0.0.1
PORT ?= 5000
# make run's Twilio stand-in (service/twilio_standin.py), when TWILIO_ACCOUNT_SID is not set.
STANDIN_PORT ?= 8765
# Docker Compose v2 (`docker compose`) when present, else the v1 `docker-compose`.
COMPOSE ?= $(shell docker compose version >/dev/null 2>&1 && echo "docker compose" || echo docker-compose)
# The locks: requirements.txt is what the image installs, requirements-dev.txt adds the dev
# extra (embedded store, tests, uv) with the same versions. `make lock` writes both.
LOCK := uv pip compile pyproject.toml --universal --python-version 3.11 --generate-hashes \
	--quiet --custom-compile-command "make lock"

.PHONY: install lock run simulate test bench bench-quick up down logs clean

install: $(VENV)/.installed

# A PYTHON given (`make install PYTHON=…`, or in the environment) that is not the one the
# existing .venv was built with rebuilds it; the default PYTHON never replaces a .venv.
VENV_PYTHON_ID = $(shell $(BIN)/python -c 'import sys; print(sys.base_prefix, sys.version)' 2>/dev/null)
PYTHON_ID = $(shell $(PYTHON) -c 'import sys; print(sys.base_prefix, sys.version)' 2>/dev/null)
VENV_OTHER_PYTHON = $(and $(filter command line environment,$(origin PYTHON)),$(wildcard $(BIN)/python),$(subst $(PYTHON_ID),,$(VENV_PYTHON_ID)))

.PHONY: venv-of-another-python
venv-of-another-python:

# Built from scratch from the lock, and removed again if any step fails: a .venv is either
# complete or absent, never half-installed. A Python older than 3.11 stops make in one line.
$(VENV)/.installed: requirements-dev.txt pyproject.toml $(if $(VENV_OTHER_PYTHON),venv-of-another-python)
	$(if $(filter True,$(PYTHON_OK)),,$(error Python 3.11 or newer is needed; PYTHON=$(PYTHON) is $(PYTHON_VERSION): make install PYTHON=/path/to/python3.11))
	rm -rf $(VENV)
	{ $(PYTHON) -m venv $(VENV) \
	  && $(BIN)/pip install --quiet --require-hashes -r requirements-dev.txt \
	  && $(BIN)/pip install --quiet --no-deps -e . ; } || { rm -rf $(VENV); exit 1; }
	touch $@

# After changing dependencies in pyproject.toml; keeps every pin that still fits
# (`make lock LOCK_ARGS=--upgrade` moves all to their newest).
lock: install
	$(BIN)/$(LOCK) $(LOCK_ARGS) --extra dev -o requirements-dev.txt
	$(BIN)/$(LOCK) -c requirements-dev.txt -o requirements.txt

run: install
	@$(BIN)/python -c 'import socket, sys; s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind((sys.argv[1], int(sys.argv[2])))' $(HOST) $(PORT) 2>/dev/null || { \
	  echo "make run: port $(PORT) on $(HOST) is in use; choose another: make run PORT=5001" >&2; exit 1; }
	LOG_FORMAT=$${LOG_FORMAT:-text} TWILIO_AUTH_TOKEN=$${TWILIO_AUTH_TOKEN:-$(DEV_TOKEN)} $(BIN)/sms-sessions run --host $(HOST) --port $(PORT) \
	  $$([ -n "$$TWILIO_ACCOUNT_SID" ] || echo --twilio-standin $(STANDIN_PORT))

simulate: install
	TWILIO_AUTH_TOKEN=$${TWILIO_AUTH_TOKEN:-$(DEV_TOKEN)} $(BIN)/sms-sessions simulate --from $${FROM:-+15551230001} --to $${TO:-+15550001111} --url http://$(HOST):$(PORT)/sms \
	  $$([ -n "$$TWILIO_ACCOUNT_SID" ] || echo --standin http://127.0.0.1:$(STANDIN_PORT))

test: install
	$(BIN)/pytest $(PYTEST_ARGS)

.PHONY: test-fast docs lint
lint: install  # style (ruff) and types (mypy, service/), as CI runs them
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

docs: install  # docs/configuration.md, written from service/settings.py
	$(BIN)/python -c 'from service.settings import table; print(table(), end="")' > docs/configuration.md


test-fast: install  # everything but the tests marked slow, in seconds
	$(BIN)/pytest -m "not slow" $(PYTEST_ARGS)

bench: install
	$(BIN)/python -m bench.run

bench-quick: install
	$(BIN)/python -m bench.run --quick

up:
	$(COMPOSE) up --build --detach
	@echo "The stack serves http://127.0.0.1:5000/sms once web is healthy ($(COMPOSE) ps). Talk to it:"
	@echo "  make simulate    # signs with $(DEV_TOKEN), as config/sms-sessions.env.example expects"

down:
	$(COMPOSE) down

logs:
	$(COMPOSE) logs --follow

clean:
	rm -rf $(VENV) .pytest_cache
