# Quick start: `make bench` and `make test` each set up .venv (torch, triton, mmkernels with its compiled
# extension) on a fresh machine, then run. Re-running skips set-up unless the build inputs changed.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
export CUDA_HOME ?= $(shell [ -x /usr/local/cuda/bin/nvcc ] && echo /usr/local/cuda)
STAMP := $(VENV)/.mmkernels-installed
BUILD_INPUTS := Makefile setup.py pyproject.toml $(shell find csrc -name '*.cpp' -o -name '*.cu' -o -name '*.h' 2>/dev/null)
PYTEST_ARGS ?=
# transformers: `make install` pins this tested release, so a fresh clone gets what the tests were run against (the
# supported range is declared in pyproject.toml's `hf` extra; docs/integrations/hf.md lists the releases that pass).
TRANSFORMERS_PIN := 5.25.0
# `make test-compat TRANSFORMERS=5.17.0`: the integration and converter tests against another release, installed in
# its own small overlay venv (build/compat/transformers-<v>: only what differs from .venv; .venv is not touched).
TRANSFORMERS ?= $(TRANSFORMERS_PIN)
COMPAT_DIR = build/compat/transformers-$(TRANSFORMERS)
COMPAT_TESTS ?= $(shell grep -rl "transformers" tests --include='test_*.py' | sort)

.PHONY: install bench test test-gpu test-compat check-triton lint format clean

install: $(STAMP)

$(STAMP): $(BUILD_INPUTS)
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "torch>=2.11" "numpy" "setuptools>=64" wheel ninja
	@echo "building mmkernels (C++ CPU + CUDA sources; log: $(VENV)/build.log)"
	@$(PY) -m pip install -v --no-build-isolation -e ".[dev,bench,hf]" "transformers==$(TRANSFORMERS_PIN)" \
		> $(VENV)/build.log 2>&1 \
		|| { tail -n 60 $(VENV)/build.log; echo "build failed: full log in $(VENV)/build.log"; exit 1; }
	@grep -F "[mmkernels build]" $(VENV)/build.log | sed 's/^ *//' || true
	$(PY) -m mmkernels.info --brief
	@touch $@

bench: install
	$(VENV)/bin/mmkernels-bench --quick --out bench-out

test: install
	$(PY) -m pytest tests $(PYTEST_ARGS)

# The overlay venv uses the same interpreter as .venv and sees .venv's packages and this checkout's mmkernels through a
# .pth file (subprocesses too); pip installs into it only what this release needs differently (transformers itself,
# e.g. an older huggingface_hub).
test-compat: install
	@if [ ! -f $(COMPAT_DIR)/.ready ]; then \
		echo "setting up $(COMPAT_DIR)"; rm -rf $(COMPAT_DIR) && \
		"$$($(PY) -c 'import sys; print(sys._base_executable)')" -m venv $(COMPAT_DIR) && \
		{ $(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])'; echo "$(CURDIR)"; } \
			> "$$($(COMPAT_DIR)/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/zz-mmkernels-venv.pth" && \
		$(COMPAT_DIR)/bin/python -m pip install -q "transformers==$(TRANSFORMERS)" && touch $(COMPAT_DIR)/.ready; \
	fi
	@$(COMPAT_DIR)/bin/python -c 'import transformers, mmkernels; print("transformers", transformers.__version__)'
	$(COMPAT_DIR)/bin/python -m pytest $(COMPAT_TESTS) $(PYTEST_ARGS)

test-gpu: install
	$(PY) -m pytest tests benchmarks -m gpu $(PYTEST_ARGS)

# Compile every Triton kernel, at the block sizes its launcher picks on a GPU, for real targets with Triton's own
# compiler (catches what the CPU interpreter cannot: tl.dot shape rules, types, shared memory over the limit), and
# report registers / spills / shared memory per (kernel, dtype, config, arch) in build/triton-spills.{md,jsonl}.
# Fails when a default config spills. `make check-triton SPILL_DOCS=docs/performance.md` also regenerates the table
# in the docs.
TRITON_ARCHS ?= 80,90
SPILL_DOCS ?=
check-triton: install
	@mkdir -p build
	TRITON_INTERPRET=1 $(PY) tests/triton_launches.py build/triton-gpu-launches.jsonl
	env -u TRITON_INTERPRET $(PY) tests/triton_gpu_compile.py build/triton-gpu-launches.jsonl --archs $(TRITON_ARCHS) \
		--report build/triton-spills.md --json build/triton-spills.jsonl $(if $(SPILL_DOCS),--write-docs $(SPILL_DOCS))

lint: install
	$(VENV)/bin/ruff check .

format: install
	$(VENV)/bin/ruff format .

clean:
	rm -rf build $(VENV) mmkernels/_C*.so mmkernels/_build_info.py bench-out
