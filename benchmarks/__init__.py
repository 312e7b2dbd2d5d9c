"""Benchmarks: `python -m benchmarks NAME`. Each measures our code against a peer in the same run, as ratios."""
