# ztagent — see README.md. `make run` and `make test` work on a fresh machine.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin
CONFIG ?= ztagent.toml
PROTO_FILES := $(shell find proto -name '*.proto')

.PHONY: run test lint proto certs venv deps clean bench model soak

$(VENV)/.installed: pyproject.toml
	@bash .ci/system-deps.sh
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev,inference]'
	# Real OPA (Go rego as a c-shared library) for the tests' OPA-REST stand-in. Its metadata
	# says Python >= 3.14, but it works on 3.11 (see ../shared/NOTES.md).
	$(PY) -m pip install -q --no-deps --ignore-requires-python opa-golib-python-bindings==0.4.4
	@touch $@

venv: $(VENV)/.installed

certs-dev/root-ca.pem: | $(VENV)/.installed
	$(BIN)/ztagent ca init --dir certs-dev

certs: $(VENV)/.installed
	$(BIN)/ztagent ca init --dir certs-dev --force

MODEL := var/models/vibration-anomaly.manifest.json

# The shipped anomaly classifier: trained on synthetic sensor data from ztagent's own code.
$(MODEL): | $(VENV)/.installed
	$(PY) -m ztagent.workloads.inference.train --out var/models --seed 0

model: $(VENV)/.installed
	$(PY) -m ztagent.workloads.inference.train --out var/models --seed 0

run: $(VENV)/.installed certs-dev/root-ca.pem $(MODEL)
	$(BIN)/ztagent demo --config $(CONFIG)

lint: $(VENV)/.installed
	$(BIN)/ruff check ztagent tests bench soak
	$(BIN)/ruff format --check ztagent tests bench soak
	$(BIN)/mypy

test: lint
	$(BIN)/pytest -q

# Regenerates ztagent/_proto from proto/ (committed; never edit the output by hand).
proto: $(VENV)/.installed
	rm -rf ztagent/_proto && mkdir -p ztagent/_proto
	PATH="$(abspath $(BIN)):$$PATH" $(PY) -m grpc_tools.protoc -I proto/ztagent --python_out=ztagent/_proto \
	  --grpc_python_out=ztagent/_proto --mypy_out=ztagent/_proto --mypy_grpc_out=ztagent/_proto \
	  $(patsubst proto/ztagent/%,%,$(PROTO_FILES))
	# protoc imports siblings by proto path; make them package-relative to ztagent._proto.
	find ztagent/_proto -name '*.py*' -exec sed -i -E \
	  's/^from (workloads|v1)(\.| )/from ztagent._proto.\1\2/; s/^import (workloads|v1)\./import ztagent._proto.\1./' {} +
	find ztagent/_proto -type d -exec touch {}/__init__.py \;

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache

# Benchmarks (not part of `make test`): starts the real stack, writes bench/results.md.
bench: $(VENV)/.installed certs-dev/root-ca.pem
	$(PY) -m bench.run

# Soak (not part of `make test`): the whole stack for SOAK_S seconds (default 3600) under mixed
# traffic and a fault schedule, checked by an oracle; exit 1 on a wrong decision, a loss or a
# leak. Report printed and written to bench/soak.md. See README "Reliability".
SOAK_S ?= 3600
soak: $(VENV)/.installed
	SOAK_S=$(SOAK_S) $(PY) -m soak.run --out bench/soak.md
