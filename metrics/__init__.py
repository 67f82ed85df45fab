"""Evaluation metrics: pure functions over NLLs (pairwise, ranking, aggregate), fluency and the
collapse rule (quality), and the glue that scores cases on both sides (``metrics.evaluation``,
the only module here that runs a model)."""

from metrics.aggregate import Estimate, EvaluationTable, MetricRow, aggregate, harmonic_mean, mean_ci
from metrics.pairwise import Comparison, compare, prefers, probability_margin
from metrics.quality import CollapseThresholds, is_collapsed, ngram_entropy, text_ngram_entropy
from metrics.ranking import reciprocal_rank, target_rank, top1
from metrics.report import render_markdown

__all__ = [
    "Estimate", "EvaluationTable", "MetricRow", "aggregate", "harmonic_mean", "mean_ci",
    "Comparison", "compare", "prefers", "probability_margin",
    "reciprocal_rank", "target_rank", "top1", "render_markdown",
    "CollapseThresholds", "is_collapsed", "ngram_entropy", "text_ngram_entropy",
]
