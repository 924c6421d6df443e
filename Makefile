# `make run` starts the whole service on this machine; `make test` runs every test.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test test-tools bench-tools lint format bench clean

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
# browser tests through Playwright; no browser is ever downloaded) and the benchmarks use
# (Postfix's smtp-sink as the SMTP server to measure against); installed when missing
# and this user may, otherwise what needs them says what to install. package:command
TEST_PACKAGES := spamassassin:spamassassin chromium:chromium
BENCH_PACKAGES := postfix:/usr/sbin/smtp-sink
define install-missing
	@for pair in $(1); do \
		command -v $${pair##*:} >/dev/null 2>&1 && continue; \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
			echo "installing $${pair%%:*}"; \
			DEBIAN_FRONTEND=noninteractive apt-get install -y -q $${pair%%:*} >/dev/null 2>&1 || \
			{ apt-get update -q >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $${pair%%:*} >/dev/null; }; \
		else echo "note: $${pair%%:*} is not installed; what needs it will say so"; fi; \
	done
endef

test-tools:
	$(call install-missing,$(TEST_PACKAGES))

bench-tools:
	$(call install-missing,$(BENCH_PACKAGES))

# Performance figures (needs PostgreSQL and Redis): writes benchmarks/results.json;
# the README's table is copied from it.
bench: $(STAMP) bench-tools
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
