"""Making runs: specs, training, the runner, checkpoints, records, measurement and benchmarks.

In full: run specs, the training loop, the runner and its claims, checkpoints, run records, the
fixed measurement protocol, DDP, the study's population and the benchmarks.

Builds on :mod:`flatness.experiments.world`; imports nothing from :mod:`flatness.experiments.reporting`.
"""
