"""Entity and relation perspectives: what to corrupt when tracing, and what to edit.

Entity perspective (subject, relation -> object): corrupt the subject; edit (prompt, subject,
target_new, target_true) as ROME does.

Relation perspective (subject, object -> relation), following the format the authors' code reads
(``rel_counterfact.json``, docs/data-sources.md, "Relation perspective in the authors' code"): an add prompt
"The relation between {s} and {o*} is" with target the relation phrase, a removal prompt with the
true object and target "None", fixed paraphrases of the add prompt, and (our addition, since the
authors never published theirs) neighbourhood prompts pairing the neighbour subject of the case's
locality prompt with its true object, target again the relation phrase. Targets are stored without
a leading space (as the authors store ``relation.strs``); editors add the space.
"""

from __future__ import annotations

import logging
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Sequence

from core.errors import ConfigError, DataError
from core.hashing import CacheEntry, content_hash
from core.io import atomic_write_json
from facts.relations import RelationInfo
from facts.schema import Fact
from facts.templates import match_prompt

log = logging.getLogger(__name__)

Perspective = Literal["entity", "relation"]
RelationSpan = Literal["template", "phrase"]
Span = tuple[int, int]

BUILDER_VERSION = "1"
ADD_TEMPLATE = "The relation between {s} and {o} is"
PARAPHRASE_TEMPLATES: tuple[str, ...] = (
    "The relationship between {s} and {o} is",
    "{s} and {o} are connected by the relation",
    "What relation connects {s} to {o}? It is the",
    "Regarding {s}, {o} is its",
    "{o} is {s}'s",
)
NEIGHBORHOOD_TEMPLATES: tuple[str, ...] = (ADD_TEMPLATE,) + PARAPHRASE_TEMPLATES[:2]
REMOVE_TARGET = "None"

# Stripped from the edges of a template piece in relation_span="phrase" mode.
FUNCTION_WORDS = frozenset(
    "the a an of is are was were be been in on at by to for from with as it its they their that which who whose "
    "what where does do did has have and this there 's".split()
)
_EDGE = " \t,.;:?!"  # stripped from template pieces in "template" mode; apostrophes stay ('s belongs to the relation)
_TOKEN = re.compile(r"'s\b|\w+|[^\w\s]")


# ---------------------------------------------------------------- corrupted spans (tracing)

def corrupted_char_spans(
    fact: Fact,
    perspective: Perspective,
    relation_span: RelationSpan = "template",
    relation: Optional[RelationInfo] = None,
) -> list[Span]:
    """Half-open char spans of ``fact.prompt`` to corrupt.

    entity: the subject. relation, ``"template"``: every non-subject piece of the prompt (before
    and after the subject), each trimmed of whitespace and , . ; : ? ! at its edges; pieces left
    empty are dropped. relation, ``"phrase"``: the relation's content words: (1) the longest
    case-insensitive whole-word match of the relation table's phrase or alternatives (when
    ``relation`` is given), else (2) each piece with FUNCTION_WORDS and punctuation stripped at
    its edges (inner words stay: "{} is located in the country of" -> "located in the country");
    if nothing is left (e.g. "{}, in"), the "template" spans are returned.

    Char spans become tokens by overlap, so a subject that starts or ends inside a token ("Ital" in
    "Italy") has no exact token span: tracing refuses such a fact (``tracing.spans.check_subject_tokens``;
    the trace stage skips and counts it) rather than widen the subject or corrupt its token as relation.
    """
    if perspective == "entity":
        return [fact.subject_char_span()]
    if perspective != "relation":
        raise ConfigError("perspective", perspective, "unknown perspective", "choose entity or relation")
    pieces = _template_pieces(fact)
    if relation_span == "template":
        return [span for span in (_trim(fact.prompt, s) for s in pieces) if span]
    if relation_span != "phrase":
        raise ConfigError("relation_span", relation_span, "unknown relation span mode", "choose template or phrase")
    if relation is not None:
        found = _phrase_match(fact.prompt, pieces, relation)
        if found:
            return [found]
    spans = [span for span in (_content(fact.prompt, s) for s in pieces) if span]
    return spans or [span for span in (_trim(fact.prompt, s) for s in pieces) if span]


def _template_pieces(fact: Fact) -> list[Span]:
    start, end = fact.subject_char_span()
    return [piece for piece in ((0, start), (end, len(fact.prompt))) if piece[1] > piece[0]]


def _trim(text: str, span: Span) -> Optional[Span]:
    start, end = span
    while start < end and text[start] in _EDGE:
        start += 1
    while end > start and text[end - 1] in _EDGE:
        end -= 1
    return (start, end) if end > start else None


def _content(text: str, span: Span) -> Optional[Span]:
    tokens = [m for m in _TOKEN.finditer(text, span[0], span[1])]
    keep = [m for m in tokens if m.group().lower() not in FUNCTION_WORDS and m.group()[0].isalnum()]
    if not keep:
        return None
    first, last = tokens.index(keep[0]), tokens.index(keep[-1])
    return tokens[first].start(), tokens[last].end()


def _phrase_match(text: str, pieces: Sequence[Span], relation: RelationInfo) -> Optional[Span]:
    best: Optional[Span] = None
    for phrase in (relation.phrase, *relation.alternatives):
        pattern = re.compile(r"\b" + re.escape(phrase.strip()) + r"\b", re.IGNORECASE)
        for start, end in pieces:
            for m in pattern.finditer(text, start, end):
                if best is None or (m.end() - m.start()) > (best[1] - best[0]):
                    best = (m.start(), m.end())
    return best


# ---------------------------------------------------------------- entity requests (editing)

@dataclass(frozen=True)
class EntityRequest:
    case_id: int
    prompt: str
    template: str
    subject: str
    target_new: str
    target_true: str


def build_entity_request(fact: Fact) -> EntityRequest:
    """The entity-perspective rewrite of a fact (ROME-style: prompt -> target_new); targets without leading space.

    Data only, like ``build_relation_request``; ``editors.entity_request`` turns a fact into what an editor applies.
    """
    if not fact.target_new:
        raise DataError("target_new", fact.target_new, "an edit needs a new object",
                        "use a CounterFact or user fact with new_object", case_id=fact.case_id)
    return EntityRequest(fact.case_id, fact.prompt, fact.template, fact.subject, fact.target_new, fact.target_true)


# ---------------------------------------------------------------- relation requests (editing)

@dataclass(frozen=True)
class RelationRequest:
    """One relation-perspective case; every prompt is a full string, spans are half-open chars."""

    case_id: int
    relation_id: str
    relation_phrase: str  # no leading space
    subject: str
    object_true: str
    object_new: str
    add_template: str  # "{}" = subject, as in the authors' add_rel_prompt
    add_prompt: str
    target_add: str  # = relation_phrase
    remove_template: str
    remove_prompt: str
    target_remove: str  # "None"
    paraphrase_prompts: tuple[str, ...]
    neighborhood_subject: Optional[str]
    neighborhood_object: Optional[str]
    neighborhood_prompts: tuple[str, ...]
    neighborhood_target: str  # = relation_phrase
    add_subject_span: Span
    add_object_span: Span
    remove_subject_span: Span
    remove_object_span: Span
    builder_version: str = BUILDER_VERSION

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, row: dict[str, Any]) -> "RelationRequest":
        row = dict(row)
        for key in ("paraphrase_prompts", "neighborhood_prompts"):
            row[key] = tuple(row[key])
        for key in ("add_subject_span", "add_object_span", "remove_subject_span", "remove_object_span"):
            row[key] = tuple(row[key])
        return cls(**row)

    def authors_fields(self) -> dict[str, Any]:
        """The keys the authors' code reads (``requested_rewrite.relation`` etc., rel_prompts top-level)."""
        return {
            "requested_rewrite": {
                "relation": {"strs": [self.relation_phrase]},
                "add_rel_prompt": self.add_template,
                "rm_rel_prompt": self.remove_template,
            },
            "rel_prompts": list(self.paraphrase_prompts),
        }


@dataclass
class RelationRequestReport:
    cases: int = 0
    built: int = 0
    skipped_unknown_relation: int = 0
    skipped_no_target_new: int = 0
    skipped_no_neighbor: int = 0
    neighbor_recovered: int = 0
    neighbor_missing: int = 0
    from_cache: bool = False


@dataclass
class RelationRequestSet:
    requests: list[RelationRequest]
    report: RelationRequestReport = field(default_factory=RelationRequestReport)


def _fill(template: str, subject: str, obj: str) -> tuple[str, Span, Span]:
    """Format and return the subject and object char spans (either may come first)."""
    out, spans, i = "", {}, 0
    for m in re.finditer(r"\{s\}|\{o\}", template):
        out += template[i:m.start()]
        value = subject if m.group() == "{s}" else obj
        spans[m.group()] = (len(out), len(out) + len(value))
        out += value
        i = m.end()
    return out + template[i:], spans["{s}"], spans["{o}"]


def neighbor_subject(fact: Fact, relation: RelationInfo) -> Optional[str]:
    """The subject of the case's locality prompt, found by matching the relation's templates."""
    if not fact.neighborhood_prompts:
        return None
    match = match_prompt(fact.neighborhood_prompts[0], relation.templates, strip_suffix=fact.neighborhood_target)
    return None if match is None else match.subject


def build_relation_request(fact: Fact, relation: RelationInfo) -> RelationRequest:
    if not fact.target_new:
        raise DataError("target_new", None, "relation requests pair the subject with the new object",
                        "use CounterFact facts", case_id=fact.case_id)
    phrase = relation.phrase_text
    add_prompt, add_s, add_o = _fill(ADD_TEMPLATE, fact.subject, fact.target_new)
    remove_prompt, rm_s, rm_o = _fill(ADD_TEMPLATE, fact.subject, fact.target_true)
    neighbor = neighbor_subject(fact, relation)
    neighbor_object = fact.neighborhood_target if neighbor else None
    neighbor_prompts = tuple(_fill(t, neighbor, neighbor_object)[0] for t in NEIGHBORHOOD_TEMPLATES) if neighbor else ()
    return RelationRequest(
        case_id=fact.case_id, relation_id=relation.relation_id, relation_phrase=phrase,
        subject=fact.subject, object_true=fact.target_true, object_new=fact.target_new,
        add_template=ADD_TEMPLATE.format(s="{}", o=fact.target_new), add_prompt=add_prompt, target_add=phrase,
        remove_template=ADD_TEMPLATE.format(s="{}", o=fact.target_true), remove_prompt=remove_prompt,
        target_remove=REMOVE_TARGET,
        paraphrase_prompts=tuple(_fill(t, fact.subject, fact.target_new)[0] for t in PARAPHRASE_TEMPLATES),
        neighborhood_subject=neighbor, neighborhood_object=neighbor_object,
        neighborhood_prompts=neighbor_prompts, neighborhood_target=phrase,
        add_subject_span=add_s, add_object_span=add_o, remove_subject_span=rm_s, remove_object_span=rm_o,
    )


def build_relation_requests(
    facts: Sequence[Fact],
    relations: dict[str, RelationInfo],
    cache_dir: str | Path | None = None,
    require_neighbor: bool = False,
) -> RelationRequestSet:
    """Relation requests for every fact with a known relation id and a new object.

    Deterministic; cached as ``<cache_dir>/relation_requests/<hash>/requests.json`` keyed by
    BUILDER_VERSION, the facts and the relation table. Cases whose neighbour subject cannot be
    recovered keep empty neighbourhood prompts (counted) unless ``require_neighbor``.
    """
    key = {
        "builder_version": BUILDER_VERSION,
        "facts": content_hash([f.to_dict() for f in facts]),
        "relations": content_hash({rid: asdict(info) for rid, info in sorted(relations.items())}),
        "templates": [ADD_TEMPLATE, *PARAPHRASE_TEMPLATES],
        "require_neighbor": require_neighbor,
    }
    if cache_dir is None:
        return _build(facts, relations, require_neighbor)
    entry = CacheEntry(cache_dir, "relation_requests", key)

    def read(entry: CacheEntry) -> RelationRequestSet:
        payload = entry.read("requests.json")
        report = RelationRequestReport(**{**payload["report"], "from_cache": True})
        return RelationRequestSet([RelationRequest.from_dict(r) for r in payload["requests"]], report)

    def compute(entry: CacheEntry) -> RelationRequestSet:
        result = _build(facts, relations, require_neighbor)
        atomic_write_json(entry.path("requests.json"),
                          {"report": asdict(result.report), "requests": [r.to_dict() for r in result.requests]}, indent=None)
        return result

    return entry.load_or_compute(read, compute)


def _build(facts: Sequence[Fact], relations: dict[str, RelationInfo], require_neighbor: bool) -> RelationRequestSet:
    report = RelationRequestReport(cases=len(facts))
    requests: list[RelationRequest] = []
    for fact in facts:
        relation = relations.get(fact.relation_id) if fact.relation_id else None
        if relation is None:
            report.skipped_unknown_relation += 1
            continue
        if not fact.target_new:
            report.skipped_no_target_new += 1
            continue
        request = build_relation_request(fact, relation)
        if request.neighborhood_subject is None:
            report.neighbor_missing += 1
            if require_neighbor:
                report.skipped_no_neighbor += 1
                continue
        else:
            report.neighbor_recovered += 1
        requests.append(request)
    report.built = len(requests)
    log.info("relation requests: %d built from %d cases (unknown relation %d, no new object %d, "
             "neighbour subject recovered %d / missing %d)", report.built, report.cases,
             report.skipped_unknown_relation, report.skipped_no_target_new, report.neighbor_recovered, report.neighbor_missing)
    return RelationRequestSet(requests, report)
