# Two commands for a newcomer: `make demo` and `make test`.
# Both install what is missing: qemu-utils (via apt, when root), the venv,
# the package and its test dependencies.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
CONFIG ?= conf/convd.toml

.PHONY: all setup system-deps demo test test-fast bench clean

all: test

system-deps:
	@missing=""; \
	command -v qemu-img >/dev/null 2>&1 || missing="$$missing qemu-utils"; \
	command -v qemu-io >/dev/null 2>&1 || missing="$$missing qemu-utils"; \
	command -v systemd-analyze >/dev/null 2>&1 || missing="$$missing systemd"; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing:$$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$(echo $$missing | tr ' ' '\n' | sort -u); \
	  else \
	    echo "missing system packages:$$missing (install them, e.g. apt-get install$$missing)" >&2; exit 1; \
	  fi; \
	fi

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $@

setup: system-deps $(VENV)/.installed

demo: setup
	@mkdir -p var
	@echo "convd demo: drop disk images into $(CURDIR)/var/incoming/"
	@echo "            results appear in $(CURDIR)/var/outgoing/ (rejects in var/failed/)"
	@echo "            e.g.  qemu-img create -f qcow2 /tmp/x.qcow2 64M && mv /tmp/x.qcow2 var/incoming/"
	@echo "            Ctrl-C stops the daemon."
	$(BIN)/convd run -c $(CONFIG)

test: setup
	$(BIN)/python -m pytest tests

test-fast: setup
	$(BIN)/python -m pytest tests -m "not slow"

bench: setup
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) var .pytest_cache
