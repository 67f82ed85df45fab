"""Helpers every stage uses: check the job's paths, load the configured model and facts."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from core.paths import optional_dir, writable_dir
from models.load import LoadedModel, load_model


def check_paths(cfg: DictConfig) -> None:
    """The job's ``paths`` have the right kind before any work starts.

    ``paths.cache_dir`` and ``paths.output_dir`` must be (or become) directories; ``paths.data_dir``
    may be absent (the bundled copies are used) but never a file, which would silently mean the
    same. (``dataset.path`` is checked by ``facts.load_facts``, which stages call before the model.)
    """
    writable_dir("paths.cache_dir", cfg.paths.cache_dir)
    writable_dir("paths.output_dir", cfg.paths.output_dir)
    optional_dir("paths.data_dir", cfg.paths.data_dir)


def load_configured_model(cfg: DictConfig) -> LoadedModel:
    check_paths(cfg)  # before the load (stages that read facts have checked them already)
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
