"""A user's own facts: jsonl with subject, relation_id, template ({} = subject), object, and
optionally new_object, case_id (default: 0-based line number), paraphrase_prompts,
neighborhood_prompts. Validated exactly like the published data sets.
"""

from __future__ import annotations

import json
from typing import Any, Iterable, Iterator

from core.errors import DataError
from facts.schema import Fact
from facts.validate import FIX_HINT, make_fact, require

SOURCE = "user"


def iter_jsonl(text_content: str) -> Iterator[tuple[int, Any]]:
    """(line index, parsed row); unparsable lines become a DataError row to be reported."""
    index = 0
    for number, line in enumerate(text_content.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield index, json.loads(line)
        except json.JSONDecodeError as exc:
            yield index, DataError("line", number, f"invalid JSON ({exc.msg})", FIX_HINT, case_id=index)
        index += 1


def record_case_id(row: Any, index: int) -> Any:
    return row.get("case_id", index) if isinstance(row, dict) else index


def parse_user(row: Any, relation_ids: Iterable[str], index: int = 0) -> Fact:
    if isinstance(row, DataError):
        raise row
    case_id = record_case_id(row, index)
    return make_fact(
        case_id=case_id,
        subject=require(row, "subject", case_id),
        template=require(row, "template", case_id),
        relation_id=require(row, "relation_id", case_id),
        relation_ids=relation_ids,
        target_true=require(row, "object", case_id),
        target_new=row.get("new_object"),
        paraphrase_prompts=row.get("paraphrase_prompts", ()),
        neighborhood_prompts=row.get("neighborhood_prompts", ()),
        neighborhood_target=row.get("object") if row.get("neighborhood_prompts") else None,
        source=SOURCE,
    )
