"""Benchmarks of avalanche-m2kd: the side-by-side runner (``python -m
benchmarks.compare``) and the speed benchmark (``python -m benchmarks.studies.speed``).
They use only the library's public API and Avalanche."""
