"""metrics.evaluation and the evaluate stage: exact rows on controlled logits, named errors, files."""

from __future__ import annotations

import math

import pytest
import torch
from omegaconf import OmegaConf

from core.errors import ConfigError, DataError
from core.io import read_json, read_jsonl
from facts.perspectives import build_relation_request
from facts.relations import load_relation_table
from facts.schema import Fact
from metrics.aggregate import aggregate
from metrics.evaluation import evaluate_cases, evaluation_rows, prepare_cases, relation_candidates, template_paraphrases
from helpers import bias_only
from models import load_model

ENGLISH, FRENCH, NONE = 2321, 3432, 1943
NATIVE_LANGUAGE = (4534, 1789)  # " native language" = P103's phrase
RELATIONS = load_relation_table()


def fact(case_id: int = 0, relation_id: str | None = "P103", **changes) -> Fact:
    values = dict(
        case_id=case_id, subject="Danielle Darrieux", relation_id=relation_id, template="The mother tongue of {} is",
        prompt="The mother tongue of Danielle Darrieux is", target_true="French", target_new="English",
        paraphrase_prompts=("Where Danielle Darrieux is from, people speak the language of",),
        neighborhood_prompts=("Michel Rocard is a native speaker of",), neighborhood_target="French", source="test",
    )
    values.update(changes)
    return Fact(**values)


def nll(bias: torch.Tensor, tokens) -> float:
    log_z = torch.logsumexp(bias, dim=0).item()
    return sum(log_z - bias[t].item() for t in tokens) / len(tokens)


def test_rows_on_controlled_logits():
    """o* preferred everywhere, r's phrase top among all phrases and above "None"."""
    boosts = {ENGLISH: 4.0, FRENCH: 2.0, NONE: 1.0, NATIVE_LANGUAGE[0]: 9.0, NATIVE_LANGUAGE[1]: 9.0}
    loaded, bias = bias_only(boosts)
    bias = bias.double()
    cases = prepare_cases([fact(0), fact(1, relation_id=None)], RELATIONS)
    assert cases[0].relation is not None and cases[1].relation is None
    n_templates = len(template_paraphrases(cases[0].fact, RELATIONS["P103"]))
    assert n_templates == 5  # six P103 templates minus the rewrite prompt's own
    rows = evaluation_rows(evaluate_cases(loaded, cases, RELATIONS, progress=False))
    p_new, p_true = math.exp(-nll(bias, [ENGLISH])), math.exp(-nll(bias, [FRENCH]))
    p_phrase, p_none = math.exp(-nll(bias, NATIVE_LANGUAGE)), math.exp(-nll(bias, [NONE]))
    first = rows[0]
    assert first["case_id"] == 0 and first["relation_id"] == "P103"
    assert first["entity.reliability"] == first["entity.generality"] == first["entity.generality_ext"] == 1.0
    assert first["entity.locality"] == 0.0  # the neighbour also prefers o*: locality fails
    assert first["entity.reliability_margin"] == pytest.approx(p_new - p_true, rel=1e-4)
    assert first["entity.locality_margin"] == pytest.approx(p_true - p_new, rel=1e-4)
    assert (first["entity.n_paraphrases"], first["entity.n_template_paraphrases"], first["entity.n_neighborhood"]) == (1, 5, 1)
    assert first["entity.nll_new"] == pytest.approx(nll(bias, [ENGLISH]), abs=1e-4)
    assert first["relation.reliability"] == first["relation.generality"] == first["relation.locality"] == 1.0
    assert first["relation.removal"] == 0.0
    assert first["relation.reliability_margin"] == pytest.approx(p_phrase - p_none, rel=1e-4)
    assert first["relation.rank"] == 1.0 and first["relation.top1"] == 1.0 and first["relation.mrr"] == 1.0
    assert first["relation.generality_top1"] == 1.0 and first["relation.locality_mrr"] == 1.0
    assert first["relation.n_neighborhood"] == 3
    second = rows[1]
    assert second["entity.reliability"] == 1.0 and second["entity.generality_ext"] is None
    assert all(second[key] is None for key in second if key.startswith("relation."))
    table = aggregate(rows, n_resamples=50)
    assert table.counts == {"relation_side": 1, "without_relation": 1}
    assert table.row("relation.reliability").pre.n == 1


def test_strict_rank_and_none_contrast_disagree():
    """"None" is weak here (r beats it) but another phrase outranks r: the strict variant sees it."""
    native, language, spoken = 4534, 1789, RELATIONS["P1412"].phrase
    spoken_ids = load_model("tiny_llama").tokenizer(spoken, add_special_tokens=False)["input_ids"]
    boosts = {native: 5.0, language: 5.0, NONE: -5.0, **{t: 8.0 for t in spoken_ids}}
    loaded, bias = bias_only(boosts)
    bias = bias.double()
    candidates = relation_candidates(RELATIONS)
    phrase_nll = {c: nll(bias, loaded.tokenizer(" " + c, add_special_tokens=False)["input_ids"]) for c in candidates[:-1]}
    own = phrase_nll["native language"]
    expected_rank = 1 + sum(1 for c, value in phrase_nll.items() if c != "native language" and value <= own)
    assert expected_rank >= 2
    row = evaluation_rows(evaluate_cases(loaded, [fact(0)], RELATIONS, progress=False))[0]
    assert row["relation.reliability"] == 1.0
    assert row["relation.rank"] == expected_rank and row["relation.top1"] == 0.0
    assert row["relation.mrr"] == pytest.approx(1 / expected_rank)


def test_batched_cases_equal_single_cases(tiny_gpt2):
    """Prompt de-duplication and per-case indexing: scoring cases together = scoring each alone."""
    facts = [fact(0), fact(1, subject="Lyon", template="The mother tongue of {} is", prompt="The mother tongue of Lyon is",
                         target_new="Dutch", paraphrase_prompts=(), neighborhood_prompts=()),
             fact(2, relation_id="P140", subject="Edwin", template="The official religion of {} is",
                  prompt="The official religion of Edwin is", target_true="Christianity", target_new="Islam",
                  paraphrase_prompts=("Edwin is affiliated with the religion",),
                  neighborhood_prompts=("The official religion of Paul is",), neighborhood_target="Christianity")]
    cases = prepare_cases(facts, RELATIONS)
    together = evaluation_rows(evaluate_cases(tiny_gpt2, cases, RELATIONS, batch_size=64, progress=False))
    alone = [evaluation_rows(evaluate_cases(tiny_gpt2, [case], RELATIONS, progress=False))[0] for case in cases]
    for a, b in zip(together, alone):
        assert a.keys() == b.keys()
        for key in a:
            if isinstance(a[key], float):
                assert a[key] == pytest.approx(b[key], abs=1e-4), key
            else:
                assert a[key] == b[key], key
    assert together[1]["entity.generality"] is None and together[1]["entity.locality"] is None
    assert together[1]["relation.locality"] is None  # no neighbourhood prompt -> no neighbour subject


def test_facts_are_accepted_directly(tiny_gpt2):
    rows = evaluation_rows(evaluate_cases(tiny_gpt2, [fact(3)], progress=False))
    assert rows[0]["case_id"] == 3 and rows[0]["relation.rank"] is not None


@pytest.mark.parametrize("changes, key", [
    ({"target_new": None}, "target_new"),
    ({"target_new": "French"}, "target_new"),
    ({"target_true": " French"}, "target_true"),
    ({"prompt": "  "}, "prompt"),
    ({"paraphrase_prompts": ("",)}, "paraphrase_prompts"),
    ({"neighborhood_target": " "}, "neighborhood_target"),
    ({"neighborhood_target": "English"}, "neighborhood_target"),
])
def test_malformed_cases_raise_named_errors(changes, key):
    with pytest.raises(DataError) as err:
        prepare_cases([fact(41, **changes)], RELATIONS)
    assert err.value.case_id == 41 and err.value.key == key
    assert "case 41" in str(err.value)


def test_duplicate_and_mismatched_requests():
    with pytest.raises(DataError, match="duplicate case id"):
        prepare_cases([fact(5), fact(5)], RELATIONS)
    other = build_relation_request(fact(6), RELATIONS["P103"])
    with pytest.raises(DataError, match="does not match") as err:
        prepare_cases([fact(5)], RELATIONS, requests={5: other})
    assert err.value.case_id == 5
    given = build_relation_request(fact(5), RELATIONS["P103"])
    assert prepare_cases([fact(5)], RELATIONS, requests={5: given})[0].relation is given


def test_unknown_relation_id_is_not_guessed():
    case = prepare_cases([fact(7, relation_id="P99999")], RELATIONS)[0]
    assert case.relation is None and case.template_prompts == ()


def test_stage_writes_rows_aggregates_and_table(compose_config, tmp_path):
    from pipeline.jobs import run_job

    cfg = compose_config("stage=evaluate", "model=tiny_gpt2", "dataset=counterfact", "stage.n_cases=3",
                         "stage.n_resamples=50", "stage.progress=false", "logger=none")
    result = run_job(cfg, tmp_path / "job")
    summary = result["results"]
    assert summary["n_cases"] == 3 and summary["n_relation_side"] + summary["n_without_relation"] == 3
    rows = read_jsonl(tmp_path / "job" / "cases.jsonl")
    assert len(rows) == 3 and {"entity.reliability", "relation.top1", "relation.mrr"} <= rows[0].keys()
    aggregates = read_json(tmp_path / "job" / "aggregates.json")
    assert aggregates["n_cases"] == 3 and aggregates["n_resamples"] == 50
    assert "### relation side" in (tmp_path / "job" / "table.md").read_text()
    assert run_job(cfg, tmp_path / "job")["results"] == summary  # done-marker: skipped


def test_stage_config_is_typed(compose_config):
    cfg = compose_config("stage=evaluate")
    assert OmegaConf.to_object(cfg.stage).n_cases == 200
    with pytest.raises(Exception, match="n_casez"):
        compose_config("stage=evaluate", "stage.n_casez=3")


def test_stage_rejects_dataset_without_new_objects(compose_config, tmp_path):
    from pipeline.jobs import run_job

    cfg = compose_config("stage=evaluate", "model=tiny_gpt2", "dataset=known", "dataset.limit=5", "logger=none")
    with pytest.raises(ConfigError, match="no new objects"):
        run_job(cfg, tmp_path / "job")
