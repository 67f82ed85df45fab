"""Helpers every stage uses: load the configured model and facts."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from models.load import LoadedModel, load_model


def load_configured_model(cfg: DictConfig) -> LoadedModel:
    return load_model(OmegaConf.to_object(cfg.model), cache_dir=cfg.paths.cache_dir)


def load_configured_facts(cfg: DictConfig, dataset=None):
    """Facts of ``cfg.dataset`` (or of another ``DatasetConfig``, e.g. the full stage's trace dataset)."""
    from facts import load_facts

    data_dir = Path(cfg.paths.data_dir) if cfg.paths.data_dir else None
    dataset = OmegaConf.to_object(cfg.dataset) if dataset is None else dataset
    return load_facts(dataset, data_dir=data_dir, cache_dir=cfg.paths.cache_dir)
