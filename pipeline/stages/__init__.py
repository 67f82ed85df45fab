"""Stages: ``run(cfg, job_dir, logger) -> dict``, thin wrappers over library functions."""
