# Every target creates or reuses .venv in the project root and installs what it needs.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export RAY_USAGE_STATS_ENABLED=0
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
export RAY_AUTH_MODE=disabled
export RAY_DEDUP_LOGS=0
export RAY_TRAIN_ENABLE_PRINT_PATCH=0
export HF_HUB_OFFLINE=1
export TOKENIZERS_PARALLELISM=false
export TORCH_EXTENSIONS_DIR ?= $(HOME)/.cache/cbd_ray/torch_extensions

.PHONY: install demo test bench clean-venv

$(STAMP): pyproject.toml requirements-cpu.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# CPU wheel of torch first: an unpinned torch would pull a multi-GB CUDA build.
	if command -v nvidia-smi >/dev/null 2>&1; then $(BIN)/pip install -q torch; \
	else $(BIN)/pip install -q torch==2.13.0; fi
	$(BIN)/pip install -q -r requirements-cpu.txt
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python jobs/build_chain.py --config configs/demo.yaml

# Two xdist workers: one runs every test that needs Ray, the other the rest (tests/conftest.py).
test: $(STAMP)
	$(BIN)/python -m pytest -q -x --timeout=900 -n 2 --dist loadgroup --durations=25 tests

bench: $(STAMP)
	$(BIN)/python bench/interpolate.py

clean-venv:
	rm -rf $(VENV)
