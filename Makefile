# The two commands a user needs: `make test` and `make serve`. Both build .venv first when it is missing
# or older than pyproject.toml.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: test test-fast serve system-deps clean

$(VENV): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -e ".[dev]"
	@touch $(VENV)

# Debian packages the tests drive: espeak-ng (dictations), chromium (browser tests), poppler-utils and dcmtk
# (report exports). Installed only where missing and apt is available; otherwise those tests skip and say why.
system-deps:
	@bash tests/support/system-deps.sh

# The whole suite, slow tests included. PostgreSQL: tests/support/postgres.py finds the server on
# 127.0.0.1:5432 (or starts a throwaway cluster) and prints its URL; under CI=true having none is an error.
test: $(VENV) system-deps
	@set -e; \
	pg_url=$$($(BIN)/python tests/support/postgres.py start); \
	trap '$(BIN)/python tests/support/postgres.py stop' EXIT; \
	MMCORE_TEST_PG_URL="$$pg_url" $(BIN)/python -m pytest $(PYTEST_ARGS)

# Everything except tests marked slow, for quick iterations.
test-fast: $(VENV)
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

serve: $(VENV)
	$(BIN)/mmcore serve $(SERVE_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
