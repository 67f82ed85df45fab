"""Fact records shared by every loader, and the FactSet a load returns.

One record type for ROME known facts, both CounterFact formats and user files, so tracing and
editing never branch on where a fact came from. Invariant: ``template.replace("{}", subject, 1)
== prompt`` (loaders derive ``template`` from the prompt when the source's own template differs,
as ``known_1000`` does for 478 records), so the subject span is exact by construction.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Iterator, Optional


@dataclass(frozen=True)
class Fact:
    """One (subject, relation, object) fact and its prompts; targets carry no leading space."""

    case_id: int
    subject: str
    relation_id: Optional[str]
    template: str  # "{}" marks the subject
    prompt: str
    target_true: str
    target_new: Optional[str] = None
    paraphrase_prompts: tuple[str, ...] = ()
    neighborhood_prompts: tuple[str, ...] = ()
    neighborhood_target: Optional[str] = None
    source: str = ""

    def subject_char_span(self) -> tuple[int, int]:
        """Half-open char span of the subject in ``prompt``."""
        start = self.template.index("{}")
        return start, start + len(self.subject)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, row: dict[str, Any]) -> "Fact":
        row = dict(row)
        row["paraphrase_prompts"] = tuple(row.get("paraphrase_prompts", ()))
        row["neighborhood_prompts"] = tuple(row.get("neighborhood_prompts", ()))
        return cls(**row)


@dataclass
class LoadReport:
    """What a load did: counts, relation-id coverage and the errors of skipped records."""

    source: str
    origin: str = ""
    read: int = 0
    loaded: int = 0
    skipped: int = 0
    without_relation_id: int = 0
    skipped_without_relation: int = 0  # dataset=counterfact_relation leaves these out (not errors)
    relation_counts: dict[str, int] = field(default_factory=dict)
    errors: list[dict[str, Any]] = field(default_factory=list)

    @property
    def relation_coverage(self) -> float:
        """Fraction of loaded facts that have a relation id."""
        return (self.loaded - self.without_relation_id) / self.loaded if self.loaded else 0.0

    def skip_reasons(self) -> dict[str, int]:
        """Skipped records per reason (``key: problem``), most frequent first: the why behind ``skipped``."""
        counts: dict[str, int] = {}
        for error in self.errors:
            reason = f"{error.get('key')}: {error.get('problem')}"
            counts[reason] = counts.get(reason, 0) + 1
        return dict(sorted(counts.items(), key=lambda item: -item[1]))

    def summary(self) -> dict[str, Any]:
        """What a stage puts in its results.json: records read, loaded and skipped, and why."""
        return {"n_read": self.read, "n_loaded": self.loaded, "n_skipped": self.skipped, "skip_reasons": self.skip_reasons()}

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "relation_coverage": self.relation_coverage, "skip_reasons": self.skip_reasons()}


@dataclass
class FactSet:
    """The facts of one load plus its report; iterates and indexes like a list."""

    facts: list[Fact]
    report: LoadReport

    def __iter__(self) -> Iterator[Fact]:
        return iter(self.facts)

    def __len__(self) -> int:
        return len(self.facts)

    def __getitem__(self, index: int) -> Fact:
        return self.facts[index]

    def by_case_id(self) -> dict[int, Fact]:
        return {fact.case_id: fact for fact in self.facts}
