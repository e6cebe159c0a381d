# Two commands set everything up on a fresh clone: `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# A CPU build of torch lies on this machine's disk; installing it first keeps pip from
# fetching a multi-GB CUDA build when the project asks for torch.
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: venv install install-dev demo test lint format bench clean

$(PY):
	python3 -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

$(VENV)/.installed: $(PY) pyproject.toml
	$(PIP) install --quiet "$(TORCH_SPEC)"
	$(PIP) install --quiet -e .
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed pyproject.toml
	$(PIP) install --quiet -e ".[dev]"
	touch $@

venv: $(PY)
install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev browser

## browser: Debian's chromium for tests/test_serve_browser.py, installed once when missing
## (as root, or with sudo; elsewhere the test is skipped, and fails under CI=true)
.PHONY: browser
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then sudo=; elif command -v sudo >/dev/null 2>&1; then sudo=sudo; \
	  else echo "browser: chromium missing and not root: the browser test will be skipped" >&2; exit 0; fi; \
	  command -v apt-get >/dev/null 2>&1 || { echo "browser: no apt-get; install Chromium yourself" >&2; exit 0; }; \
	  echo "browser: installing Debian's chromium for tests/test_serve_browser.py"; \
	  $$sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$sudo apt-get install -y -qq chromium >/dev/null; }

## demo: the main job on the embedded default (SQLite ./mlruns.db, local artifacts, synthetic
## volumes): seg3d synthesizes its data, plans, trains for one minute (max_minutes: the LR
## schedule ends with it), evaluates on the test split, registers `seg3d`
demo: install
	$(VENV)/bin/mlpipe run projects/seg3d -P register=true -P max_minutes=1
	@echo
	@echo "Look at the result:  $(VENV)/bin/mlflow ui --backend-store-uri sqlite:///mlruns.db"

## test: install what the tests need and run them all (integration tests included)
test: install-dev
	$(PY) -m pytest $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing on purpose"; exit 1; fi; \
	exit $$rc

lint: install-dev
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: install-dev
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

## bench: every benchmark beside its baseline (well under 15 min here); table in bench-results/
bench: install-dev
	$(PY) benchmarks/run_all.py --out bench-results

clean:
	rm -rf $(VENV) mlruns mlruns.db .pytest_cache
