# Everything a developer needs; only Python 3.11 has to be on the machine.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
DEV_TOKEN ?= dev-auth-token
HOST ?= 127.0.0.1
PORT ?= 5000
# Docker Compose v2 (`docker compose`) when present, else the v1 `docker-compose`.
COMPOSE ?= $(shell docker compose version >/dev/null 2>&1 && echo "docker compose" || echo docker-compose)

.PHONY: install run simulate test bench bench-quick up down logs clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

run: install
	@echo "Serving the webhook on http://$(HOST):$(PORT)/sms (embedded in-memory store)."
	@echo "Talk to it from another terminal:"
	@echo "  TWILIO_AUTH_TOKEN=$(DEV_TOKEN) $(BIN)/sms-sessions simulate --from +15551230001 --to +15550001111 --url http://$(HOST):$(PORT)/sms"
	TWILIO_AUTH_TOKEN=$${TWILIO_AUTH_TOKEN:-$(DEV_TOKEN)} $(BIN)/sms-sessions run --host $(HOST) --port $(PORT)

simulate: install
	TWILIO_AUTH_TOKEN=$${TWILIO_AUTH_TOKEN:-$(DEV_TOKEN)} $(BIN)/sms-sessions simulate --from $${FROM:-+15551230001} --to $${TO:-+15550001111} --url http://$(HOST):$(PORT)/sms

test: install
	$(BIN)/pytest $(PYTEST_ARGS)

.PHONY: test-fast docs
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
