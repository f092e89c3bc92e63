"""Benchmarks (``make bench``): ratios measured side by side in one run, never timed unit tests.

Not collected by pytest (``norecursedirs``). Each scenario makes its own data in a temporary
folder, starts its own sandbox on 127.0.0.1 and prints one table row: scenario, figure, target,
pass/fail. ``python -m tests.benchmarks`` exits 1 when a target is missed.
"""
