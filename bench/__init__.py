"""The benchmarks (bench/README.md). Each is a script (`python bench/<name>.py`); the package
lets tests import one (`from bench.step_syncs import measure`), with the repo root on
pytest's pythonpath."""
