"""The benchmarks, run as ``python -m benchmarks.<name>`` from the repository root; results in benchmarks/results/."""
