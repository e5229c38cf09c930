# The two commands a new user runs are `make demo` and `make test`; both set everything up.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test proto clean

install: $(STAMP)

# torch 2.14.1 / torchvision 0.29.1 are pinned in pyproject.toml (the pair that imports on CPU here).
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: install
	$(VENV)/bin/fedfms-secure demo --out demo-out

test: install
	$(VENV)/bin/pytest -q

# Regenerate the committed gRPC/protobuf code from proto/ (needs the test extra's pinned grpcio-tools).
proto: install
	$(PY) -m fedfms_secure.transport.codegen

clean:
	rm -rf $(VENV) demo-out
