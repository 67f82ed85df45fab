"""Trace one fact with one call; results are cached per (model, perspective, fact, settings).

    >>> from models import load_model
    >>> from tracing import trace
    >>> loaded = load_model("smollm2_135m")
    >>> result = trace(loaded, "The Eiffel Tower is located in the city of", subject="The Eiffel Tower",
    ...                kinds=("hidden", "mlp", "attn"), perspective="entity")
    >>> from tracing.plots import plot_trace
    >>> plot_trace(result, "hidden", path="eiffel_hidden")  # eiffel_hidden.png + .pdf
    >>> result.save("out/eiffel")                      # trace.safetensors + trace.json
    >>> knocked = trace(loaded, "The Eiffel Tower is located in the city of", subject="The Eiffel Tower",
    ...                 kinds="knockout")
    >>> knocked.knockout()                              # [source layer]: subject, relation, last
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict
from pathlib import Path
from typing import Literal, Optional, Sequence

from core.errors import ConfigError
from core.hashing import CacheEntry
from facts.schema import Fact
from models.load import LoadedModel
from tracing.inputs import TraceScores, answer_token, make_inputs
from tracing.noise import embedding_std
from tracing.result import TraceResult
from tracing.settings import FORMAT_VERSION, PERSPECTIVES, TraceSettings
from tracing.spans import Span, check_subject_tokens, corrupted_positions, knockout_positions, subject_char_span

log = logging.getLogger(__name__)

Engine = Literal["batched", "reference"]
Answer = Optional[str | int]


def default_noise_std(loaded: LoadedModel, cache_dir: str | Path | None = None) -> float:
    """ROME's default: embedding std over the subjects of the known-facts dataset (cached)."""
    from facts import DatasetConfig, load_facts

    facts = load_facts(DatasetConfig(name="known"), cache_dir=cache_dir)
    return embedding_std(loaded, [fact.subject for fact in facts], cache_dir)


def resolve_settings(loaded: LoadedModel, settings: TraceSettings, noise_std: float | None = None,
                     cache_dir: str | Path | None = None) -> TraceSettings:
    """Fix the absolute noise scale: explicit scale > factor x given std > factor x known-facts std."""
    if settings.noise_scale is not None:
        return settings
    std = noise_std if noise_std is not None else default_noise_std(loaded, cache_dir)
    return settings.with_scale(settings.noise_factor * std)


def perspective_char_spans(prompt: str, subject: str, perspective: str, relation_span: str = "template",
                           relation=None, case_id: int = -1) -> list[Span]:
    """Char spans to corrupt, from ``facts.perspectives`` (the one definition of both perspectives)."""
    from facts import Fact, corrupted_char_spans

    if perspective not in PERSPECTIVES:
        raise ConfigError("perspective", perspective, "unknown perspective", hint="use entity or relation")
    start, end = subject_char_span(prompt, subject)
    fact = Fact(case_id=case_id, subject=subject, relation_id=None, template=prompt[:start] + "{}" + prompt[end:],
                prompt=prompt, target_true="")
    return corrupted_char_spans(fact, perspective, relation_span, relation)


def trace(loaded: LoadedModel, prompt: str, subject: str | None = None, *, perspective: str = "entity",
          char_spans: Sequence[Span] | None = None, kinds: Sequence[str] | str | None = None, answer: Answer = None,
          settings: TraceSettings | None = None, relation_span: str = "template", relation=None,
          knockout_spans: dict[str, list[Span]] | None = None, noise_std: float | None = None,
          cache_dir: str | Path | None = None, case_id: int | None = None, engine: Engine = "batched",
          max_rows: int | None = None, progress: bool = False) -> TraceResult:
    """Causal trace of one prompt.

    The corrupted tokens are the subject (``perspective="entity"``), the relation tokens
    (``"relation"``: every non-subject token, or the relation phrase with
    ``relation_span="phrase"``), or exactly ``char_spans``. ``answer`` is the model's own top-1
    token (``None``, as ROME), a string (its first token, a leading space added) or a token id.
    ``kinds`` overrides ``settings.kinds``. With ``cache_dir`` the result is cached.

    Kind ``knockout`` needs ``subject``: its source sets are the subject, the relation tokens
    (``relation_span``, ``relation``) and the last token, whatever ``perspective`` corrupts, so
    its rows are the same in both perspectives; ``knockout_spans`` (``{"subject": [...],
    "relation": [...]}`` char spans) gives them exactly instead.
    """
    settings = settings or TraceSettings()
    if kinds is not None:
        settings = TraceSettings(**{**asdict(settings), "kinds": (kinds,) if isinstance(kinds, str) else tuple(kinds)})
    if char_spans is None:
        if subject is None:
            raise ConfigError("subject", None, "need a subject or explicit char_spans", hint="trace(loaded, prompt, subject=...)")
        check_subject_tokens(loaded.tokenizer, prompt, subject_char_span(prompt, subject), subject, case_id)
        char_spans = perspective_char_spans(prompt, subject, perspective, relation_span, relation)
    char_spans = [tuple(span) for span in char_spans]
    settings = resolve_settings(loaded, settings, noise_std, cache_dir)
    if not settings.knockout_names:
        knockout_spans = None
    elif knockout_spans is None:
        if subject is None:
            raise ConfigError("subject", None, "a knockout needs the subject (its source sets are the subject and "
                              "relation tokens)", hint="trace(loaded, prompt, subject=..., kinds=['knockout'])")
        knockout_spans = {"subject": [subject_char_span(prompt, subject)],
                          "relation": perspective_char_spans(prompt, subject, "relation", relation_span, relation)}
    if knockout_spans is not None:
        knockout_spans = {name: [tuple(span) for span in spans] for name, spans in knockout_spans.items()}
    args = (loaded, prompt, subject, perspective, char_spans, knockout_spans, answer, settings, case_id, engine,
            max_rows, progress)
    if cache_dir is None:
        return _compute(*args)
    key = {"format": FORMAT_VERSION, "model": loaded.identity, "prompt": prompt, "char_spans": char_spans,
           "perspective": perspective, "answer": answer, "settings": settings.key(), "engine": engine}
    if knockout_spans is not None:  # only then, so the keys of earlier traces stay valid
        key["knockout_spans"] = knockout_spans
    entry = CacheEntry(cache_dir, "traces", key)

    def compute(entry: CacheEntry) -> TraceResult:
        result = _compute(*args)
        result.save(entry.dir)
        return result

    result = entry.load_or_compute(_read_trace, compute)
    result.subject, result.case_id = subject, case_id
    return result


def _read_trace(entry: CacheEntry) -> TraceResult:
    result = TraceResult.from_files(entry.read("trace.json"), entry.read_tensors("trace.safetensors"))
    result.from_cache = True
    return result


def trace_fact(loaded: LoadedModel, fact: Fact, perspective: str = "entity", *, relation_span: str = "template", answer: str = "predicted",
               settings: TraceSettings | None = None, relation=None, **kwargs) -> TraceResult:
    """Trace a ``facts.Fact``; ``answer`` is ``"predicted"`` (the model's top-1, as ROME) or ``"true"``.

    A fact whose subject starts or ends inside a token (``"Ital"`` in ``"Italy"``) is refused with
    a DataError (``tracing.spans.check_subject_tokens``) instead of being traced on a widened span.
    """
    from facts import corrupted_char_spans

    if answer not in ("predicted", "true"):
        raise ConfigError("trace.answer", answer, "unknown answer choice", hint="use predicted or true")
    check_subject_tokens(loaded.tokenizer, fact.prompt, fact.subject_char_span(), fact.subject, fact.case_id)
    spans = corrupted_char_spans(fact, perspective, relation_span, relation)
    knockout_spans = {"subject": corrupted_char_spans(fact, "entity"),
                      "relation": corrupted_char_spans(fact, "relation", relation_span, relation)}
    return trace(loaded, fact.prompt, fact.subject, perspective=perspective, char_spans=spans,
                 answer=fact.target_true if answer == "true" else None, settings=settings,
                 case_id=fact.case_id, relation_span=relation_span, relation=relation, knockout_spans=knockout_spans,
                 **kwargs)


def _compute(loaded: LoadedModel, prompt: str, subject: str | None, perspective: str, char_spans: list[Span],
             knockout_spans: dict[str, list[Span]] | None, answer: Answer, settings: TraceSettings, case_id: int | None,
             engine: Engine, max_rows: int | None, progress: bool) -> TraceResult:
    from tracing.engine import engine_scores
    from tracing.reference import reference_scores

    started = time.time()
    token_ids, positions = corrupted_positions(loaded.tokenizer, prompt, char_spans, case_id)
    answer_id = answer if isinstance(answer, int) or answer is None else answer_token(loaded.tokenizer, answer)
    sources = knockout_positions(loaded.tokenizer, prompt, knockout_spans) if knockout_spans else {}
    inputs = make_inputs(token_ids, positions, answer_id, settings, loaded.adapter.d_model, prompt, sources)
    if engine == "batched":
        scores: TraceScores = engine_scores(loaded, inputs, settings, max_rows=max_rows, progress=progress)
    elif engine == "reference":
        scores = reference_scores(loaded, inputs, settings)
    else:
        raise ConfigError("engine", engine, "unknown tracing engine", hint="use batched or reference")
    tokenizer = loaded.tokenizer
    return TraceResult(
        prompt=prompt, tokens=[tokenizer.decode([i]) for i in token_ids], token_ids=list(token_ids),
        corrupted=list(positions), char_spans=char_spans, perspective=perspective,
        answer=tokenizer.decode([scores.answer_id]), answer_id=scores.answer_id, p_clean=scores.p_clean,
        p_corrupted=scores.p_corrupted, scores=scores.scores, settings=settings, subject=subject, case_id=case_id,
        model=dict(loaded.identity), seconds=round(time.time() - started, 3), sources=sources,
    )
