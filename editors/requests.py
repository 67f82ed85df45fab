"""What an editor is asked to do, independent of the perspective that built the request.

An ``EditRequest`` is a subject plus one or more rewrites (template -> target), all keyed at one
lookup token. The entity perspective has one rewrite (ROME's request). The relation perspective
(the authors' RaKE code) has two: the add prompt "The relation between {s} and {o*} is" -> the
relation phrase over all context templates, and the removal prompt "The relation between {s} and
{o} is" -> " None" over the first five; its key comes from the removal prompt. (The authors train
"None" without the space and scale its loss by the relation phrase's length: the editors'
``relation_removal=authors``.)

Lookup token (``lookup``): ``subject_last`` (ROME/MEMIT, and the authors' relation edits) reads
and writes at the last subject token; ``prompt_last`` uses the last token of each prompt, i.e. the
last relation-template token ("is") in the relation perspective. With ``prompt_last`` the key of
the removal prompt and the lookup of the add prompt sit at different tokens (they see different
objects), which is why it is an option to study, not the default.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Optional, Sequence

from core.checks import check_choice
from core.errors import ConfigError, DataError

Lookup = Literal["subject_last", "prompt_last"]
LOOKUPS: tuple[str, ...] = ("subject_last", "prompt_last")
REMOVE_CONTEXTS = 5  # the authors optimise the removal prompt over the first 5 context templates


@dataclass(frozen=True)
class Rewrite:
    """``template`` ("{}" = subject) should be continued by ``target`` (no leading space)."""

    template: str
    target: str
    n_contexts: Optional[int] = None  # None: every context template; k: the first k
    removal: bool = False  # the relation edit's (s, o) -> "None" rewrite (see ValueSettings.relation_removal)


@dataclass(frozen=True)
class EditRequest:
    case_id: Any
    subject: str
    rewrites: tuple[Rewrite, ...]
    key_template: str  # the prompt whose lookup token gives the key k* (ROME's compute_u prompt)
    lookup: Lookup = "subject_last"
    # The object the edit replaces (entity edits); KN attributes and erases it. None when unknown.
    target_true: Optional[str] = None

    def __post_init__(self) -> None:
        check_choice("lookup", self.lookup, LOOKUPS, "unknown lookup token")
        for template in (self.key_template, *(r.template for r in self.rewrites)):
            if template.count("{}") != 1:
                raise DataError("template", template, "needs exactly one {} for the subject", case_id=self.case_id)
        if not self.rewrites or not self.subject:
            raise DataError("request", self.subject, "needs a subject and at least one rewrite", case_id=self.case_id)

    @property
    def target(self) -> str:
        """The main target (the first rewrite's)."""
        return self.rewrites[0].target

    def describe(self) -> str:
        main = self.rewrites[0]
        return f"[{main.template.replace('{}', self.subject)}] -> [{main.target}]"


def entity_request(fact, lookup: Lookup = "subject_last") -> EditRequest:
    """ROME's request from a ``facts.schema.Fact`` (or a ``facts.build_entity_request`` result): prompt -> target_new."""
    target = getattr(fact, "target_new", None)
    if not target:
        raise DataError("target_new", target, "an edit needs a new object", "use CounterFact facts", case_id=fact.case_id)
    return EditRequest(fact.case_id, fact.subject, (Rewrite(fact.template, target),), fact.template, lookup,
                       target_true=getattr(fact, "target_true", None) or None)


def relation_request(request, lookup: Lookup = "subject_last", remove_contexts: int = REMOVE_CONTEXTS) -> EditRequest:
    """The authors' relation edit from a ``facts.perspectives.RelationRequest``."""
    return EditRequest(
        request.case_id, request.subject,
        (Rewrite(request.add_template, request.target_add),
         Rewrite(request.remove_template, request.target_remove, remove_contexts, removal=True)),
        key_template=request.remove_template, lookup=lookup,
    )


def check_requests(requests: Sequence[EditRequest]) -> list[EditRequest]:
    requests = list(requests)
    if not requests:
        raise ConfigError("requests", [], "nothing to edit", "pass at least one EditRequest")
    return requests
