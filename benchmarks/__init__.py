"""Privacy-budget and efficiency benchmarks, run from the repository root as ``python -m benchmarks.NAME``;
their committed results are in ``benchmarks/results/``."""
