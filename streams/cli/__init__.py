"""Operator tooling: the `inflow` console script and its commands (dev services, produce,
search, topics, engine registry, demo, benches). The deployable worker is `streams.worker`
and the modules it wires; nothing here is imported by it."""
