"""Benchmarks: a harness (run.py), one file per task (tasks/), perplexity, scoring helpers."""
