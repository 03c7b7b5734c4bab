"""ngbench runners: the Hydra entry point, the training loop, run records, W&B mirroring,
reports, benchmarks and the ``ngbench`` command."""
