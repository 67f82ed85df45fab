"""CounterFact in both published formats.

MEND/EasyEdit (``counterfact-{edit,train,val}.json``): case_id, prompt, subject, target_new,
ground_truth, rephrase_prompt, locality_prompt, locality_ground_truth; no relation id, which is
recovered per case from ``tables/templates.yaml`` (see facts/relations.py).
ROME (``counterfact.json``): requested_rewrite{prompt, subject, relation_id, target_new{str},
target_true{str}}, paraphrase_prompts, neighborhood_prompts, ...
"""

from __future__ import annotations

from typing import Any, Iterable, Literal

from core.errors import DataError
from facts.relations import TemplateTable, resolve_relation
from facts.schema import Fact
from facts.templates import template_of
from facts.validate import FIX_HINT, make_fact, require, text

Format = Literal["mend", "rome"]


def detect_format(records: list) -> Format:
    """``rome`` when records carry ``requested_rewrite``; ``mend`` otherwise."""
    first = records[0] if records else {}
    return "rome" if isinstance(first, dict) and "requested_rewrite" in first else "mend"


def record_case_id(row: Any, index: int) -> Any:
    return row.get("case_id", index) if isinstance(row, dict) else index


def parse_mend(row: dict, table: TemplateTable, relation_ids: Iterable[str], source: str, index: int = 0) -> Fact:
    case_id = record_case_id(row, index)
    require(row, "case_id", case_id)
    subject = text(require(row, "subject", case_id), "subject", case_id)
    prompt = text(require(row, "prompt", case_id), "prompt", case_id)
    ground_truth = require(row, "ground_truth", case_id)
    target_new = require(row, "target_new", case_id)
    locality_prompt = require(row, "locality_prompt", case_id)
    resolution = resolve_relation(
        table, template_of(prompt, subject), locality_prompt,
        ground_truth.strip() if isinstance(ground_truth, str) else None,
        target_new.strip() if isinstance(target_new, str) else None,
    )
    return make_fact(
        case_id=case_id, subject=subject, prompt=prompt,
        target_true=ground_truth, target_new=target_new,
        relation_id=resolution.relation_id, relation_ids=relation_ids,
        paraphrase_prompts=(require(row, "rephrase_prompt", case_id),),
        neighborhood_prompts=(locality_prompt,),
        neighborhood_target=require(row, "locality_ground_truth", case_id),
        source=source,
    )


def parse_rome(row: dict, relation_ids: Iterable[str], source: str, index: int = 0) -> Fact:
    case_id = record_case_id(row, index)
    require(row, "case_id", case_id)
    rewrite = require(row, "requested_rewrite", case_id)
    p = "requested_rewrite."
    target_new = require(rewrite, "target_new", case_id, p)
    target_true = require(rewrite, "target_true", case_id, p)
    for key, value in (("target_new", target_new), ("target_true", target_true)):
        if not isinstance(value, dict):
            raise DataError(p + key, value, "must be an object with 'str'", FIX_HINT, case_id=case_id)
    true_str = require(target_true, "str", case_id, p + "target_true.")
    return make_fact(
        case_id=case_id,
        subject=require(rewrite, "subject", case_id, p),
        template=require(rewrite, "prompt", case_id, p),
        relation_id=require(rewrite, "relation_id", case_id, p),
        relation_ids=relation_ids,
        target_true=true_str,
        target_new=require(target_new, "str", case_id, p + "target_new."),
        paraphrase_prompts=require(row, "paraphrase_prompts", case_id),
        neighborhood_prompts=require(row, "neighborhood_prompts", case_id),
        neighborhood_target=true_str,
        source=source,
    )
