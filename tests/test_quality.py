"""Scores a broken model cannot fake: fluency, held-out NLL, the collapse flag and examples.md.

Pure functions on hand-computed numbers; the generation and NLL helpers against plain loops on a
tiny random model; the edit stage end to end, once with ROME and once with an "editor" that wrecks
the model (its final norm scaled by 10), which must be flagged and never counted as a success.
"""

from __future__ import annotations

import contextlib
import math

import pytest
import torch

from core.io import read_json, read_jsonl
from metrics.quality import CollapseThresholds, guard_rows, is_collapsed, ngram_entropy, text_ngram_entropy, word_tokens

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: 1 torch thread (2 shared cores)

LOG2_3 = math.log2(3)


# -- fluency ---------------------------------------------------------------------------------------
def test_word_tokens_split_clitics_and_punctuation_like_treebank():
    assert word_tokens("Don't stop, Paris's well-known cafe...") == \
        ["Do", "n't", "stop", ",", "Paris", "'s", "well-known", "cafe", "..."]
    assert word_tokens('O\'Brien said "3.5 in the U.S." here.') == \
        ["O'Brien", "said", "``", "3.5", "in", "the", "U.S.", "''", "here", "."]


def test_ngram_entropy_hand_computed():
    # "a b c d": 3 distinct bigrams (log2 3 bits), 2 distinct trigrams (1 bit); weights 2/3, 4/3, mean of the two
    assert text_ngram_entropy("a b c d") == pytest.approx((2 / 3 * LOG2_3 + 4 / 3 * 1.0) / 2)
    # ties and a skewed distribution: bigrams ab ba ab ba (1 bit); trigrams aba bab aba (p = 2/3, 1/3)
    h3 = -(2 / 3 * math.log2(2 / 3) + 1 / 3 * math.log2(1 / 3))
    assert text_ngram_entropy("a b a b a") == pytest.approx((2 / 3 * 1.0 + 4 / 3 * h3) / 2)


def test_repeated_tokens_and_empty_texts_have_no_entropy():
    assert text_ngram_entropy("is is is is is is") == 0.0
    assert text_ngram_entropy("") == 0.0 and text_ngram_entropy("word") == 0.0  # no n-gram at all: 0 bits (ROME)
    looping = "the language of the language of the language of the language of the"
    fluent = "the film was shot in Paris and released in France two years later by Gaumont"
    assert text_ngram_entropy(looping) < 0.6 * text_ngram_entropy(fluent)


# SmolLM2 generations with ROME's score computed by NLTK 3.10.4 (sentences split at ". ", then
# NLTKWordTokenizer, then ROME's compute_n_gram_entropy formula), outside the package.
NLTK_FIXTURES = [
    (" French. She is a Canadian artist who has been inspired by the French language. She is a painter, writer, "
     "and musician. She is also a musician,", 4.648789534490213),
    (" the past. I'm from the future. I'm a time traveler, and I'm here to learn from you. I'm here to help you, to",
     4.547946030929246),
    (" English. She is a native of the United States. She is a mother of 12. She is a mother of 10. She is a",
     3.8600894543156916),
    (' of the Church of England, and his diet is often described as "unhealthy" by the Church. Edwin of Northumbria '
     "is also associated with the Church", 4.715770838530996),
]


@pytest.mark.parametrize("text, expected", NLTK_FIXTURES)
def test_ngram_entropy_matches_rome_with_nltk(text, expected):
    assert text_ngram_entropy(text) == pytest.approx(expected, abs=1e-9)


def test_ngram_entropy_is_the_mean_over_texts():
    assert ngram_entropy(["a b c d", "x x x x"]) == pytest.approx(text_ngram_entropy("a b c d") / 2)
    assert ngram_entropy([]) is None


# -- collapse ---------------------------------------------------------------------------------------
def test_is_collapsed_thresholds_on_hand_written_numbers():
    assert CollapseThresholds() == CollapseThresholds(max_nll_increase=0.1, max_fluency_drop=0.2)
    assert not is_collapsed(3.00, 3.05, 5.0, 5.0)  # +0.05 nats/token
    assert is_collapsed(3.00, 3.15, 5.0, 5.0)  # +0.15 nats/token
    assert not is_collapsed(3.0, 2.0, 5.0, 5.0)  # a lower NLL is no collapse
    assert is_collapsed(3.0, 3.0, 5.0, 3.9)  # fluency -22%
    assert not is_collapsed(3.0, 3.0, 5.0, 4.1)  # fluency -18%
    assert is_collapsed(3.0, math.nan, 5.0, 5.0) and is_collapsed(3.0, math.inf, 5.0, 5.0)
    assert not is_collapsed(None, 9.0, None, 0.0)  # nothing measured on the pre side: nothing to flag
    assert is_collapsed(None, None, 5.0, 1.0)  # one score alone can flag
    assert not is_collapsed(3.0, 3.15, 5.0, 5.0, CollapseThresholds(max_nll_increase=0.2))
    assert not is_collapsed(3.0, 3.0, 0.0, 0.0)  # a looping baseline cannot drop further


def test_guard_rows_turn_collapsed_successes_into_failures():
    rows = [{"case_id": 0, "entity.reliability": 1.0, "entity.locality": None},
            {"case_id": 1, "entity.reliability": 1.0, "entity.locality": 0.5}]
    out = guard_rows(rows, {0: True}, ["entity.reliability", "entity.locality"])
    assert out[0]["entity.reliability_guarded"] == 0.0 and out[0]["entity.locality_guarded"] is None
    assert out[1]["entity.reliability_guarded"] == 1.0 and out[1]["entity.locality_guarded"] == 0.5
    assert out[0]["entity.reliability"] == 1.0  # the plain rate is kept


def test_guarded_table_reports_the_darrieux_case_as_a_failure():
    """Reliability 0 -> 1 by a margin of 1e-4 while the held-out NLL exploded: counted, not a success."""
    from pipeline.stages.config import EditStageConfig
    from pipeline.stages.edit import _guarded_table

    pre = [{"case_id": 0, "entity.reliability": 0.0, "quality.nll": 3.2, "quality.fluency": 4.9},
           {"case_id": 1, "entity.reliability": 0.0, "quality.nll": 3.2, "quality.fluency": 4.5}]
    post = {0: {"case_id": 0, "entity.reliability": 1.0, "quality.nll": 9.0, "quality.fluency": 4.8},
            1: {"case_id": 1, "entity.reliability": 1.0, "quality.nll": 3.21, "quality.fluency": 4.4}}
    _, rows, table, n_collapsed = _guarded_table(pre, post, EditStageConfig(n_resamples=10), seed=0)
    assert n_collapsed == 1 and table.counts["n_collapsed"] == 1
    assert [row["quality.collapsed"] for row in rows] == [1.0, 0.0]
    assert table.row("entity.reliability").post.mean == 1.0
    assert table.row("entity.reliability_guarded").post.mean == 0.5
    assert table.row("quality.collapsed").post.mean == 0.5 and table.row("quality.nll").pre.mean == pytest.approx(3.2)


# -- model helpers -----------------------------------------------------------------------------------
def _argmax_loop(loaded, prompt: str, steps: int) -> str:
    ids = loaded.tokenizer(prompt, return_tensors="pt")["input_ids"]
    eos = loaded.model.generation_config.eos_token_id
    new: list[int] = []
    with torch.no_grad():
        for _ in range(steps):
            token = int(loaded.model(torch.cat([ids, torch.tensor([new], dtype=torch.long)], dim=1)).logits[0, -1].argmax())
            if token == eos:
                break
            new.append(token)
    return loaded.tokenizer.decode(new, skip_special_tokens=True)


@pytest.mark.parametrize("name", ["tiny_gpt2", "tiny_llama"])
def test_greedy_continuations_match_a_step_by_step_argmax_loop(name, model_cache):
    from models.predict import greedy_continuations
    from tests.conftest import _load

    loaded = _load(name, model_cache)
    prompts = ["The mother tongue of Danielle Darrieux is", "Paris is", "Where Edwin of Northumbria is from, people speak"]
    batched = greedy_continuations(loaded, prompts, 6, batch_size=3, progress=False)  # left-padded, lengths differ
    assert batched == [_argmax_loop(loaded, prompt, 6) for prompt in prompts]
    assert all(text for text in batched)


def test_stream_nll_matches_a_hand_loop(tiny_gpt2):
    from models.scoring import stream_nll

    tokens = torch.randint(0, 1000, (41,), generator=torch.Generator().manual_seed(0))
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, 41, 16):  # windows 16, 16 and a last one of 9 tokens
            window = tokens[start:start + 16]
            logprobs = torch.log_softmax(tiny_gpt2.model(window[None]).logits[0, :-1].double(), dim=-1)
            total -= float(logprobs.gather(-1, window[1:, None]).sum())
            count += len(window) - 1
    assert count == 38
    assert stream_nll(tiny_gpt2, tokens, window=16, batch_size=2) == pytest.approx(total / count, rel=1e-5)
    assert stream_nll(tiny_gpt2, tokens[:33], window=16) == pytest.approx(
        stream_nll(tiny_gpt2, tokens[:32], window=16), rel=1e-6)  # a 1-token remainder predicts nothing


def test_heldout_tokens_are_the_slice_prefix_and_cached(tiny_gpt2, tmp_path, monkeypatch):
    from facts import heldout
    from facts.config import HeldoutSlice
    from facts.heldout import heldout_tokens

    spec = HeldoutSlice(n_tokens=300)
    tokens = heldout_tokens(tiny_gpt2, spec, cache_dir=tmp_path)
    assert tokens.shape == (300,) and tokens.dtype == torch.long
    assert tiny_gpt2.tokenizer.decode(tokens[:8]).startswith("Robert Boulter is an English film")
    monkeypatch.setattr(heldout, "_tokenize", lambda *args: pytest.fail("tokenized again despite the cache"))
    assert torch.equal(heldout_tokens(tiny_gpt2, spec, cache_dir=tmp_path), tokens)
    assert len([p for p in (tmp_path / "heldout_tokens").iterdir() if p.is_dir()]) == 1


# -- the edit stage ------------------------------------------------------------------------------------
FAST = ["model=tiny_gpt2", "dataset=counterfact", "logger=none", "editor.layers=[1]", "editor.stats.n_samples=40",
        "editor.stats.max_tokens=48", "editor.v_num_grad_steps=2", "editor.context_template_lengths=[[3,2]]",
        "stage.n_cases=2", "stage.n_resamples=20", "stage.progress=false", "stage.quality.max_new_tokens=8",
        "stage.quality.nll_tokens=128", "stage.quality.nll_window=64", "stage.quality.n_examples=1"]


def test_edit_job_writes_quality_fields_and_examples(compose_config, tmp_path):
    from pipeline.jobs import run_job

    job = tmp_path / "job"
    results = run_job(compose_config("stage=edit", "editor=rome", "perspective=entity", *FAST), job)["results"]
    assert results["n_collapsed"] == 0 and "examples.md" in results["files"]
    rows = read_jsonl(job / "cases.jsonl")
    for row in rows:
        assert row["collapsed"] is False
        for side in ("pre", "post"):
            assert row[side]["quality.fluency"] >= 0 and row[side]["quality.nll"] > 0
            assert [g["prompt"] for g in row[side]["generations"]][0].startswith("The mother tongue") or row["case_id"] != 0
    assert rows[0]["pre"]["quality.nll"] == rows[1]["pre"]["quality.nll"]  # the unedited model: one NLL per job
    metrics = {row["metric"] for row in read_json(job / "aggregates.json")["rows"]}
    assert {"quality.fluency", "quality.nll", "quality.collapsed", "entity.reliability", "entity.score_guarded"} <= metrics
    assert read_json(job / "aggregates.json")["counts"]["n_collapsed"] == 0
    examples = (job / "examples.md").read_text()
    assert "## Case 0: Danielle Darrieux" in examples and "- pre: …" in examples and "- post: …" in examples
    assert "## Case 1" not in examples  # stage.quality.n_examples=1
    assert "### quality side" in (job / "table.md").read_text() and "Collapsed edits: 0" in (job / "table.md").read_text()


class _Wrecker:
    """An "editor" that breaks the model: the final norm's weight times 10 (peaked, wrong predictions)."""

    name = "wreck"
    default_edit_batch_size = 1

    @contextlib.contextmanager
    def apply(self, loaded, requests):
        weight = loaded.adapter.module(loaded.model, "final_norm").weight
        original = weight.detach().clone()
        with torch.no_grad():
            weight.mul_(10.0)
        try:
            yield type("Result", (), {"infos": [{} for _ in requests], "seconds": 0.0})()
        finally:
            with torch.no_grad():
                weight.copy_(original)


def test_a_wrecked_model_is_flagged_collapsed_and_never_a_success(compose_config, tmp_path, monkeypatch):
    import pipeline.stages.edit as edit
    from pipeline.jobs import run_job

    monkeypatch.setattr(edit, "build_editor", lambda *args, **kwargs: _Wrecker())
    job = tmp_path / "sweep" / "job"
    results = run_job(compose_config("stage=edit", "editor=rome", "perspective=entity", *FAST), job)["results"]
    rows = read_jsonl(job / "cases.jsonl")
    assert results["n_collapsed"] == 2 and all(row["collapsed"] for row in rows)
    for row in rows:
        assert row["post"]["quality.nll"] > row["pre"]["quality.nll"] + 1.0
        assert row["post"]["entity.reliability_guarded"] == 0.0 and row["post"]["entity.generality_guarded"] == 0.0
        assert row["pre"]["entity.reliability_guarded"] == row["pre"]["entity.reliability"]
    table = {row["metric"]: row for row in read_json(job / "aggregates.json")["rows"]}
    assert table["entity.reliability_guarded"]["post"]["mean"] == 0.0 and table["entity.score_guarded"]["post"]["mean"] == 0.0
    assert table["quality.collapsed"]["post"]["mean"] == 1.0
    assert "Collapsed edits: 2" in (job / "table.md").read_text()

    # the sweep summary shows the collapse count and prints NLL in nats, not as a percentage
    run_job(compose_config("stage=summarize", f"stage.sweep_dir={tmp_path / 'sweep'}", "logger=none"), tmp_path / "summary")
    summary = (tmp_path / "summary" / "summary.md").read_text()
    assert "rome entity (tiny_gpt2): 2 of 2" in summary
    nll_row = next(line for line in summary.splitlines() if "| quality | nll |" in line)
    assert f"| {rows[0]['pre']['quality.nll']:.3f} |" in nll_row and "%" not in nll_row
    assert "| entity | reliability_guarded |" in summary


def test_quality_settings_are_validated_and_typos_fail(compose_config):
    from omegaconf import OmegaConf

    from core.errors import ConfigError

    for override, key in (("stage.quality.collapse.max_fluency_drop=1.5", "stage.quality.collapse.max_fluency_drop"),
                          ("stage.quality.max_new_tokens=0", "stage.quality.max_new_tokens"),
                          ("stage.quality.nll_tokens=1", "stage.quality.nll_tokens")):
        with pytest.raises(ConfigError) as error:
            OmegaConf.to_object(compose_config("stage=edit", override).stage).validate()
        assert error.value.key == key
    OmegaConf.to_object(compose_config("stage=full", "stage.edit.quality.n_examples=0").stage).edit.validate("stage.edit")
    with pytest.raises(Exception):
        compose_config("stage=edit", "stage.quality.max_new_token=3")
