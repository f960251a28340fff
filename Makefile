# Two entry points for a fresh machine: `make demo` (the main job) and `make test`.
# Each sets up what it needs first; both are idempotent.
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install -q --disable-pip-version-check

.PHONY: demo test setup setup-test system-packages clean

$(VENV)/.runtime: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) -e '.[cpu]'
	touch $@

# torch is pinned to 2.13.0 (see pyproject.toml); aisfx carries the built-in CNN's weights and
# pins an old numpy, hence --no-deps.
$(VENV)/.test: $(VENV)/.runtime
	$(PIP) -e '.[cpu,export,test,opcua,sparkplug,web]'
	# Sparkplug B payloads; it pins paho-mqtt<2 for its own client, which we do not use (see pyproject.toml).
	$(PIP) --no-deps pysparkplug==0.6.1
	$(PIP) --no-deps aisfx==0.1.2
	# An independent BEATs implementation (ESPnet), for parity tests only; its torchaudio
	# dependency is not installable beside torch 2.13 and is stubbed by the test.
	$(PIP) --no-deps openbeats==0.1.1
	# The official Dasheng package, for the parity test against it (its torchaudio import is stubbed).
	$(PIP) --no-deps dasheng==0.0.9 einops==0.8.2
	touch $@

setup: $(VENV)/.runtime
setup-test: $(VENV)/.test

system-packages:
	scripts/system-packages.sh

demo: $(VENV)/.runtime
	$(VENV)/bin/asd-monitor demo

test: system-packages $(VENV)/.test
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) build *.egg-info
