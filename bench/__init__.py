"""Benchmarks: ``bench/harness`` is the package behind ``csmf bench`` and the shared harness of
the scripts beside it (``python bench/<name>.py``); ``bench/results`` holds their latest results."""
