"""Spans, token roles, AIE aggregation, result files, the trace cache, figures and the trace stage."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch

from core.errors import DataError
from helpers import write_known_user_facts
from tracing import TraceResult, TraceSettings, embedding_std, trace
from tracing.aggregate import RoleAIE, aggregate_aie, bootstrap_ratio, role_sums
from tracing.api import perspective_char_spans
from tracing.plots import plot_aie_curves, plot_role_heatmaps, plot_severed, plot_trace, plot_trace_grid
from tracing.spans import contiguous_spans, corrupted_positions, token_positions, token_roles


def test_relation_spans_skip_the_space_before_the_subject(tiny_gpt2):
    tokenizer, prompt = tiny_gpt2.tokenizer, "The capital of Italy is"
    tokens = [tokenizer.decode([i]) for i in tokenizer(prompt)["input_ids"]]
    assert tokens == ["The", " capital", " of", " Italy", " is"]
    _, entity = corrupted_positions(tokenizer, prompt, perspective_char_spans(prompt, "Italy", "entity"))
    _, relation = corrupted_positions(tokenizer, prompt, perspective_char_spans(prompt, "Italy", "relation"))
    _, phrase = corrupted_positions(tokenizer, prompt, perspective_char_spans(prompt, "Italy", "relation", "phrase"))
    assert entity == [3] and relation == [0, 1, 2, 4] and phrase == [1]
    assert contiguous_spans(relation) == [(0, 3), (4, 5)]


def test_straddling_tokens_by_offsets():
    from tracing.spans import straddling_tokens

    text = "The Italy is"
    offsets = [(0, 3), (3, 9), (9, 12), (0, 0)]  # " Italy" carries its space
    assert straddling_tokens(text, offsets, (4, 9)) == []  # "Italy": exact (the leading space does not count)
    assert straddling_tokens(text, offsets, (4, 8)) == [" Italy"]  # "Ital" ends inside " Italy"
    assert straddling_tokens(text, offsets, (5, 9)) == [" Italy"]  # "taly" starts inside it


@pytest.mark.parametrize("perspective", ["entity", "relation"])
def test_subject_that_splits_a_token_is_refused_not_widened(tiny_gpt2, perspective):
    from facts.schema import Fact
    from tracing import trace_fact

    fact = Fact(case_id=3, subject="Ital", relation_id=None, template="The capital of {}y is",
                prompt="The capital of Italy is", target_true="Rome")
    with pytest.raises(DataError, match="inside the token ' Italy'") as info:
        trace_fact(tiny_gpt2, fact, perspective)
    assert info.value.key == "subject" and info.value.case_id == 3
    with pytest.raises(DataError, match="inside the token"):
        trace(tiny_gpt2, fact.prompt, "Ital", perspective=perspective)


def test_token_positions_by_offsets():
    text = "ab cd ef"
    offsets = [(0, 2), (2, 5), (5, 8), (0, 0)]  # " cd" carries the space; the last is a special token
    assert token_positions(text, offsets, [(3, 5)]) == [1]
    assert token_positions(text, offsets, [(0, 3)]) == [0]  # the space alone does not pull in " cd"
    with pytest.raises(DataError):
        corrupted_positions(_Whitespace(), "ab", [(0, 5)])


class _Whitespace:
    def __call__(self, text, return_offsets_mapping=True):
        return {"input_ids": [1, 2], "offset_mapping": [(0, 1), (1, 2)]}


def test_token_roles_like_rome():
    roles = token_roles(8, [2, 3, 4])
    assert roles == {"first_corrupted": [2], "middle_corrupted": [3], "last_corrupted": [4], "first_subsequent": [5],
                     "further": [6], "last": [7]}
    one = token_roles(4, [1])
    assert one["first_corrupted"] == one["last_corrupted"] == [1] and one["middle_corrupted"] == []
    relation = token_roles(5, [0, 1, 2, 4])  # the relation template ends the prompt
    assert relation["middle_corrupted"] == [1, 2] and relation["last_corrupted"] == [4]
    assert relation["first_subsequent"] == [] and relation["further"] == [] and relation["last"] == [4]


def _result(scores: torch.Tensor, corrupted: list[int], p_corrupted: float, perspective="entity", case_id=0) -> TraceResult:
    n_tokens = scores.shape[0]
    return TraceResult(prompt="x " * n_tokens, tokens=[f"t{i}" for i in range(n_tokens)], token_ids=list(range(n_tokens)),
                       corrupted=corrupted, char_spans=[(0, 1)], perspective=perspective, answer=" y", answer_id=7,
                       p_clean=0.9, p_corrupted=p_corrupted, scores={"hidden": scores, "mlp": scores * 0.5},
                       settings=TraceSettings(noise_scale=0.3), case_id=case_id)


def test_aggregate_by_role_hand_computed():
    a = _result(torch.arange(12, dtype=torch.float32).reshape(6, 2) / 20, [1, 2, 3], p_corrupted=0.1)
    b = _result(torch.full((4, 2), 0.5), [1], p_corrupted=0.2, case_id=1)
    sums, counts = role_sums(a, "hidden")
    assert counts.tolist() == [1, 1, 1, 1, 0, 1]
    agg = aggregate_aie([a, b], "hidden", n_bootstrap=200)
    # middle role: only fact a, token 2 -> (4/20 - 0.1, 5/20 - 0.1)
    assert torch.allclose(agg.mean[1], torch.tensor([0.1, 0.15]))
    # further role: fact b's token 3? b has last corrupted 1, subsequent 2, further none, last 3
    assert agg.tokens.tolist() == [2, 1, 2, 2, 0, 2]
    assert math.isnan(agg.mean[4, 0])
    # first role: a token 1 (2/20 - .1 = 0, 3/20 - .1 = .05) and b token 1 (0.3, 0.3) -> mean
    assert torch.allclose(agg.mean[0], torch.tensor([0.15, 0.175]))
    assert torch.all(agg.low[0] <= agg.mean[0] + 1e-6) and torch.all(agg.mean[0] <= agg.high[0] + 1e-6)
    assert agg.n_facts == 2 and abs(agg.p_corrupted - 0.15) < 1e-9
    rows = agg.rows()
    assert len(rows) == 12 and rows[0]["role"] == "first_corrupted"
    back = RoleAIE.from_tensors(agg.tensors(), "hidden", agg.perspective, agg.n_facts, agg.p_clean, agg.p_corrupted,
                                agg.confidence)
    assert back.tokens.dtype == agg.tokens.dtype and len(back.rows()) == len(rows)
    for got, want in zip(back.rows(), rows):  # exact round trip (NaN where a role is empty)
        assert got.keys() == want.keys()
        assert all(x == y or (isinstance(x, float) and math.isnan(x) and math.isnan(y)) for x, y in zip(got.values(), want.values()))
    with pytest.raises(DataError):
        aggregate_aie([a, _result(torch.zeros(4, 2), [0], 0.1, perspective="relation")], "hidden")


def test_bootstrap_collapses_for_one_fact_and_is_seeded():
    sums = torch.tensor([[[1.0, 2.0]]], dtype=torch.float64)
    counts = torch.tensor([[2.0]], dtype=torch.float64)
    mean, low, high = bootstrap_ratio(sums, counts, n_bootstrap=50)
    assert torch.allclose(mean, torch.tensor([[0.5, 1.0]], dtype=torch.float64)) and torch.equal(low, high)
    many = torch.rand(30, 1, 2, dtype=torch.float64)
    ones = torch.ones(30, 1, dtype=torch.float64)
    first, second = bootstrap_ratio(many, ones, seed=4), bootstrap_ratio(many, ones, seed=4)
    assert torch.equal(first[1], second[1]) and torch.all(first[1] < first[2])


def test_trace_api_save_load_cache_and_plot(tiny_gpt2, tmp_path, monkeypatch):
    settings = TraceSettings(kinds=("hidden", "attn"), severed=("mlp",), samples=2, window=2)
    result = trace(tiny_gpt2, "The capital of Italy is", "Italy", perspective="relation", settings=settings,
                   noise_std=0.2, cache_dir=tmp_path / "cache")
    assert result.settings.noise_scale == pytest.approx(0.6)
    assert result.corrupted == [0, 1, 2, 4] and result.spans == [(0, 3), (4, 5)]
    assert sorted(result.scores) == ["attn", "hidden", "hidden_severed_mlp"]
    assert result.scores["hidden"].shape == (5, tiny_gpt2.adapter.n_layers)
    result.save(tmp_path / "out", stem="case")
    loaded = TraceResult.load(tmp_path / "out", stem="case")
    assert loaded.metadata() == result.metadata()
    assert all(torch.equal(loaded.scores[k], result.scores[k]) for k in result.scores)
    assert json.loads((tmp_path / "out" / "case.json").read_text())["spans"] == [[0, 3], [4, 5]]

    import tracing.engine

    def fail(*args, **kwargs):
        raise AssertionError("the cached trace was recomputed")

    monkeypatch.setattr(tracing.engine, "engine_scores", fail)
    cached = trace(tiny_gpt2, "The capital of Italy is", "Italy", perspective="relation", settings=settings,
                   noise_std=0.2, cache_dir=tmp_path / "cache")
    assert torch.equal(cached.scores["hidden"], result.scores["hidden"])

    plot_trace(result, "hidden", path=tmp_path / "fig" / "hidden")
    grid = plot_trace_grid(result, tmp_path / "fig" / "grid")
    assert grid.get_suptitle().startswith(f"{result.model['name']}: 'The capital of Italy is'")  # names its model
    aggs = {n: aggregate_aie([result], n, n_bootstrap=20) for n in result.scores}
    plot_role_heatmaps([aggs["hidden"], aggs["attn"]], tmp_path / "fig" / "roles")
    plot_aie_curves([aggs["hidden"]], tmp_path / "fig" / "curves")
    plot_severed(aggs, path=tmp_path / "fig" / "severed")
    for stem in ("hidden", "grid", "roles", "curves", "severed"):
        for suffix in (".png", ".pdf"):
            assert (tmp_path / "fig" / f"{stem}{suffix}").stat().st_size > 1000


def test_embedding_std_matches_manual_and_caches(tiny_gpt2, tmp_path):
    subjects = ["Italy", "Danielle Darrieux"]
    ids = [i for s in sorted(subjects) for i in tiny_gpt2.tokenizer(s, add_special_tokens=False)["input_ids"]]
    manual = tiny_gpt2.adapter.embedding_matrix(tiny_gpt2.model)[ids].double().std().item()
    assert embedding_std(tiny_gpt2, subjects, tmp_path) == pytest.approx(manual)
    assert list((tmp_path / "embedding_std").glob("*/std.json"))
    assert embedding_std(tiny_gpt2, list(reversed(subjects)), tmp_path) == pytest.approx(manual)


ALL_NAMES = ["attn", "hidden", "hidden_severed_attn", "hidden_severed_mlp", "mlp"]


@pytest.mark.parametrize("perspective,overrides,names", [
    ("entity", [], ALL_NAMES),
    ("relation", ["stage.kinds=[hidden,mlp]", "stage.severed=false", "perspective.relation_span=phrase"], ["hidden", "mlp"]),
])
def test_trace_stage_writes_traces_aggregates_and_figures(compose_config, tiny_gpt2, tmp_path, perspective, overrides, names):
    from pipeline.jobs import run_job

    facts = write_known_user_facts(tiny_gpt2, tmp_path / "facts.jsonl")
    # A fresh cache for traces and knowledge, sharing only the converted tokenizer/model checkpoints.
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "models").symlink_to(Path(os.environ["KLOC_CACHE_DIR"]) / "models")
    cfg = compose_config("stage=trace", "model=tiny_gpt2", "dataset=user", f"dataset.path={tmp_path / 'facts.jsonl'}",
                         f"perspective={perspective}", "logger=none", f"paths.cache_dir={tmp_path / 'cache'}",
                         "stage.samples=2", "stage.window=2", "stage.n_bootstrap=50", "stage.plot_facts=1",
                         "stage.progress=false", *overrides)
    job_dir = tmp_path / "job"
    payload = run_job(cfg, job_dir)
    summary = payload["results"]
    assert summary["n_traced"] == len(facts) and summary["perspective"] == perspective
    for fact in facts:
        meta = json.loads((job_dir / "traces" / f"case_{fact['case_id']}.json").read_text())
        assert meta["answer"].strip() == fact["object"] and meta["perspective"] == perspective
        assert meta["score_names"] == names
    rows = [json.loads(line) for line in (job_dir / "aie.jsonl").read_text().splitlines()]
    assert sorted({r["name"] for r in rows}) == names
    stems = [f"case_{facts[0]['case_id']}", "aie_roles", "aie_curves"] + (["severed"] if len(names) == 5 else [])
    for stem in stems:
        assert (job_dir / "figures" / f"{stem}.png").exists() and (job_dir / "figures" / f"{stem}.pdf").exists()
    assert "hidden" in summary["peaks"] and summary["seconds_per_fact"] >= 0
    # A rerun of the same job is skipped (done-marker), and the traces come from the cache when forced.
    assert run_job(cfg, job_dir)["results"] == summary


def test_trace_stage_skips_and_counts_subjects_that_split_a_token(compose_config, tiny_gpt2, tmp_path):
    from pipeline.jobs import run_job

    path = tmp_path / "facts.jsonl"
    facts = write_known_user_facts(tiny_gpt2, path)
    split = {**facts[0], "case_id": 99, "subject": "Ital", "template": facts[0]["template"].replace("{}", "{}y")}
    path.write_text(path.read_text() + json.dumps(split) + "\n")
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "models").symlink_to(Path(os.environ["KLOC_CACHE_DIR"]) / "models")
    cfg = compose_config("stage=trace", "model=tiny_gpt2", "dataset=user", f"dataset.path={path}", "perspective=relation",
                         "logger=none", f"paths.cache_dir={tmp_path / 'cache'}", "stage.kinds=[hidden]", "stage.severed=false",
                         "stage.samples=2", "stage.window=2", "stage.n_bootstrap=20", "stage.plot_facts=0", "stage.progress=false")
    run_job(cfg, tmp_path / "job")
    results = json.loads((tmp_path / "job" / "results.json").read_text())["results"]
    assert results["n_traced"] == len(facts) and results["n_facts"] == len(facts) + 1
    assert results["n_skipped"] == 1 and [r["case_id"] for r in results["refused"]] == [99]
    assert results["skip_reasons"] == {"subject: starts or ends inside a token": 1}
    assert not (tmp_path / "job" / "traces" / "case_99.json").exists()
