# Every set-up step lives here: `make demo` and `make test` work on a fresh Debian 12 machine as root.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
# Debian's python3 sees python3-nftables (the libnftables binding, not on PyPI): the venv inherits it.
SYSPY := /usr/bin/python3
# procps: sysctl for the tests, and /bin/kill, which the systemd unit's ExecReload runs (a minbase Debian lacks it).
# podman and busybox-static: the tests run containers (a busybox rootfs, no registry) on the shipped CNI conflist.
APT_PACKAGES := nftables python3-nftables python3-venv iproute2 iptables util-linux prometheus containernetworking-plugins systemd libcap2-bin procps podman busybox-static
STAMP := $(VENV)/.installed
# import-linter lives in a venv of its own: it pulls in `rich`, and structlog's console renderer imports rich
# whenever it is importable (about 50 ms of every agent start). Kept out of .venv, the agent that `make test`
# and `make bench` start is the one users get.
LINT_VENV := .venv-lint
LINT_STAMP := $(LINT_VENV)/.installed

.PHONY: all deps venv test unit integration lint demo bench clean docs golden image-test fuzz soak

all: test

deps:
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi

$(STAMP): pyproject.toml constraints-dev.txt | deps
	$(SYSPY) -m venv --system-site-packages $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints-dev.txt -e '.[dev]'
	@$(PY) -c 'import nftables' || { echo "libnftables binding not importable from $(VENV)"; exit 1; }
	touch $@

venv: deps $(STAMP)

$(LINT_STAMP): constraints-lint.txt | deps
	$(SYSPY) -m venv $(LINT_VENV)
	$(LINT_VENV)/bin/python -m pip install -q --upgrade pip
	$(LINT_VENV)/bin/python -m pip install -q -c constraints-lint.txt import-linter
	touch $@

lint: venv $(LINT_STAMP)
	$(VENV)/bin/ruff check daemon tests
	$(VENV)/bin/mypy
	PYTHONPATH=daemon $(LINT_VENV)/bin/lint-imports

unit: venv
	$(VENV)/bin/pytest -q tests/unit

test: venv lint
	$(VENV)/bin/pytest -q -p no:cacheprovider tests

# 10x the CI budget of the config fuzz (100,000+ examples), with fresh randomness instead of a fixed seed.
fuzz: venv
	FUZZ_PROFILE=fuzz FUZZ_EXAMPLES=10 $(VENV)/bin/pytest -q -p no:cacheprovider --hypothesis-show-statistics \
	  tests/unit/config/test_fuzz_config.py tests/unit/cli/test_fuzz_cni.py tests/integration/ruleset/test_hardening_fuzz_nft.py \
	  tests/integration/ruleset/test_explain_kernel.py

# The full counts (about 10 minutes, not in CI): interception gap through 1,000 reloads,
# 20 restarts and 1,000 drifts; 100,000 applies and scrapes with the agent's RSS/fds/threads slopes.
# Exits non-zero on any bypass outside drift, repairs over their goals or a growing slope (tests/soak.py).
soak: venv
	$(PY) tests/soak.py

demo: venv
	$(PY) tests/demo.py

# The benchmarks compile their load generator (gcc); tests/bench/bench.py lists the knobs (BENCH_ONLY, ...).
# The processes they start (interceptd, istio-iptables, interceptd-cni, the agents) are an installed copy laid
# out as config/container/install.sh lays out the image: a venv on Debian's python3, a regular (not editable)
# install with its bytecode, no pip or setuptools. The development venv starts each process about 1 ms later
# (setuptools' .pth hook, the editable path, the dev tools' packages on sys.path): not what users run.
# The in-process rows run in the development venv, the benchmark driver's own.
BENCH_VENV := .venv-bench
BENCH_STAMP := $(BENCH_VENV)/.installed
$(BENCH_STAMP): pyproject.toml config/container/constraints.txt $(shell find daemon -name '*.py') | deps
	rm -rf $(BENCH_VENV)
	$(SYSPY) -m venv --system-site-packages $(BENCH_VENV)
	work=$$(mktemp -d) && cp -R pyproject.toml README.md daemon "$$work/" && \
	  find "$$work" \( -name __pycache__ -o -name '*.egg-info' \) -prune -exec rm -rf {} + && \
	  $(BENCH_VENV)/bin/pip install -q --disable-pip-version-check -c config/container/constraints.txt "$$work" && \
	  rm -rf "$$work"
	$(BENCH_VENV)/bin/python -m pip uninstall -q -y pip setuptools
	touch $@

bench: venv $(BENCH_STAMP)
	@$(MAKE) --no-print-directory deps APT_PACKAGES="gcc libc6-dev iptables"
	$(PY) -m compileall -q daemon/interceptd >/dev/null
	INTERCEPTD_BIN_DIR=$(CURDIR)/$(BENCH_VENV)/bin PYTHONPATH=tests $(PY) tests/bench/bench.py

# Regenerate config/interceptd.toml and README.md's reference from the option table and the CLI's parser.
docs: venv
	$(PY) -m interceptd.cli.docs write .

# Regenerate tests/golden/*.nft (the nft text of every golden configuration) after a deliberate rule change;
# review `git diff tests/golden` before committing.
golden: venv
	$(PY) -m interceptd.cli.golden write .

# The Containerfile's install steps on a debootstrap'd Debian 12 root (no container engine runs here).
# The base root is cached in $(IMAGE_TEST_CACHE); delete it to start cold.
IMAGE_TEST_CACHE := .cache/image-test
image-test: venv
	$(VENV)/bin/hadolint Containerfile
	@command -v debootstrap >/dev/null || { apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null; }
	tests/image/image-test.sh $(IMAGE_TEST_CACHE)

clean:
	rm -rf $(VENV) $(LINT_VENV) $(BENCH_VENV) build *.egg-info daemon/*.egg-info
