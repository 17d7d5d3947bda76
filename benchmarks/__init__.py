"""Benchmark scripts (run as ``python benchmarks/<name>.py``) and their shared harness.

A package so that tests can import ``benchmarks._harness`` and ``benchmarks.models``.
"""
