# Two commands for a newcomer: `make demo` and `make test`.
# Both install what is missing: qemu-utils (via apt, when root), the venv,
# the package and its test dependencies.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
CONFIG ?= conf/convd.toml

.PHONY: all setup system-deps sharedfs-deps glance-deps test-deps glance-venv demo lint test test-fast bench bench-shared clean

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

# The shared-spool and RBD tests and `make bench-shared` run a one-node Ceph
# cluster (ceph-fuse mounts; qemu's rbd driver, qemu-block-extra) on
# loopback, and kernel NFS inside User-Mode Linux (as does the power-cut
# test, with ext4 and XFS on UML block devices); as root on Debian/Ubuntu
# their packages are installed here, elsewhere those
# tests fail saying what to install (they skip when not root).
SHAREDFS_TOOLS := ceph-mon:ceph-mon ceph-osd:ceph-osd ceph-mds:ceph-mds ceph-mgr:ceph-mgr \
                  ceph-fuse:ceph-fuse ceph:ceph-common linux.uml:user-mode-linux \
                  rpc.nfsd:nfs-kernel-server rpcbind:rpcbind ip:iproute2 modprobe:kmod \
                  nsenter:util-linux mkfs.ext4:e2fsprogs e2fsck:e2fsprogs \
                  mkfs.xfs:xfsprogs xfs_repair:xfsprogs
sharedfs-deps:
	@missing=""; \
	for pair in $(SHAREDFS_TOOLS); do \
	  command -v $${pair%%:*} >/dev/null 2>&1 || missing="$$missing $${pair#*:}"; \
	done; \
	ls /usr/lib/*/qemu/block-rbd.so >/dev/null 2>&1 || missing="$$missing qemu-block-extra"; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing:$$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$(echo $$missing | tr ' ' '\n' | sort -u); \
	  else \
	    echo "shared-filesystem tests need:$$missing (as root: apt-get install$$missing)" >&2; \
	  fi; \
	fi

# Glance's database in tests and the bench: a private MariaDB each run starts
# and stops itself (Debian's mariadb-server; only its programs are used).
GLANCE_TOOLS := mariadbd:mariadb-server mariadb-install-db:mariadb-server mariadb:mariadb-client-core
glance-deps:
	@missing=""; \
	for pair in $(GLANCE_TOOLS); do \
	  PATH="$$PATH:/usr/sbin:/sbin" command -v $${pair%%:*} >/dev/null 2>&1 || missing="$$missing $${pair#*:}"; \
	done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing:$$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$(echo $$missing | tr ' ' '\n' | sort -u); \
	  else \
	    echo "the Glance tests need:$$missing (as root: apt-get install$$missing)" >&2; \
	  fi; \
	fi

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $@

setup: system-deps $(VENV)/.installed

# A separate environment for a real Glance (tests/test_glance.py, the bench's
# Glance scenario): glance 33.0.0, uWSGI and PyMySQL pinned by constraints-glance.txt,
# plus convd itself (editable), the way a deployer installs the plugin.
# System python, not a per-user one under /root: the tests also run Glance
# and convd from it as unprivileged users.  Rebuilt only when the pins or
# pyproject.toml change (the stamp); about 30 s cold.
GLANCE_PYTHON ?= $(shell test -x /usr/bin/python3 && echo /usr/bin/python3 || echo $(PYTHON))
GLANCE_VENV   := .glance-venv

$(GLANCE_VENV)/.installed: constraints-glance.txt pyproject.toml
	rm -rf $(GLANCE_VENV)
	$(GLANCE_PYTHON) -m venv $(GLANCE_VENV)
	$(GLANCE_VENV)/bin/pip install -q -c constraints-glance.txt glance==33.0.0 pyuwsgi PyMySQL -e .
	touch $@

glance-venv: system-deps glance-deps $(GLANCE_VENV)/.installed

demo: setup
	@mkdir -p var
	@echo "convd demo: drop disk images into $(CURDIR)/var/incoming/"
	@echo "            results appear in $(CURDIR)/var/outgoing/ (rejects in var/failed/)"
	@echo "            e.g.  qemu-img create -f qcow2 /tmp/x.qcow2 64M && mv /tmp/x.qcow2 var/incoming/"
	@echo "            Ctrl-C stops the daemon."
	$(BIN)/convd run -c $(CONFIG)

# ruff and mypy as pyproject.toml configures them; a finding fails the build
# before any test runs.
lint: setup
	$(BIN)/ruff check .
	$(BIN)/mypy

# Every package the tests need, missing ones in one apt-get (an `apt-get
# update` and a dpkg run each cost tens of seconds on a fresh machine); the
# three lists' own targets then find nothing to do.
test-deps:
	@missing=""; \
	for pair in qemu-img:qemu-utils qemu-io:qemu-utils systemd-analyze:systemd $(SHAREDFS_TOOLS) $(GLANCE_TOOLS); do \
	  PATH="$$PATH:/usr/sbin:/sbin" command -v $${pair%%:*} >/dev/null 2>&1 || missing="$$missing $${pair#*:}"; \
	done; \
	ls /usr/lib/*/qemu/block-rbd.so >/dev/null 2>&1 || missing="$$missing qemu-block-extra"; \
	if [ -n "$$missing" ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "installing:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$(echo $$missing | tr ' ' '\n' | sort -u); \
	fi

# The suite on several pytest-xdist workers: most of its time is spent
# waiting (for daemons, Glance, Ceph, a User-Mode Linux guest), so more
# workers than cores; tests that share one server are grouped
# (tests/conftest.py, `--dist loadgroup`).  TEST_WORKERS=0 runs it in one process.
TEST_WORKERS ?= 4
PYTEST := $(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadgroup

# The two virtualenvs are built side by side (make -j2), after the packages.
test: test-deps
	@$(MAKE) --no-print-directory -j2 setup glance-venv
	@$(MAKE) --no-print-directory sharedfs-deps lint
	$(PYTEST) tests

test-fast: test-deps
	@$(MAKE) --no-print-directory -j2 setup glance-venv
	@$(MAKE) --no-print-directory lint
	$(PYTEST) tests -m "not slow"

bench: setup glance-venv sharedfs-deps
	$(BIN)/python -m bench
	$(BIN)/python -m bench --rbd

# Throughput of 1, 2 and 3 daemons on one CephFS spool, and the take-over time after a kill.
bench-shared: setup sharedfs-deps
	$(BIN)/python -m bench --shared

clean:
	rm -rf $(VENV) $(GLANCE_VENV) var .pytest_cache .ruff_cache .mypy_cache
