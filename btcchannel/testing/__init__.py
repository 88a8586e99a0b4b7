"""Helpers that tests, benchmarks and the demo share, and the pytest plugin."""
