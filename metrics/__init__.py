"""Evaluation metrics: pure functions over NLLs (pairwise, ranking, aggregate), fluency and the
collapse rule (quality), and the glue that scores cases on both sides (``metrics.evaluation``,
the only module here that runs a model)."""

from core.lazy import lazy_exports

__getattr__ = lazy_exports(__name__, {
    "metrics.aggregate": ("Estimate", "EvaluationTable", "MetricRow", "aggregate", "harmonic_mean", "mean_ci"),
    "metrics.pairwise": ("Comparison", "compare", "prefers", "probability_margin"),
    "metrics.quality": ("CollapseThresholds", "is_collapsed", "ngram_entropy", "text_ngram_entropy"),
    "metrics.ranking": ("reciprocal_rank", "target_rank", "top1"),
    "metrics.report": ("render_markdown",),
})

__all__ = [
    "Estimate", "EvaluationTable", "MetricRow", "aggregate", "harmonic_mean", "mean_ci",
    "Comparison", "compare", "prefers", "probability_margin",
    "reciprocal_rank", "target_rank", "top1", "render_markdown",
    "CollapseThresholds", "is_collapsed", "ngram_entropy", "text_ngram_entropy",
]
