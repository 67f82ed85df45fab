"""Pure metric functions on hand-written tensors: comparisons, ranks, bootstrap, harmonic scores, tables."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from core.bootstrap import bootstrap_indices
from core.errors import DataError
from metrics.aggregate import aggregate, harmonic_mean, mean_ci
from metrics.fields import METRICS, SCORES
from metrics.pairwise import compare, prefers, probability_margin
from metrics.ranking import reciprocal_rank, target_rank, top1
from metrics.report import render_markdown

NAN = math.nan


# -- pairwise ---------------------------------------------------------------------------------
def test_prefers_is_strict_and_propagates_nan():
    preferred = torch.tensor([1.0, 2.0, 3.0, NAN, 1.0])
    other = torch.tensor([2.0, 2.0, 1.0, 1.0, NAN])
    result = prefers(preferred, other)
    assert result[:3].tolist() == [1.0, 0.0, 0.0]  # win, tie (not a success), loss
    assert result[3:].isnan().all()


def test_probability_margin_values():
    nll_a, nll_b = torch.tensor([math.log(2.0)]), torch.tensor([math.log(4.0)])  # p = 1/2 and 1/4
    assert probability_margin(nll_a, nll_b).item() == pytest.approx(0.25)
    assert probability_margin(nll_b, nll_a).item() == pytest.approx(-0.25)


def test_compare_means_over_prompts():
    preferred = torch.tensor([math.log(2.0), math.log(8.0)])  # p = 1/2, 1/8
    other = torch.tensor([math.log(4.0), math.log(4.0)])  # p = 1/4
    result = compare(preferred, other)
    assert result.success == pytest.approx(0.5)
    assert result.margin == pytest.approx((0.25 - 0.125) / 2)
    assert result.n_prompts == 2


def test_compare_empty_and_nan():
    empty = compare(torch.empty(0), torch.empty(0))
    assert (empty.success, empty.margin, empty.n_prompts) == (None, None, 0)
    nan = compare(torch.tensor([1.0, NAN]), torch.tensor([2.0, 2.0]))
    assert math.isnan(nan.success) and math.isnan(nan.margin)


def test_compare_shape_mismatch_raises():
    with pytest.raises(ValueError):
        compare(torch.tensor([1.0, 2.0]), torch.tensor([1.0]))


# -- ranking ----------------------------------------------------------------------------------
def test_target_rank_orders_by_nll_and_is_pessimistic_on_ties():
    nll = torch.tensor([
        [0.5, 1.0, 2.0],  # target 0 best -> 1
        [0.5, 1.0, 2.0],  # target 2 worst -> 3
        [1.0, 1.0, 2.0],  # target 0 tied with 1 -> 2 (a tie counts against the target)
        [1.0, 1.0, 1.0],  # all tied -> last
    ])
    ranks = target_rank(nll, torch.tensor([0, 2, 0, 1]))
    assert ranks.tolist() == [1.0, 3.0, 2.0, 3.0]
    assert top1(ranks).tolist() == [1.0, 0.0, 0.0, 0.0]
    assert reciprocal_rank(ranks).tolist() == pytest.approx([1.0, 1 / 3, 0.5, 1 / 3])


def test_target_rank_nan_row_and_errors():
    ranks = target_rank(torch.tensor([[0.1, NAN], [0.2, 0.1]]), torch.tensor([0, 0]))
    assert math.isnan(ranks[0]) and ranks[1] == 2.0
    assert math.isnan(top1(ranks)[0]) and math.isnan(reciprocal_rank(ranks)[0])
    with pytest.raises(ValueError):
        target_rank(torch.tensor([[0.1, 0.2]]), torch.tensor([2]))
    with pytest.raises(ValueError):
        target_rank(torch.empty((1, 0)), torch.tensor([0]))
    assert target_rank(torch.empty((0, 3)), torch.empty(0, dtype=torch.long)).numel() == 0


# -- aggregate --------------------------------------------------------------------------------
def test_harmonic_mean():
    assert harmonic_mean([1.0, 0.5]) == pytest.approx(2 / 3)
    assert harmonic_mean([0.9, 0.9, 0.9]) == pytest.approx(0.9)
    assert harmonic_mean([0.5, 0.0]) == 0.0
    assert math.isnan(harmonic_mean([0.5, NAN]))
    assert math.isnan(harmonic_mean([]))
    with pytest.raises(ValueError):
        harmonic_mean([0.5, -0.1])


def test_mean_ci_contains_mean_and_is_seeded():
    values = [1.0, 0.0, 1.0, 1.0, 0.0, 1.0, 0.0, 1.0, 1.0, 1.0]
    first = mean_ci(values, n_resamples=500, seed=3)
    assert first.mean == pytest.approx(0.7)
    assert first.low <= first.mean <= first.high
    assert 0.0 <= first.low < first.high <= 1.0
    assert mean_ci(values, n_resamples=500, seed=3) == first
    continuous = [0.13, 0.92, 0.41, 0.77, 0.05, 0.66, 0.38, 0.59]
    assert mean_ci(continuous, n_resamples=200, seed=4) != mean_ci(continuous, n_resamples=200, seed=5)
    constant = mean_ci([0.25] * 7, seed=0)
    assert (constant.low, constant.high) == (0.25, 0.25)


def test_mean_ci_counts_missing_and_nan():
    estimate = mean_ci([1.0, None, NAN, 0.0], n_resamples=200)
    assert estimate.mean == pytest.approx(0.5)
    assert (estimate.n, estimate.n_missing, estimate.n_nan) == (2, 1, 1)
    empty = mean_ci([], n_resamples=10)
    assert math.isnan(empty.mean) and math.isnan(empty.low) and empty.n == 0
    nothing = mean_ci([None, None], n_resamples=10)
    assert math.isnan(nothing.mean) and nothing.n_missing == 2


def test_bootstrap_indices_shape_and_seed():
    a = bootstrap_indices(5, 4, seed=1)
    assert a.shape == (4, 5) and a.min() >= 0 and a.max() < 5
    assert np.array_equal(a, bootstrap_indices(5, 4, seed=1))
    with pytest.raises(ValueError):
        bootstrap_indices(5, 0, seed=1)


def _row(case_id, reliability, generality, locality, relation=True):
    row = {"case_id": case_id, "relation_id": "P1" if relation else None,
           "entity.reliability": reliability, "entity.generality": generality, "entity.locality": locality,
           "relation.reliability": 1.0 if relation else None}
    return row


def test_aggregate_pre_only_scores_and_counts():
    rows = [_row(1, 1.0, 0.5, 1.0), _row(2, 0.0, 0.5, 1.0), _row(3, 1.0, 0.5, 0.0, relation=False)]
    table = aggregate(rows, n_resamples=300, seed=0)
    assert not table.has_post
    assert table.row("entity.reliability").pre.mean == pytest.approx(2 / 3)
    expected = harmonic_mean([2 / 3, 0.5, 2 / 3])
    score = table.row("entity.score").pre
    assert score.mean == pytest.approx(expected)
    assert score.low <= score.mean <= score.high
    assert table.counts == {"relation_side": 2, "without_relation": 1}
    # Fields absent from every row are NaN, not zero, and say so (n == 0).
    assert table.row("relation.top1").pre.n == 0 and math.isnan(table.row("relation.top1").pre.mean)
    assert [row.metric for row in table.rows] == [*METRICS, *SCORES]
    json.dumps(table.to_dict(), allow_nan=False)  # strict JSON: NaN is written as null


def test_aggregate_pre_post_pairs_by_case_id():
    pre = [_row(1, 0.0, 0.0, 1.0), _row(2, 0.0, 1.0, 1.0), _row(3, 1.0, 0.0, 1.0)]
    post = [_row(3, 1.0, 1.0, 0.0), _row(1, 1.0, 1.0, 1.0), _row(2, 1.0, 0.0, 1.0)]  # other order
    table = aggregate(pre, post, n_resamples=300, seed=0)
    row = table.row("entity.reliability")
    assert row.pre.mean == pytest.approx(1 / 3) and row.post.mean == pytest.approx(1.0)
    assert row.delta.mean == pytest.approx(2 / 3)
    assert row.delta.low <= row.delta.mean <= row.delta.high
    scalars = table.scalars()
    assert scalars["post/entity.reliability"] == pytest.approx(1.0)
    assert "delta/entity.score_low" in scalars
    assert aggregate(pre, post, n_resamples=300, seed=0).to_dict() == table.to_dict()


def test_aggregate_rejects_mismatched_or_duplicate_cases():
    pre = [_row(1, 1.0, 1.0, 1.0), _row(2, 1.0, 1.0, 1.0)]
    with pytest.raises(DataError, match="different cases"):
        aggregate(pre, [_row(1, 1.0, 1.0, 1.0), _row(3, 1.0, 1.0, 1.0)])
    with pytest.raises(DataError, match="duplicate case id") as err:
        aggregate([_row(1, 1.0, 1.0, 1.0), _row(1, 0.0, 1.0, 1.0)])
    assert err.value.case_id == 1
    with pytest.raises(DataError, match="no case_id"):
        aggregate([{"entity.reliability": 1.0}])


def test_render_markdown_pre_and_post_columns():
    pre = [_row(1, 0.0, 0.0, 1.0), _row(2, 1.0, 1.0, 1.0, relation=False)]
    post = [_row(1, 1.0, 1.0, 1.0), _row(2, 1.0, 1.0, 1.0, relation=False)]
    text = render_markdown(aggregate(pre, post, n_resamples=50), title="demo")
    assert "## demo" in text and "### entity side" in text and "### relation side" in text
    assert "| metric | pre-edit | post-edit | Δ post − pre | n | meaning |" in text
    assert "| reliability | 0.500 [0.000, 1.000] | 1.000 [1.000, 1.000] | +0.500" in text
    assert "1 without one are left out" in text
    margins = [dict(row, **{"relation.reliability_margin": 0.000123}) for row in pre]
    assert "| reliability_margin | 0.000123 [0.000123, 0.000123] |" in render_markdown(aggregate(margins, n_resamples=20))
    baseline = render_markdown(aggregate(pre, n_resamples=50))
    assert "post-edit" not in baseline and "| metric | pre-edit | n | meaning |" in baseline
