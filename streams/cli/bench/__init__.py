"""The benchmarks (`inflow bench ...`, `inflow batch-bench`): operator tooling, never the worker."""
