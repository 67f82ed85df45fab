"""Typed schema of the ``dataset`` config group (registered by the pipeline as ``dataset_schema``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from core.errors import ConfigError

DATASET_NAMES = ("known", "counterfact", "counterfact_relation", "user")
SPLITS = ("edit", "train", "val", "all")
FORMATS = ("auto", "mend", "rome", "known", "jsonl")


@dataclass
class DatasetConfig:
    """Which facts to load.

    ``path`` overrides the data dir and the bundle; ``split`` picks a CounterFact split (MEND
    files, or the same case ids out of ROME's full file); ``limit`` keeps the first N records of
    the split; ``strict`` raises on the first malformed record instead of skipping it;
    ``download`` allows fetching ROME's ``counterfact.json`` into the cache dir; ``format`` is
    ``auto`` (detected from the first record) or forced.
    """

    name: str
    path: Optional[str] = None
    split: str = "edit"
    limit: Optional[int] = None
    strict: bool = False
    download: bool = False
    format: str = "auto"

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        _choice("dataset.name", self.name, DATASET_NAMES)
        _choice("dataset.split", self.split, SPLITS)
        _choice("dataset.format", self.format, FORMATS)
        if self.limit is not None and self.limit < 0:
            raise ConfigError("dataset.limit", self.limit, "must be >= 0 or null", "use null for all records")
        if self.name == "user" and not self.path:
            raise ConfigError("dataset.path", self.path, "dataset=user needs a jsonl file", "set dataset.path=/path/to/facts.jsonl")


def _choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(key, value, "unknown choice", f"choose one of {', '.join(choices)}")
