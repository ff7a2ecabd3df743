# The two quick-start commands (README.md, docs/getting_started.md): `make demo` and `make test`.
PYTHON ?= python3
PIP := $(PYTHON) -m pip

.PHONY: demo test test-fast lint bench

demo:  ## install mmfm and train the demo model (about a minute on 2 idle CPU cores)
	$(PIP) install -e .
	$(PYTHON) -m mmfm train launch/demo.yaml

# Test processes (pytest-xdist). --dist loadgroup spreads the tests one by one over the
# workers, except a file marked `pytestmark = pytest.mark.xdist_group(...)`: it stays on one
# worker, so its expensive module fixtures (the SLURM cluster of tests/e2e/test_slurm.py, a
# shared training run) are built once.
TEST_WORKERS ?= 2
# One torch thread per test process: each worker's torch otherwise starts a thread per core,
# and two workers (plus the ranks and loader workers they start) oversubscribe 2 cores (the
# visual tokenizer fixture: 77 s at the default threads, 41 s at one, on the same loaded cores;
# generating a 140-token video in test_generate_cli.py: 51 s against 6 s).
TEST_ENV := OMP_NUM_THREADS=1

test:  ## install the test dependencies, check lint/format, run the whole suite
	$(PIP) install -e ".[test]"
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .
	$(TEST_ENV) $(PYTHON) -m pytest -q -n $(TEST_WORKERS) --dist loadgroup tests

test-fast:  ## the quick tier: unit and security tests without the slow ones (under 3 minutes)
	$(TEST_ENV) $(PYTHON) -m pytest -q -n $(TEST_WORKERS) --dist loadgroup -m "not slow and not gpu" tests/unit tests/security

lint:  ## lint and format check only
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .

bench:  ## the benchmarks whose results are recorded in bench/README.md
	$(PYTHON) bench/attention.py
	$(PYTHON) bench/mot_step.py
	$(PYTHON) bench/memory_per_rank.py
	$(PYTHON) bench/ring_attention.py
	$(PYTHON) bench/tokenization.py
	$(PYTHON) bench/loader.py
	$(PYTHON) bench/convert.py
	$(PYTHON) bench/visual_tokenizers.py
	$(PYTHON) bench/train_step.py --json bench/results/train_step.json
	$(PYTHON) bench/cross_entropy.py
	$(PYTHON) bench/generate.py --json bench/results/generate.json
