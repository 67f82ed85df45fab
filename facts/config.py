"""Typed schema of the ``dataset`` config group (registered by the pipeline as ``dataset_schema``) and the
held-out text slice that ``stage.quality`` scores (torch-free: registering the schemas must not import torch)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from core.checks import check_choice
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
        check_choice("dataset.name", self.name, DATASET_NAMES)
        check_choice("dataset.split", self.split, SPLITS)
        check_choice("dataset.format", self.format, FORMATS)
        if self.limit is not None and self.limit < 0:
            raise ConfigError("dataset.limit", self.limit, "must be >= 0 or null", "use null for all records")
        if self.name == "user" and not self.path:
            raise ConfigError("dataset.path", self.path, "dataset=user needs a jsonl file", "set dataset.path=/path/to/facts.jsonl")


@dataclass(frozen=True)
class HeldoutSlice:
    """Which text: the first ``n_tokens`` tokens of a WikiText-2 file."""

    n_tokens: int  # the default lives in the edit stage's settings (stage.quality.nll_tokens)
    file: str = "wikitext-2-raw/wiki.test.raw"

    def validate(self, prefix: str = "stage.quality") -> None:
        if self.n_tokens < 2:
            raise ConfigError(f"{prefix}.nll_tokens", self.n_tokens, "needs at least 2 tokens", "e.g. 2048")
