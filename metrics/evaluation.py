"""Two-sided evaluation of cases: build each side's prompts, score them in batches, fill rows.

The only module of ``metrics/`` that runs the model (through ``models.scoring``); every number
it reports comes from the pure functions in ``metrics.pairwise`` and ``metrics.ranking``.

Entity side (ROME/MEMIT's CounterFact metrics), for a case (s, r, o -> o*):
  reliability: o* beats o on the rewrite prompt; generality: on the dataset's paraphrases;
  generality_ext: on those plus the relation's templates filled with s (MEND-format cases have
  a single paraphrase); locality: o (the neighbourhood target) beats o* on neighbourhood prompts.
Relation side (``facts.perspectives.RelationRequest``): reliability: r's phrase beats "None" after
"The relation between s and o* is"; generality: on its paraphrases; locality: on the
neighbourhood prompts (s', o); removal: "None" beats r for (s, o). "None" is an easy contrast, so
the strict variant ranks r's phrase among *all* relation phrases (top-1, reciprocal rank).

Typical use, pre and post with the same cases::

    cases = prepare_cases(facts, relations)
    pre = evaluate_cases(loaded, cases, relations)
    with applied(model, deltas):
        post = evaluate_cases(loaded, cases, relations)
    table = aggregate([c.to_row() for c in pre], [c.to_row() for c in post])
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence

import torch
from torch import Tensor

from core.errors import DataError
from facts.perspectives import REMOVE_TARGET, RelationRequest, build_relation_request
from facts.relations import RelationInfo, load_relation_table
from facts.schema import Fact
from facts.templates import fill
from metrics.pairwise import Comparison, compare
from metrics.ranking import mean_or_none, reciprocal_rank, target_rank, top1
from models.load import LoadedModel
from models.scoring import Method, candidate_nll

log = logging.getLogger(__name__)


# -- cases ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class EvalCase:
    """A fact with everything both sides need; ``relation`` is None when its relation is unknown."""

    fact: Fact
    relation: Optional[RelationRequest]
    template_prompts: tuple[str, ...]  # the relation's templates filled with the subject (generality_ext)

    @property
    def case_id(self) -> Any:
        return self.fact.case_id

    @property
    def locality_target(self) -> str:
        return self.fact.neighborhood_target or self.fact.target_true


def _check_fact(fact: Fact) -> None:
    def fail(key: str, value: Any, problem: str, hint: str) -> DataError:
        return DataError(key, value, problem, hint, case_id=fact.case_id)

    if not fact.prompt or not fact.prompt.strip():
        raise fail("prompt", fact.prompt, "empty rewrite prompt", "every case needs its prompt")
    for key in ("target_true", "target_new"):
        value = getattr(fact, key)
        if not value or not value.strip():
            raise fail(key, value, "missing target", "evaluation compares o* with o: use CounterFact or user facts with both objects")
        if value != value.strip():
            raise fail(key, value, "target has surrounding whitespace", "store targets without a leading space")
    if fact.target_new == fact.target_true:
        raise fail("target_new", fact.target_new, "new object equals the true object", "an edit must change the object")
    if fact.neighborhood_target is not None and not fact.neighborhood_target.strip():
        raise fail("neighborhood_target", fact.neighborhood_target, "empty neighbourhood target", "use null to fall back to target_true")
    if fact.neighborhood_prompts and (fact.neighborhood_target or fact.target_true) == fact.target_new:
        raise fail("neighborhood_target", fact.neighborhood_target, "equals the new object, so locality cannot be measured",
                   "the neighbourhood target is the neighbours' true object")
    for key in ("paraphrase_prompts", "neighborhood_prompts"):
        for prompt in getattr(fact, key):
            if not isinstance(prompt, str) or not prompt.strip():
                raise fail(key, prompt, "empty prompt", "drop empty prompts from the record")


def template_paraphrases(fact: Fact, relation: RelationInfo, limit: Optional[int] = None) -> tuple[str, ...]:
    """The relation's templates filled with the subject, minus the case's own prompts (table order)."""
    taken = {fact.prompt, *fact.paraphrase_prompts}
    prompts: list[str] = []
    for template in relation.templates:
        prompt = fill(template, fact.subject)
        if prompt not in taken:
            taken.add(prompt)
            prompts.append(prompt)
    return tuple(prompts if limit is None else prompts[:limit])


def prepare_cases(facts: Sequence[Fact], relations: Optional[Mapping[str, RelationInfo]] = None,
                  requests: Optional[Mapping[Any, RelationRequest]] = None,
                  max_template_paraphrases: Optional[int] = None) -> list[EvalCase]:
    """Validate facts (DataError with the case id) and attach both sides' prompts.

    ``relations`` defaults to the packaged table. ``requests`` (by case id) lets an editor pass
    the relation requests it edits with; otherwise they are built here. A fact whose relation id
    is absent or not in the table gets no relation side (counted by ``aggregate``, never guessed).
    """
    relations = load_relation_table() if relations is None else relations
    if max_template_paraphrases is not None and max_template_paraphrases < 0:
        raise DataError("max_template_paraphrases", max_template_paraphrases, "must be >= 0 or None", "use None for all")
    cases, seen = [], set()
    for fact in facts:
        _check_fact(fact)
        if fact.case_id in seen:
            raise DataError("case_id", fact.case_id, "duplicate case id", "evaluate each case once", case_id=fact.case_id)
        seen.add(fact.case_id)
        relation = relations.get(fact.relation_id) if fact.relation_id else None
        request = None
        if relation is not None:
            request = requests.get(fact.case_id) if requests is not None else None
            request = request or build_relation_request(fact, relation)
            if request.relation_id != fact.relation_id or request.case_id != fact.case_id:
                raise DataError("requests", (request.case_id, request.relation_id), "relation request does not match its fact",
                                f"expected case {fact.case_id} with relation {fact.relation_id}", case_id=fact.case_id)
        templates = template_paraphrases(fact, relation, max_template_paraphrases) if relation else ()
        cases.append(EvalCase(fact, request, templates))
    without = sum(case.relation is None for case in cases)
    if without:
        log.info("%d of %d cases have no known relation id: their relation side is left out", without, len(cases))
    return cases


# -- per-case scores --------------------------------------------------------------------------------
@dataclass(frozen=True)
class EntityScores:
    reliability: Comparison
    generality: Comparison
    generality_ext: Optional[Comparison]
    locality: Comparison
    nll_new: float  # rewrite prompt, for inspection
    nll_true: float


@dataclass(frozen=True)
class RelationScores:
    reliability: Comparison
    generality: Comparison
    locality: Comparison
    removal: Comparison
    rank: float  # rank of r's phrase among all phrases, add prompt (s, o*)
    generality_ranks: tuple[float, ...]
    locality_ranks: tuple[float, ...]
    nll_phrase: float  # add prompt, for inspection
    nll_none: float


_ENTITY_KEYS = ("reliability", "generality", "generality_ext", "locality")
_RELATION_KEYS = ("reliability", "generality", "locality", "removal")


@dataclass(frozen=True)
class CaseScores:
    """One case's scores on both sides; ``to_row()`` gives the flat ``<side>.<metric>`` row."""

    case_id: Any
    relation_id: Optional[str]
    entity: EntityScores
    relation: Optional[RelationScores]

    def to_row(self) -> dict[str, Any]:
        row: dict[str, Any] = {"case_id": self.case_id, "relation_id": self.relation_id}
        for key in _ENTITY_KEYS:
            _put(row, f"entity.{key}", getattr(self.entity, key))
        row["entity.n_paraphrases"] = self.entity.generality.n_prompts
        row["entity.n_template_paraphrases"] = (self.entity.generality_ext.n_prompts - self.entity.generality.n_prompts
                                                if self.entity.generality_ext else 0)
        row["entity.n_neighborhood"] = self.entity.locality.n_prompts
        row["entity.nll_new"], row["entity.nll_true"] = self.entity.nll_new, self.entity.nll_true
        relation = self.relation
        for key in _RELATION_KEYS:
            _put(row, f"relation.{key}", getattr(relation, key) if relation else None)
        row["relation.rank"] = relation.rank if relation else None
        row["relation.top1"], row["relation.mrr"] = _rank_stats((relation.rank,) if relation else ())
        row["relation.generality_top1"], row["relation.generality_mrr"] = _rank_stats(relation.generality_ranks if relation else ())
        row["relation.locality_top1"], row["relation.locality_mrr"] = _rank_stats(relation.locality_ranks if relation else ())
        row["relation.n_neighborhood"] = relation.locality.n_prompts if relation else None
        row["relation.nll_phrase"] = relation.nll_phrase if relation else None
        row["relation.nll_none"] = relation.nll_none if relation else None
        return row


def _put(row: dict[str, Any], key: str, comparison: Optional[Comparison]) -> None:
    row[key] = comparison.success if comparison else None
    row[f"{key}_margin"] = comparison.margin if comparison else None


def _rank_stats(ranks: Sequence[float]) -> tuple[Optional[float], Optional[float]]:
    tensor = torch.tensor(ranks, dtype=torch.float64)
    return mean_or_none(top1(tensor)), mean_or_none(reciprocal_rank(tensor))


# -- scoring --------------------------------------------------------------------------------------
class _Queries:
    """Unique prompts (per candidate list) to score in one batched call; rows read back by index."""

    def __init__(self) -> None:
        self.keys: dict[tuple[str, tuple[str, ...]], int] = {}

    def add(self, prompt: str, candidates: tuple[str, ...]) -> int:
        return self.keys.setdefault((prompt, candidates), len(self.keys))

    def score(self, loaded: LoadedModel, batch_size: int, method: Method, progress: bool) -> Tensor:  # [query K]
        prompts = [prompt for prompt, _ in self.keys]
        candidates = [list(options) for _, options in self.keys]
        return candidate_nll(loaded, prompts, candidates, batch_size=batch_size, method=method, progress=progress)


def relation_candidates(relations: Mapping[str, RelationInfo]) -> tuple[str, ...]:
    """Every relation phrase (no leading space, table order, unique), then "None" last."""
    phrases = tuple(dict.fromkeys(info.phrase_text for info in relations.values()))
    if REMOVE_TARGET in phrases:
        raise DataError("relations", REMOVE_TARGET, "a relation phrase equals the removal target", "rename that phrase")
    return (*phrases, REMOVE_TARGET)


@torch.no_grad()
def evaluate_cases(loaded: LoadedModel, cases: Sequence[EvalCase | Fact],
                   relations: Optional[Mapping[str, RelationInfo]] = None, batch_size: int = 256,
                   method: Method = "cache", progress: bool = True) -> list[CaseScores]:
    """Score both sides of every case with the model as it is now (call again after an edit).

    Facts are prepared on the fly (``prepare_cases``). All entity-side prompts go through one
    batched call (2 candidates each) and all relation-side prompts through another (every
    relation phrase plus "None"); repeated prompts are scored once. ``method`` and
    ``batch_size`` go to ``models.scoring.candidate_nll`` (``"concat"`` with ``batch_size=1`` is
    the one-sequence-at-a-time reference). An accelerator out-of-memory halves the batch there
    (``core.memory.halving_map``) instead of ending the run; the scores do not change.
    """
    relations = load_relation_table() if relations is None else relations
    if any(isinstance(case, Fact) for case in cases):
        cases = [case if isinstance(case, EvalCase) else prepare_cases([case], relations)[0] for case in cases]
    candidates = relation_candidates(relations)
    phrase_index = {phrase: index for index, phrase in enumerate(candidates[:-1])}
    entity, relation = _Queries(), _Queries()
    plans = []
    for case in cases:
        fact = case.fact
        pair = (fact.target_new, fact.target_true)
        plan: dict[str, Any] = {
            "rewrite": [entity.add(fact.prompt, pair)],
            "paraphrase": [entity.add(p, pair) for p in fact.paraphrase_prompts],
            "template": [entity.add(p, pair) for p in case.template_prompts],
            "neighborhood": [entity.add(p, (fact.target_new, case.locality_target)) for p in fact.neighborhood_prompts],
        }
        request = case.relation
        if request is not None:
            if request.relation_phrase not in phrase_index:
                raise DataError("relation_phrase", request.relation_phrase, "not a phrase of the relation table",
                                "build requests and evaluate with the same relation table", case_id=case.case_id)
            plan["phrase"] = phrase_index[request.relation_phrase]
            plan["add"] = [relation.add(request.add_prompt, candidates)]
            plan["remove"] = [relation.add(request.remove_prompt, candidates)]
            plan["rel_paraphrase"] = [relation.add(p, candidates) for p in request.paraphrase_prompts]
            plan["rel_neighborhood"] = [relation.add(p, candidates) for p in request.neighborhood_prompts]
        plans.append(plan)
    log.debug("scoring %d entity-side and %d relation-side prompts", len(entity.keys), len(relation.keys))
    entity_nll = entity.score(loaded, batch_size, method, progress) if entity.keys else torch.empty((0, 2))  # [query 2]
    relation_nll = relation.score(loaded, batch_size, method, progress) if relation.keys else torch.empty((0, len(candidates)))
    return [_case_scores(case, plan, entity_nll, relation_nll) for case, plan in zip(cases, plans)]


def _case_scores(case: EvalCase, plan: dict[str, Any], entity_nll: Tensor, relation_nll: Tensor) -> CaseScores:
    def pick(nll: Tensor, key: str) -> Tensor:  # [prompt K]
        return nll[torch.tensor(plan[key], dtype=torch.long)] if plan[key] else nll[:0]

    rewrite, paraphrase = pick(entity_nll, "rewrite"), pick(entity_nll, "paraphrase")
    extended = torch.cat([paraphrase, pick(entity_nll, "template")])
    neighborhood = pick(entity_nll, "neighborhood")  # columns: (o*, o)
    entity = EntityScores(
        reliability=compare(rewrite[:, 0], rewrite[:, 1]),
        generality=compare(paraphrase[:, 0], paraphrase[:, 1]),
        generality_ext=compare(extended[:, 0], extended[:, 1]) if case.relation is not None else None,
        locality=compare(neighborhood[:, 1], neighborhood[:, 0]),
        nll_new=rewrite[0, 0].item(), nll_true=rewrite[0, 1].item(),
    )
    if case.relation is None:
        return CaseScores(case.case_id, case.fact.relation_id, entity, None)
    phrase, none = plan["phrase"], relation_nll.shape[1] - 1
    add, remove = pick(relation_nll, "add"), pick(relation_nll, "remove")
    paraphrases, neighbors = pick(relation_nll, "rel_paraphrase"), pick(relation_nll, "rel_neighborhood")

    def ranks(nll: Tensor) -> tuple[float, ...]:  # rank among the phrases only ("None" is not a relation)
        target = torch.full((nll.shape[0],), phrase, dtype=torch.long)
        return tuple(target_rank(nll[:, :none], target).tolist())

    relation = RelationScores(
        reliability=compare(add[:, phrase], add[:, none]),
        generality=compare(paraphrases[:, phrase], paraphrases[:, none]),
        locality=compare(neighbors[:, phrase], neighbors[:, none]),
        removal=compare(remove[:, none], remove[:, phrase]),
        rank=ranks(add)[0], generality_ranks=ranks(paraphrases), locality_ranks=ranks(neighbors),
        nll_phrase=add[0, phrase].item(), nll_none=add[0, none].item(),
    )
    return CaseScores(case.case_id, case.fact.relation_id, entity, relation)


def evaluation_rows(scores: Sequence[CaseScores]) -> list[dict[str, Any]]:
    """Flat rows (``CaseScores.to_row``) for jsonl files, W&B tables and ``aggregate``."""
    return [score.to_row() for score in scores]
