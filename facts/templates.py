"""Prompt <-> template matching: derive a template from (prompt, subject), or find the subject
of a prompt given candidate templates (used to recover neighbourhood subjects and to read a
locality prompt's relation).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Optional

SLOT = "{}"


def template_of(prompt: str, subject: str) -> str:
    """Replace the first occurrence of ``subject`` in ``prompt`` by ``{}`` (docs/data-sources.md's rule)."""
    return prompt.replace(subject, SLOT, 1)


def fill(template: str, subject: str) -> str:
    """``template.format(subject)`` without treating other braces as fields."""
    return template.replace(SLOT, subject, 1)


def pararel_template(pattern: str) -> Optional[str]:
    """ParaRel pattern -> entity-side template, or None when [Y] is not last or [X] follows [Y].

    ``"The mother tongue of [X] is [Y]."`` -> ``"The mother tongue of {} is"``.
    """
    if "[X]" not in pattern or "[Y]" not in pattern:
        return None
    head, _, tail = pattern.partition("[Y]")
    if "[X]" not in head or re.sub(r"[\s.,]", "", tail):
        return None
    template = re.sub(r"\s+", " ", head.replace("[X]", SLOT)).rstrip()
    return None if template.endswith(SLOT) else template


@dataclass(frozen=True)
class Match:
    template: str
    subject: str


def match_prompt(prompt: str, templates: Iterable[str], strip_suffix: Optional[str] = None) -> Optional[Match]:
    """The most specific template (most fixed characters) that ``prompt`` instantiates.

    ``strip_suffix``: also try the prompt without a trailing `` <suffix>`` (some neighbourhood
    prompts already contain their answer). Ties are broken by template text, so results are
    deterministic.
    """
    variants = [prompt]
    if strip_suffix and prompt.endswith(" " + strip_suffix):
        variants.append(prompt[: -len(strip_suffix) - 1])
    best: Optional[tuple[int, str, str]] = None
    for text in variants:
        for template in templates:
            head, _, tail = template.partition(SLOT)
            if len(text) <= len(head) + len(tail) or not (text.startswith(head) and text.endswith(tail)):
                continue
            subject = text[len(head): len(text) - len(tail)]
            if subject != subject.strip() or not subject:
                continue
            key = (-(len(head) + len(tail)), template, subject)
            if best is None or key < best:
                best = key
    return None if best is None else Match(best[1], best[2])
