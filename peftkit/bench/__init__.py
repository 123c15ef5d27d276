"""Benchmarks run by ``peftkit bench``: the persona table (seed 001) and many experts vs one at a time."""
