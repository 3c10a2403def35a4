# offrl: two set-up commands, `make quickstart` and `make test`.
PY ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.offrl-installed

.PHONY: quickstart test bench install system clean

# System packages (Vulkan for SAPIEN); idempotent, quick when already done.
system:
	bash scripts/setup_system.sh

# Python environment: torch's CPU wheel first where the package index has it (avoids several GB
# of CUDA wheels), then the project with its test extras.
$(STAMP): pyproject.toml
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q "torch==2.13.0" || echo "[offrl setup] torch 2.13.0 CPU wheel not available; pip resolves torch from pyproject.toml"
	$(VPY) -m pip install -q -e ".[test]"
	touch $(STAMP)

install: system $(STAMP)

quickstart: install
	bash scripts/quickstart.sh

test: install
	$(VPY) -m pytest -q -ra tests

bench: install
	$(VPY) bench/sim_throughput.py
	$(VPY) bench/loop_efficiency.py

clean:
	rm -rf $(VENV) runs
