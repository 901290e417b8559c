# The README's commands: `make demo` and `make test` work on a fresh machine.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test lint typecheck pytest bench bench-table bench-list reliability clean system-deps

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

# mosquitto is the broker the integration tests start on a free port; rsyslog is the
# SOC collector they start the same way (no system service: their own config, a free port).
# As root, `diode bench link` also uses nftables (counts and drops the link's datagrams) and
# ethtool (loopback's UDP segmentation offload off for a run, so each datagram drops alone).
system-deps:
	@if ! command -v mosquitto >/dev/null 2>&1 && ! test -x /usr/sbin/mosquitto; then \
		if [ "$$(id -u)" = 0 ]; then \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mosquitto mosquitto-clients; \
		else \
			echo "mosquitto is missing: install it (apt-get install mosquitto mosquitto-clients)" >&2; exit 1; \
		fi; \
	fi
	@if ! command -v rsyslogd >/dev/null 2>&1 && ! test -x /usr/sbin/rsyslogd; then \
		if [ "$$(id -u)" = 0 ]; then \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends rsyslog; \
		else \
			echo "rsyslog is missing: install it (apt-get install rsyslog)" >&2; exit 1; \
		fi; \
	fi
	@command -v logger >/dev/null 2>&1 || { echo "logger is missing: install util-linux (bsdutils)" >&2; exit 1; }
	@if [ "$$(id -u)" = 0 ] && ! { command -v nft && command -v ethtool; } >/dev/null 2>&1; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends nftables ethtool; \
	fi

demo: $(STAMP)
	$(BIN)/diode demo $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check diode transmitter receiver tests
	$(BIN)/ruff format --check diode transmitter receiver tests

typecheck: $(STAMP)
	$(BIN)/mypy

pytest: $(STAMP) system-deps
	$(BIN)/pytest -q $(PYTEST_ARGS)

test: lint typecheck pytest

# The runs of record (docs/BENCHMARKS.md): every figure the document quotes, medians of
# ROUNDS repeats, one table against the targets. RUNS picks groups or runs (tags, link,
# files, syslog, restart, codec; tags-10k ...); WRAP runs each repeat under a command
# (tools/benchrun on a shared host); DAEMONS=TREE measures another tree's daemons.
# `make bench-list` says what each run is and how long it takes.
RUNS    ?= all
ROUNDS  ?= 3
RESULTS ?= bench-results.jsonl
bench: $(STAMP) system-deps
	$(BIN)/python -m diode.benchmarks.record --runs '$(RUNS)' --rounds $(ROUNDS) \
		--results '$(RESULTS)' $(if $(WRAP),--wrap '$(WRAP)') $(if $(DAEMONS),--daemons '$(DAEMONS)') \
		$(if $(LABEL),--label '$(LABEL)')

bench-table: $(STAMP)
	$(BIN)/python -m diode.benchmarks.record --table --runs '$(RUNS)' --rounds $(ROUNDS) \
		--results '$(RESULTS)' $(if $(DAEMONS),--daemons '$(DAEMONS)') $(if $(LABEL),--label '$(LABEL)')

bench-list: $(STAMP)
	$(BIN)/python -m diode.benchmarks.record --list --runs '$(RUNS)'

# The fault suite's figures: every scenario, then a 60 s atheris run; rewrites docs/RELIABILITY.md.
reliability: $(STAMP) system-deps
	$(BIN)/python -m pip install --quiet 'atheris>=2.3,<4' || echo "atheris unavailable: fuzzing skipped" >&2
	$(BIN)/python -m tests.faults.report

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache .hypothesis
