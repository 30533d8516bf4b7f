# The two commands a newcomer runs: `make demo` and `make test`. Both set everything up first.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
NATIVE := $(wildcard csrc/*.h csrc/cpu/*.cpp csrc/cpu/*.h csrc/cuda/*.cu csrc/cuda/*.cuh csrc/cuda/*.h csrc/cuda/*.cpp)

.PHONY: all install test test-fast demo bench bench-quick clean

all: install

$(VENV)/.deps: requirements-dev.txt
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -r requirements-dev.txt
	touch $@

# Rebuilds the C++/CUDA extensions whenever a native source changes.
$(VENV)/.built: $(VENV)/.deps setup.py pyproject.toml $(NATIVE)
	$(PIP) install -q --no-build-isolation --no-deps -e .
	@$(PY) -c "from pymerge import _native as n; n.cpu is None and print('pymerge: warning: the C++ extension was not built (no C++17 compiler?): CPU ops run as eager torch, slower; install g++ and make clean install')"
	touch $@

install: $(VENV)/.built

# two test processes (pytest-xdist), a test file each at a time (a module's fixtures are made once): most tests
# run on one core, and the suite took 31 min on a 2-core machine run one after another. TEST_JOBS=0 runs them in
# this process. Files go out in the order tests/conftest.py sorts them (the longest first).
TEST_JOBS ?= 2

test: install
	$(PY) -m pytest -q -p no:cacheprovider -n $(TEST_JOBS) --dist loadfile --no-loadscope-reorder tests

test-fast: install
	$(PY) -m pytest -q -x -p no:cacheprovider -m "not slow" tests

demo: install
	$(PY) -m pymerge demo

bench: install
	$(PY) benchmarks/bench_weighted_sum.py

bench-quick: install
	$(PY) benchmarks/bench_weighted_sum.py --quick

clean:
	rm -rf build dist *.egg-info pymerge/*.so pymerge/*.so.build $(VENV)
