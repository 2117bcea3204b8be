# One-command set-up on a fresh machine: `make demo` or `make test` creates the virtualenv, installs torch,
# the project (editable, with test extras) and converts the default model, then runs.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# A CPU build of torch; on a GPU host use e.g.  make TORCH_INDEX=--index-url=https://download.pytorch.org/whl/cu128
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
STAMP := $(VENV)/.installed
MODEL ?= smollm2-135m
PYTEST_ARGS ?=

.PHONY: install model demo lint test test-fast bench docker-test clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_INDEX) "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

install: $(STAMP)

model: $(STAMP)
	$(VENV)/bin/swarm-peer fetch --model $(MODEL)

demo: model
	$(PY) examples/local_swarm.py

lint: $(STAMP)
	$(VENV)/bin/ruff check swarm peers reputation apps benchmarks examples tests
	$(VENV)/bin/lint-imports

# Two pytest workers, each taking whole test files (a file's swarm fixtures stay in one process): most of a live
# test's time is spent waiting on peers, so two at once fit 2 cores. TEST_WORKERS=0 runs in one process.
# The NAT tests run in a pytest process of their own: a client they build inside a network namespace leaves the
# process unable to start further DHT nodes ("Broken pipe"). Exit status 5 = those arguments selected no test.
# Files go to the workers in collection order, longest first (tests/conftest.py), not ordered by how many tests
# they hold (xdist's default), which left the long one-test files to the end.
# The tests start many peers on this one machine, and like any peers that share a machine each takes a share of
# the cores: one torch thread (`swarm-peer join --num-threads`, read from $SWARM_NUM_THREADS).
TEST_WORKERS ?= 2
TEST_PEER_THREADS ?= 1
test: model lint
	SWARM_NUM_THREADS=$(TEST_PEER_THREADS) $(PY) -m pytest -m "not netns" -n $(TEST_WORKERS) --dist loadfile \
		--no-loadscope-reorder $(PYTEST_ARGS)
	SWARM_NUM_THREADS=$(TEST_PEER_THREADS) $(PY) -m pytest -m netns $(PYTEST_ARGS) || [ $$? -eq 5 ]

test-fast: model
	SWARM_NUM_THREADS=$(TEST_PEER_THREADS) $(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

bench: model
	$(PY) benchmarks/decode_speed.py

# Builds the Docker image, runs docker/compose.yaml (bootstrap + 3 peers) and checks it from this host;
# installs and starts the Docker engine if needed (as root), removes everything it made afterwards.
docker-test: model
	PY=$(PY) bash docker/test.sh

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
