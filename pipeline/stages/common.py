"""Helpers every stage uses: check the job's paths, load the configured model and facts."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from core.errors import DataError
from core.paths import existing_file, optional_dir, writable_dir
from models.load import LoadedModel, load_model


def check_paths(cfg: DictConfig) -> None:
    """Every user-given path of the job has the right kind (dir or file) before any work starts.

    ``paths.cache_dir`` and ``paths.output_dir`` must be (or become) directories; ``paths.data_dir``
    may be absent (the bundled copies are used) but never a file, which would silently mean the
    same; ``dataset.path`` (and the full stage's ``trace_dataset.path``) must be files.
    """
    writable_dir("paths.cache_dir", cfg.paths.cache_dir)
    writable_dir("paths.output_dir", cfg.paths.output_dir)
    optional_dir("paths.data_dir", cfg.paths.data_dir)
    for key, dataset in (("dataset", cfg.get("dataset")), ("stage.trace_dataset", cfg.stage.get("trace_dataset"))):
        if dataset is not None and not OmegaConf.is_missing(dataset, "path") and dataset.get("path"):
            existing_file(f"{key}.path", dataset.path, DataError, f"point {key}.path at the data file itself")


def load_configured_model(cfg: DictConfig) -> LoadedModel:
    check_paths(cfg)  # the model load is every stage's first piece of work
    return load_model(OmegaConf.to_object(cfg.model), cache_dir=cfg.paths.cache_dir)


def load_configured_facts(cfg: DictConfig, dataset=None):
    """Facts of ``cfg.dataset`` (or of another ``DatasetConfig``, e.g. the full stage's trace dataset)."""
    from facts import load_facts

    check_paths(cfg)
    data_dir = Path(cfg.paths.data_dir) if cfg.paths.data_dir else None
    dataset = OmegaConf.to_object(cfg.dataset) if dataset is None else dataset
    return load_facts(dataset, data_dir=data_dir, cache_dir=cfg.paths.cache_dir)


def with_load_summary(results: dict, facts) -> dict:
    """``results`` plus the load's counts (``n_read``, ``n_loaded``, ``n_skipped``, ``skip_reasons``).

    A non-strict load skips malformed records; results.json says how many and why, so a short
    run is never mistaken for a complete one. Counts a stage adds itself (e.g. facts refused
    before tracing) are added to the load's.
    """
    load = facts.report.summary()
    own = results.get("skip_reasons", {})
    reasons = dict(load["skip_reasons"])
    for reason, count in own.items():
        reasons[reason] = reasons.get(reason, 0) + count
    return {**results, **load, "n_skipped": load["n_skipped"] + results.get("n_skipped", 0), "skip_reasons": reasons}
