# `make run` starts the whole service on this machine; `make test` runs every test.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test test-tools lint format bench clean

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || \
		{ echo "nurture needs Python 3.11 or newer (set PYTHON=python3.x)"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	@touch $(STAMP)

run: $(STAMP)
	$(BIN)/nurture dev

test: $(STAMP) test-tools
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/pytest

# Debian packages some tests use (SpamAssassin scores the emails, Chromium runs the
# browser tests through Playwright; no browser is ever downloaded); installed when
# missing and this user may, otherwise those tests say what to install.
TEST_PACKAGES := spamassassin:spamassassin chromium:chromium
test-tools:
	@for pair in $(TEST_PACKAGES); do \
		command -v $${pair##*:} >/dev/null 2>&1 && continue; \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
			echo "installing $${pair%%:*}"; \
			DEBIAN_FRONTEND=noninteractive apt-get install -y -q $${pair%%:*} >/dev/null 2>&1 || \
			{ apt-get update -q >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $${pair%%:*} >/dev/null; }; \
		else echo "note: $${pair%%:*} is not installed; the tests that need it will say so"; fi; \
	done

# Performance figures (needs PostgreSQL, Redis, and root for Postfix's smtp-sink):
# writes benchmarks/results.json; the README's table is copied from it.
bench: $(STAMP)
	$(BIN)/python benchmarks/run.py

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/nurture lint

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean:
	rm -rf $(VENV) instance .pytest_cache .ruff_cache
