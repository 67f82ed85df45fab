"""ROME known facts (``known_1000.json``: known_id, subject, attribute, template, prompt, relation_id).

The file's ``template`` often stops before the prompt does ("{} is located in the continent" vs
"... continent of"), so the Fact's template is derived from the prompt: what tracing corrupts and
reads must be the prompt the model sees.
"""

from __future__ import annotations

from typing import Any, Iterable

from facts.schema import Fact
from facts.validate import make_fact, require

SOURCE = "known_1000"


def record_case_id(row: Any, index: int) -> Any:
    return row.get("known_id", index) if isinstance(row, dict) else index


def parse_known(row: dict, relation_ids: Iterable[str], index: int = 0) -> Fact:
    case_id = record_case_id(row, index)
    require(row, "known_id", case_id)
    return make_fact(
        case_id=case_id,
        subject=require(row, "subject", case_id),
        prompt=require(row, "prompt", case_id),
        target_true=require(row, "attribute", case_id),
        relation_id=require(row, "relation_id", case_id),
        relation_ids=relation_ids,
        source=SOURCE,
    )
