"""Hydra entry point and stages. ``python -m pipeline.run`` runs one job or a multirun sweep."""
