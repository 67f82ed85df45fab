"""Names of the per-case row fields and of the harmonic-mean scores built from them.

One vocabulary for rows (jsonl), aggregates (json), markdown tables and W&B keys:
``<side>.<metric>`` with side ``entity | relation``. Success rates are in [0, 1]; margins are
``p(preferred) - p(other)`` in [-1, 1] (positive = the metric's wish holds); ``*_top1`` and
``*_mrr`` are the strict relation-side rank metrics over all relation phrases.
"""

from __future__ import annotations

ENTITY_RATES = ("entity.reliability", "entity.generality", "entity.generality_ext", "entity.locality")
ENTITY_MARGINS = ("entity.reliability_margin", "entity.generality_margin", "entity.generality_ext_margin",
                  "entity.locality_margin")
RELATION_RATES = ("relation.reliability", "relation.generality", "relation.locality", "relation.removal")
RELATION_MARGINS = ("relation.reliability_margin", "relation.generality_margin", "relation.locality_margin",
                    "relation.removal_margin")
RELATION_RANKS = ("relation.top1", "relation.mrr", "relation.generality_top1", "relation.generality_mrr",
                  "relation.locality_top1", "relation.locality_mrr")

# Every aggregated per-case field, in table order.
METRICS: tuple[str, ...] = (*ENTITY_RATES, *ENTITY_MARGINS, *RELATION_RATES, *RELATION_RANKS, *RELATION_MARGINS)

# Harmonic-mean scores (ROME's "Score"): name -> the success rates it combines.
SCORES: dict[str, tuple[str, ...]] = {
    "entity.score": ("entity.reliability", "entity.generality", "entity.locality"),
    "entity.score_ext": ("entity.reliability", "entity.generality_ext", "entity.locality"),
    "relation.score": ("relation.reliability", "relation.generality", "relation.locality"),
    "relation.score_strict": ("relation.top1", "relation.generality_top1", "relation.locality_top1"),
}

# Edit jobs only: the model's own quality (``metrics.quality``), pre and post, and the success rates
# again with collapsed edits counted as failures (``<rate>_guarded``; pre-edit they equal the plain ones).
QUALITY = ("quality.fluency", "quality.nll", "quality.collapsed")
GUARDED_RATES = (*ENTITY_RATES, *RELATION_RATES, "relation.top1", "relation.generality_top1", "relation.locality_top1")
GUARDED = tuple(f"{rate}_guarded" for rate in GUARDED_RATES)
EDIT_METRICS: tuple[str, ...] = (*METRICS, *GUARDED, *QUALITY)
EDIT_SCORES: dict[str, tuple[str, ...]] = {
    **SCORES, **{f"{name}_guarded": tuple(f"{part}_guarded" for part in parts) for name, parts in SCORES.items()}}

# Short descriptions for tables and docs.
DESCRIPTIONS: dict[str, str] = {
    "entity.reliability": "P(o*) > P(o) on the rewrite prompt",
    "entity.generality": "P(o*) > P(o) on the dataset's paraphrases",
    "entity.generality_ext": "P(o*) > P(o) on dataset paraphrases + the relation's templates",
    "entity.locality": "P(o) > P(o*) on neighbourhood prompts",
    "entity.reliability_margin": "p(o*) - p(o), rewrite prompt",
    "entity.generality_margin": "p(o*) - p(o), paraphrases",
    "entity.generality_ext_margin": "p(o*) - p(o), paraphrases + templates",
    "entity.locality_margin": "p(o) - p(o*), neighbourhood",
    "relation.reliability": "P(r) > P(None) for (s, o*)",
    "relation.generality": "P(r) > P(None), paraphrased (s, o*) prompts",
    "relation.locality": "P(r) > P(None), neighbourhood (s', o) prompts",
    "relation.removal": "P(None) > P(r) for (s, o)",
    "relation.top1": "r ranks first among all relation phrases, (s, o*)",
    "relation.mrr": "reciprocal rank of r, (s, o*)",
    "relation.generality_top1": "r first, paraphrased (s, o*) prompts",
    "relation.generality_mrr": "reciprocal rank of r, paraphrases",
    "relation.locality_top1": "r first, neighbourhood prompts",
    "relation.locality_mrr": "reciprocal rank of r, neighbourhood",
    "relation.reliability_margin": "p(r) - p(None), (s, o*)",
    "relation.generality_margin": "p(r) - p(None), paraphrases",
    "relation.locality_margin": "p(r) - p(None), neighbourhood",
    "relation.removal_margin": "p(None) - p(r), (s, o)",
    "entity.score": "harmonic mean of reliability, generality, locality",
    "entity.score_ext": "harmonic mean with generality_ext",
    "relation.score": "harmonic mean of reliability, generality, locality",
    "relation.score_strict": "harmonic mean of the three top-1 rates",
    "quality.fluency": "n-gram entropy (bits) of greedy generations from the case's prompts (ROME)",
    "quality.nll": "mean NLL (nats/token) on the held-out WikiText slice",
    "quality.collapsed": "edit collapsed the model (NLL or fluency past its threshold)",
}
DESCRIPTIONS.update({f"{metric}_guarded": f"{DESCRIPTIONS[metric]}; collapsed edits count as failures"
                     for metric in GUARDED_RATES})
DESCRIPTIONS.update({f"{name}_guarded": f"{DESCRIPTIONS[name]}, guarded rates" for name in SCORES})
