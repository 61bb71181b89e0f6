"""Benchmarks: each compares llmp against a reference measured in the same run and prints ratios."""
