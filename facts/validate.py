"""Turn one raw record into a Fact or raise DataError naming the case id.

Shared by every loader so the same rules hold everywhere: required keys present, subject
non-empty and inside the prompt, targets non-empty (leading spaces removed), relation id known
to ``tables/relations.yaml`` (or None where the source has none).
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping, Optional, Sequence

from core.errors import DataError
from facts.schema import Fact
from facts.templates import SLOT, template_of

FIX_HINT = "fix or remove the record, or set dataset.strict=false to skip malformed records"


def require(row: Mapping[str, Any], key: str, case_id: Any, prefix: str = "") -> Any:
    if not isinstance(row, Mapping) or key not in row:
        raise DataError(prefix + key, None, "missing key", FIX_HINT, case_id=case_id)
    return row[key]


def text(value: Any, key: str, case_id: Any, allow_none: bool = False) -> Optional[str]:
    if value is None and allow_none:
        return None
    if not isinstance(value, str) or not value.strip():
        raise DataError(key, value, "must be a non-empty string", FIX_HINT, case_id=case_id)
    return value


def target(value: Any, key: str, case_id: Any, allow_none: bool = False) -> Optional[str]:
    """Targets are stored without a leading space; editors add the space the tokenizer needs."""
    value = text(value, key, case_id, allow_none)
    return None if value is None else value.strip()


def make_fact(
    *,
    case_id: Any,
    subject: Any,
    target_true: Any,
    source: str,
    relation_ids: Iterable[str],
    prompt: Optional[str] = None,
    template: Optional[str] = None,
    relation_id: Optional[str] = None,
    target_new: Any = None,
    paraphrase_prompts: Iterable[str] = (),
    neighborhood_prompts: Iterable[str] = (),
    neighborhood_target: Optional[str] = None,
) -> Fact:
    """Validate and build; give either a filled ``prompt`` or a ``template`` with ``{}``."""
    if not isinstance(case_id, int) or isinstance(case_id, bool):
        raise DataError("case_id", case_id, "must be an integer", FIX_HINT, case_id=case_id)
    subject = text(subject, "subject", case_id)
    if template is not None:
        template = text(template, "template", case_id)
        if template.count(SLOT) != 1:
            raise DataError("template", template, "must contain '{}' exactly once for the subject", FIX_HINT, case_id=case_id)
        prompt = template.replace(SLOT, subject, 1)
    else:
        prompt = text(prompt, "prompt", case_id)
        if subject not in prompt:
            raise DataError("prompt", prompt, f"subject {subject!r} does not occur in the prompt", FIX_HINT, case_id=case_id)
        template = template_of(prompt, subject)
    if relation_id is not None and relation_id not in set(relation_ids):
        raise DataError("relation_id", relation_id, "unknown relation id",
                        "add it to facts/tables/relations.yaml (phrase, alternatives, templates, label)", case_id=case_id)
    return Fact(
        case_id=case_id, subject=subject, relation_id=relation_id, template=template, prompt=prompt,
        target_true=target(target_true, "target_true", case_id),
        target_new=target(target_new, "target_new", case_id, allow_none=True),
        paraphrase_prompts=tuple(text(p, "paraphrase_prompts", case_id) for p in paraphrase_prompts),
        neighborhood_prompts=tuple(text(p, "neighborhood_prompts", case_id) for p in neighborhood_prompts),
        neighborhood_target=target(neighborhood_target, "neighborhood_target", case_id, allow_none=True),
        source=source,
    )


def check_unique_case_ids(facts: Sequence[Fact], where: str) -> None:
    """Case ids must be unique: they name each fact's trace and edit files and key its result rows.

    Two records with one id would silently keep one trace file (``traces/case_<id>``) and one row
    per id in an edit job, so loads and the trace stage refuse them, naming every duplicated id.
    """
    counts: dict[Any, int] = {}
    for fact in facts:
        counts[fact.case_id] = counts.get(fact.case_id, 0) + 1
    duplicated = sorted(case_id for case_id, count in counts.items() if count > 1)
    if duplicated:
        shown = duplicated[:20] + (["..."] if len(duplicated) > 20 else [])
        raise DataError("case_id", shown, f"{len(duplicated)} case ids occur more than once in {where}",
                        "give each record its own case_id (a user file without case_id uses the line number)",
                        case_id=duplicated[0])
