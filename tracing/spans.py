"""Which prompt tokens to corrupt, and the token roles that aggregation groups by.

Char spans (half-open, from ``facts.perspectives.corrupted_char_spans`` or given by hand) become
token positions through the tokenizer's offset mapping. A token belongs to a char span when its
text without leading whitespace overlaps the span: BPE tokens such as " Dan" carry the space that
precedes a word, and that space must not make the subject's first token part of the relation.
"""

from __future__ import annotations

from typing import Mapping, Sequence

from core.errors import DataError

Span = tuple[int, int]

ROLES = ("first_corrupted", "middle_corrupted", "last_corrupted", "first_subsequent", "further", "last")
ROLE_LABELS = {
    "entity": {"first_corrupted": "first subject token", "middle_corrupted": "middle subject tokens",
               "last_corrupted": "last subject token", "first_subsequent": "first subsequent token",
               "further": "further tokens", "last": "last token"},
    "relation": {"first_corrupted": "first relation token", "middle_corrupted": "middle relation tokens",
                 "last_corrupted": "last relation token", "first_subsequent": "first subsequent token",
                 "further": "further tokens", "last": "last token"},
}


def _trimmed_start(text: str, start: int, end: int) -> int:
    """Where a token's text begins after its leading whitespace (its start if it is all whitespace)."""
    core = start
    while core < end and text[core].isspace():
        core += 1
    return start if core == end else core


def token_positions(text: str, offsets: Sequence[tuple[int, int]], char_spans: Sequence[Span]) -> list[int]:
    """Sorted token positions whose (leading-whitespace-trimmed) text overlaps any char span."""
    positions = []
    for index, (start, end) in enumerate(offsets):
        if end <= start:  # special tokens (BOS) have empty offsets and are never corrupted
            continue
        core = _trimmed_start(text, start, end)
        if any(core < span_end and end > span_start for span_start, span_end in char_spans):
            positions.append(index)
    return positions


def contiguous_spans(positions: Sequence[int]) -> list[Span]:
    """``[2, 3, 4, 7]`` -> ``[(2, 5), (7, 8)]`` (half-open token spans)."""
    spans: list[Span] = []
    for position in sorted(positions):
        if spans and spans[-1][1] == position:
            spans[-1] = (spans[-1][0], position + 1)
        else:
            spans.append((position, position + 1))
    return spans


def corrupted_positions(tokenizer, prompt: str, char_spans: Sequence[Span], case_id=None) -> tuple[list[int], list[int]]:
    """Tokenize ``prompt`` and map ``char_spans`` to token positions; returns (token ids, positions)."""
    for start, end in char_spans:
        if not 0 <= start < end <= len(prompt):
            raise DataError("char_span", (start, end), f"not a non-empty span of the {len(prompt)}-char prompt",
                            hint="spans are half-open (start, end) char offsets into the prompt", case_id=case_id)
    encoded = tokenizer(prompt, return_offsets_mapping=True)
    positions = token_positions(prompt, encoded["offset_mapping"], char_spans)
    if not positions:
        raise DataError("char_spans", list(char_spans), f"no token of {prompt!r} lies in the spans",
                        hint="check the subject / relation spans of this fact", case_id=case_id)
    return list(encoded["input_ids"]), positions


def straddling_tokens(text: str, offsets: Sequence[tuple[int, int]], span: Span) -> list[str]:
    """Tokens that begin before an edge of ``span`` and end after it (leading whitespace trimmed as above).

    ``"Ital"`` in ``"Italy is"`` gives ``["Italy"]``: the span cannot be corrupted without also
    corrupting ``"y"``.
    """
    start, end = span
    found = []
    for token_start, token_end in offsets:
        if token_end <= token_start:
            continue
        core = _trimmed_start(text, token_start, token_end)
        if core < start < token_end or core < end < token_end:
            found.append(text[token_start:token_end])
    return found


def check_subject_tokens(tokenizer, prompt: str, span: Span, subject: str, case_id=None) -> None:
    """Refuse a subject whose first or last character falls inside a token of the prompt.

    Token positions come from overlaps, so such a subject would silently widen to whole tokens:
    in the entity perspective the corruption takes in part of the next word, and in the relation
    perspective the subject's own boundary token counts as "relation" and is corrupted too. There is
    no exact token span for it, so tracing refuses it (the trace stage skips and counts it).
    """
    encoded = tokenizer(prompt, return_offsets_mapping=True)
    split = straddling_tokens(prompt, encoded["offset_mapping"], span)
    if split:
        raise DataError("subject", subject, f"starts or ends inside the token {split[0]!r} of {prompt!r}, so no token "
                        "span is exactly the subject", hint="give the subject as whole tokens (e.g. 'Italy', not 'Ital')",
                        case_id=case_id)


def subject_char_span(prompt: str, subject: str) -> Span:
    """Char span of the first occurrence of ``subject`` in ``prompt``."""
    start = prompt.find(subject)
    if start < 0:
        raise DataError("subject", subject, f"not found in the prompt {prompt!r}", hint="pass the subject exactly as it appears")
    return start, start + len(subject)


def token_roles(n_tokens: int, positions: Sequence[int]) -> dict[str, list[int]]:
    """ROME's token groups over the corrupted span (roles may overlap, as in ROME's figure code).

    first/middle/last corrupted token; the first token after the last corrupted one; further
    tokens up to (not including) the last; the last token. Tokens before the span are in no role.
    """
    ordered = sorted(positions)
    first, last_corrupted, last = ordered[0], ordered[-1], n_tokens - 1
    subsequent = last_corrupted + 1
    return {
        "first_corrupted": [first],
        "middle_corrupted": [p for p in ordered if first < p < last_corrupted],
        "last_corrupted": [last_corrupted],
        "first_subsequent": [subsequent] if subsequent <= last else [],
        "further": list(range(subsequent + 1, last)),
        "last": [last],
    }


def knockout_sources(n_tokens: int, subject_positions: Sequence[int], relation_positions: Sequence[int]) -> dict[str, list[int]]:
    """The three disjoint source sets of an attention knockout (Geva et al. 2023), from the last position.

    subject: the subject's tokens; relation: the relation tokens (``facts.perspectives`` in the
    relation perspective, so every non-subject token or the relation phrase); last: the last token.
    The last token belongs to ``last`` only, so a relation (or subject) that ends the prompt loses
    it. Tokens in no char span (BOS, punctuation trimmed from a template) are never blocked. The
    sets come from the fact, not from what a perspective corrupts, so a knockout is the same in
    both perspectives.
    """
    last = n_tokens - 1
    subject = sorted(p for p in set(subject_positions) if p != last)
    relation = sorted(p for p in set(relation_positions) if p != last and p not in subject)
    return {"subject": subject, "relation": relation, "last": [last]}


def knockout_positions(tokenizer, prompt: str, char_spans: Mapping[str, Sequence[Span]]) -> dict[str, list[int]]:
    """``knockout_sources`` of ``prompt`` from the ``subject`` and ``relation`` char spans."""
    offsets = tokenizer(prompt, return_offsets_mapping=True)["offset_mapping"]
    return knockout_sources(len(offsets), token_positions(prompt, offsets, char_spans["subject"]),
                            token_positions(prompt, offsets, char_spans["relation"]))
