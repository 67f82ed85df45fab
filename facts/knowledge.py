"""Which facts does a model know? Its greedy continuation starts with the true object.

Later stages trace and edit only known facts, as the paper does for GPT-2 XL. The result is
cached per (model identity, fact contents), so every stage of every job reuses one computation.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from core.hashing import CacheEntry, content_hash
from core.io import atomic_write_jsonl, read_jsonl
from facts.schema import Fact

log = logging.getLogger(__name__)

KNOWLEDGE_VERSION = 2


@dataclass(frozen=True)
class Knowledge:
    """One fact's check: what the model continued with, and whether it starts with the object."""

    case_id: int
    continuation: str
    known: bool


def check_knowledge(loaded, facts: list[Fact], batch_size: int = 64, progress: bool = True) -> list[Knowledge]:
    """Greedily continue each fact's prompt for as many tokens as its object has (+1).

    Most facts are decided by the first greedy token alone (its text is no prefix of the object),
    so one batched forward pass settles them and only the rest are generated in full; the answer
    is the same as generating for every fact. For facts settled early, ``continuation`` holds
    just that first token.
    """
    from models.predict import could_start_with, greedy_continuations, next_tokens, starts_with_target

    prompts = [fact.prompt for fact in facts]
    first = [loaded.tokenizer.decode([token]) for token in next_tokens(loaded, prompts, batch_size, progress)]
    open_ = [i for i, fact in enumerate(facts) if could_start_with(first[i], fact.target_true)]
    lengths = [len(loaded.tokenizer(" " + facts[i].target_true, add_special_tokens=False)["input_ids"]) + 1 for i in open_]
    continuations = dict(zip(open_, greedy_continuations(loaded, [prompts[i] for i in open_], lengths, batch_size, progress)))
    rows = []
    for i, fact in enumerate(facts):
        text = continuations.get(i, first[i])
        rows.append(Knowledge(fact.case_id, text, i in continuations and starts_with_target(text, fact.target_true)))
    return rows


def knowledge_cache_entry(loaded, facts: Iterable[Fact], cache_dir: str | Path) -> CacheEntry:
    facts = list(facts)
    key = {
        "version": KNOWLEDGE_VERSION,
        "model": loaded.identity,
        "facts": content_hash([(f.case_id, f.prompt, f.target_true) for f in facts]),
        "n": len(facts),
    }
    return CacheEntry(cache_dir, "knowledge", key)


def knowledge_table(loaded, facts: list[Fact], cache_dir: str | Path, batch_size: int = 64) -> tuple[list[Knowledge], bool]:
    """All checks for ``facts`` (computed once per model and fact set); returns (rows, from_cache)."""
    entry = knowledge_cache_entry(loaded, facts, cache_dir)
    computed = False

    def compute(entry: CacheEntry) -> list[Knowledge]:
        nonlocal computed
        started = time.time()
        rows = check_knowledge(loaded, facts, batch_size)
        atomic_write_jsonl(entry.path("knowledge.jsonl"), [row.__dict__ for row in rows])
        log.info("checked %d facts in %.1f s: %d known", len(facts), time.time() - started, sum(r.known for r in rows))
        computed = True
        return rows

    rows = entry.load_or_compute(lambda e: _checked_rows(e.read_jsonl("knowledge.jsonl"), facts), compute)
    return rows, not computed


def _checked_rows(rows: list[dict], facts: list[Fact]) -> list[Knowledge]:
    """One row per fact, in order (a truncated jsonl still parses line by line)."""
    table = [Knowledge(**row) for row in rows]
    if [row.case_id for row in table] != [fact.case_id for fact in facts]:
        raise ValueError(f"{len(table)} rows for {len(facts)} facts, or in another order")
    return table


def known_facts(loaded, facts: Iterable[Fact], cache_dir: str | Path, batch_size: int = 64) -> list[Fact]:
    """The facts whose object the model predicts greedily (cached)."""
    facts = list(facts)
    rows, _ = knowledge_table(loaded, facts, cache_dir, batch_size)
    return [fact for fact, row in zip(facts, rows) if row.known]
