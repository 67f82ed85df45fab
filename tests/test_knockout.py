"""Attention knockout: the mask hook point (exact zeros, nothing else changed, eager = sdpa), the batched
knockout against the full-model reference on every tiny family, the two limits (nothing knocked out,
everything knocked out), source sets, aggregation, config errors, the trace stage and the figure."""

from __future__ import annotations

import json
import math
import os
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from core.errors import ConfigError, DataError, ModelError
from models.blocks import BlockStack, has_sliding_window
from models.hooks import Hooks
from tracing import TraceSettings, trace, trace_fact
from tracing.aggregate import KNOCKOUT, RoleAIE, aggregate_aie, aggregate_knockout
from tracing.engine import record_run
from tracing.knockout import KnockJob, _run_chunk, knockout_drops
from tracing.reference import reference_knockout
from tracing.result import TraceResult
from tracing.settings import KNOCKOUT_SOURCES, knockout_key
from tracing.spans import knockout_positions, knockout_sources

PROMPT = "The capital of Italy is the city of"
SUBJECT = "Italy"


@contextmanager
def attention(loaded, implementation: str):
    """Run ``loaded`` with another attention implementation (transformers reads it per forward)."""
    config = loaded.model.config
    before = config._attn_implementation
    config._attn_implementation = implementation
    try:
        yield
    finally:
        config._attn_implementation = before


def _ids(loaded, prompt=PROMPT):
    return loaded.tokenizer(prompt, return_tensors="pt")["input_ids"]


def _blocker(positions, n_tokens):
    """A mask hook fn: the last query row may not attend to ``positions``."""
    def block(allowed, name):
        allowed = allowed.expand(-1, -1, n_tokens, n_tokens).clone()
        allowed[..., -1, list(positions)] = False
        return allowed
    return block


# ---------------------------------------------------------------- the mask hook point

def test_mask_hook_zeroes_exactly_the_blocked_edges(tiny_model, one_thread):
    loaded, ids = tiny_model, _ids(tiny_model)
    n, blocked, layer = ids.shape[1], [1, 3], 1
    with attention(loaded, "eager"), torch.no_grad():
        clean = loaded.model(input_ids=ids, use_cache=False, output_attentions=True)
        with Hooks(loaded.model, loaded.adapter, {f"blocks.{layer}.attn.hook_mask": _blocker(blocked, n)}):
            knocked = loaded.model(input_ids=ids, use_cache=False, output_attentions=True)
    before, after = clean.attentions[layer][0], knocked.attentions[layer][0]  # [head query key]
    assert torch.equal(knocked.attentions[0], clean.attentions[0])  # layers below: untouched
    assert torch.equal(after[:, :-1], before[:, :-1])  # other queries of the layer: untouched
    assert torch.all(after[:, -1, blocked] == 0)  # blocked edges: exactly zero
    kept = [k for k in range(n) if k not in blocked]
    renormalised = before[:, -1, kept] / before[:, -1, kept].sum(-1, keepdim=True)
    torch.testing.assert_close(after[:, -1, kept], renormalised, atol=1e-6, rtol=1e-5)  # the rest: the same scores
    assert torch.equal(knocked.logits[0, :-1], clean.logits[0, :-1])  # earlier positions: untouched


def test_mask_hook_agrees_in_eager_and_sdpa_and_a_no_op_changes_nothing(tiny_model, one_thread):
    loaded, ids = tiny_model, _ids(tiny_model)
    n = ids.shape[1]
    names = [f"blocks.{layer}.attn.hook_mask" for layer in range(loaded.adapter.n_layers)]
    logits = {}
    for implementation in ("eager", "sdpa"):
        with attention(loaded, implementation), torch.no_grad():
            logits[implementation, "clean"] = loaded.model(input_ids=ids, use_cache=False).logits[0]
            with Hooks(loaded.model, loaded.adapter, {name: (lambda allowed, name: allowed.clone()) for name in names}):
                logits[implementation, "no-op"] = loaded.model(input_ids=ids, use_cache=False).logits[0]
            with Hooks(loaded.model, loaded.adapter, {names[1]: _blocker([0, 2], n)}):
                logits[implementation, "knocked"] = loaded.model(input_ids=ids, use_cache=False).logits[0]
    assert torch.equal(logits["eager", "no-op"], logits["eager", "clean"])  # additive mask kept as it was
    torch.testing.assert_close(logits["sdpa", "no-op"], logits["sdpa", "clean"], atol=1e-5, rtol=0)  # causal flag -> mask
    torch.testing.assert_close(logits["sdpa", "knocked"], logits["eager", "knocked"], atol=1e-5, rtol=0)
    assert (logits["eager", "knocked"][-1] - logits["eager", "clean"][-1]).abs().max() > 1e-4


# ---------------------------------------------------------------- batched knockout vs the reference

@pytest.mark.parametrize("window,max_rows", [(2, None), (3, 5)])
def test_knockout_matches_reference(tiny_model, one_thread, window, max_rows):
    """Batched single-position runs from the clean cache = one full forward with a full 4D mask per window."""
    settings = TraceSettings(kinds=("knockout",), window=window, samples=1, noise_scale=0.0)
    if has_sliding_window(tiny_model.model):  # Gemma 3: refused by name until the batched runs handle windows
        with pytest.raises(ModelError, match="sliding-window"):
            trace(tiny_model, PROMPT, SUBJECT, settings=settings, max_rows=max_rows)
        return
    engine = trace(tiny_model, PROMPT, SUBJECT, settings=settings, max_rows=max_rows)
    reference = trace(tiny_model, PROMPT, SUBJECT, settings=settings, engine="reference")
    assert engine.sources == {"subject": [3], "relation": [0, 1, 2, 4, 5, 6], "last": [7]}
    assert engine.answer_id == reference.answer_id and abs(engine.p_clean - reference.p_clean) < 1e-7
    drops, expected = engine.knockout(), reference.knockout()
    assert drops.shape == (3, tiny_model.adapter.n_layers)
    diff = (drops - expected).abs().max().item()
    assert diff < 1e-5, f"max |batched - reference| relative drop = {diff}"
    assert drops.abs().max() > 1e-3  # the knockout does something, so the comparison can fail


def _clean(loaded, ids):
    stack = BlockStack(loaded.model, loaded.adapter)
    clean = record_run(stack, stack.token_embeddings(ids), [])
    return stack, clean, torch.softmax(clean.last_logits[0], -1)


def test_knocking_out_nothing_is_the_clean_run(tiny_model, one_thread):
    ids = _ids(tiny_model)
    stack, clean, probs = _clean(tiny_model, ids)
    n_layers = stack.n_layers
    answer = int(probs.argmax())
    jobs = [KnockJob("nothing", layer, (), range(max(0, layer - 1), min(n_layers, layer + 2))) for layer in range(n_layers)]
    p = _run_chunk(stack, clean.resid[0], clean.keys, clean.values, jobs, answer)
    torch.testing.assert_close(p, probs[answer].expand(n_layers), atol=1e-6, rtol=0)
    nothing = {"subject": [], "relation": [], "last": []}
    assert all(torch.isnan(row).all() for row in knockout_drops(
        stack, clean.resid[0], clean.keys, clean.values, nothing, 3, answer, float(probs[answer])).values())


def test_knocking_out_every_source_at_all_layers_leaves_the_last_token_alone(tiny_model, one_thread):
    """Every edge but the last token's own, at every layer: the last token sees only itself, so its
    p(answer) is the model's on that one token at its position."""
    loaded, ids = tiny_model, _ids(tiny_model)
    n, n_layers = ids.shape[1], loaded.adapter.n_layers
    stack, clean, probs = _clean(loaded, ids)
    answer = int(probs.argmax())
    p_clean = float(probs[answer])
    everything = {"subject": list(range(n - 1)), "relation": [], "last": []}
    drops = knockout_drops(stack, clean.resid[0], clean.keys, clean.values, everything, 2 * n_layers + 1, answer, p_clean)
    reference = reference_knockout(loaded, ids, everything, 2 * n_layers + 1, answer, p_clean)
    with torch.no_grad():
        alone = loaded.model(input_ids=ids[:, -1:], position_ids=torch.tensor([[n - 1]]), use_cache=False).logits[0, -1]
    p_alone = float(torch.softmax(alone.float(), -1)[answer])
    for row in (drops["knockout_subject"][0], reference["knockout_subject"][0]):
        torch.testing.assert_close(p_clean * (1 + row), torch.full((n_layers,), p_alone), atol=1e-6, rtol=1e-5)
    names = [f"blocks.{layer}.attn.hook_mask" for layer in range(n_layers)]
    with attention(loaded, "eager"), torch.no_grad(), Hooks(loaded.model, loaded.adapter,
                                                             {name: _blocker(range(n - 1), n) for name in names}):
        attentions = loaded.model(input_ids=ids, use_cache=False, output_attentions=True).attentions
    for weights in attentions:  # [1 head query key]
        assert torch.all(weights[0, :, -1, :-1] == 0) and torch.allclose(weights[0, :, -1, -1], torch.ones(()))


# ---------------------------------------------------------------- source sets and perspectives

def test_source_sets_are_disjoint_and_lose_the_last_token():
    assert knockout_sources(6, [1, 2], [0, 3, 4, 5]) == {"subject": [1, 2], "relation": [0, 3, 4], "last": [5]}
    # a prompt that ends with its subject: the last token is only "last"
    assert knockout_sources(4, [2, 3], [0, 1]) == {"subject": [2], "relation": [0, 1], "last": [3]}


def test_phrase_relation_span_and_token_positions(tiny_gpt2):
    prompt = "Italy is located in the continent of"
    phrase = knockout_positions(tiny_gpt2.tokenizer, prompt, {"subject": [(0, 5)], "relation": [(9, 16)]})
    assert phrase == {"subject": [0], "relation": [2], "last": [6]}


def test_knockout_is_the_same_in_both_perspectives(tiny_gpt2, one_thread):
    from facts.schema import Fact

    fact = Fact(case_id=7, subject=SUBJECT, relation_id=None, template="The capital of {} is the city of",
                prompt=PROMPT, target_true="Rome")
    settings = TraceSettings(kinds=("hidden", "knockout"), window=2, samples=2, noise_scale=0.5)
    entity = trace_fact(tiny_gpt2, fact, "entity", settings=settings)
    relation = trace_fact(tiny_gpt2, fact, "relation", settings=settings)
    assert entity.corrupted != relation.corrupted and entity.sources == relation.sources
    assert torch.equal(entity.knockout(), relation.knockout())
    assert entity.table_names == ["hidden"] and entity.n_layers == tiny_gpt2.adapter.n_layers
    phrase = trace_fact(tiny_gpt2, fact, "entity", settings=settings, relation_span="phrase")
    assert phrase.sources["relation"] != entity.sources["relation"]


def test_knockout_saves_loads_and_caches(tiny_gpt2, tmp_path, one_thread):
    settings = TraceSettings(kinds=("knockout",), window=2, samples=1, noise_scale=0.1)
    result = trace(tiny_gpt2, PROMPT, SUBJECT, settings=settings, cache_dir=tmp_path)
    cached = trace(tiny_gpt2, PROMPT, SUBJECT, settings=settings, cache_dir=tmp_path)
    assert cached.from_cache and torch.equal(cached.knockout(), result.knockout()) and cached.sources == result.sources
    phrase = trace(tiny_gpt2, PROMPT, SUBJECT, settings=settings, cache_dir=tmp_path, relation_span="phrase")
    assert not phrase.from_cache  # other relation tokens, another cache entry
    assert math.isnan(result.p_corrupted)  # a knockout alone runs no corrupted run
    result.save(tmp_path / "out")
    assert json.dumps(TraceResult.load(tmp_path / "out").metadata()) == json.dumps(result.metadata())


# ---------------------------------------------------------------- errors

def test_knockout_config_errors(tiny_gpt2):
    with pytest.raises(ConfigError, match="trace.kinds='knockoff'"):
        TraceSettings(kinds=("knockoff",))
    with pytest.raises(ConfigError, match="needs the subject"):
        trace(tiny_gpt2, PROMPT, char_spans=[(15, 20)], kinds="knockout", noise_std=0.1)
    ids = _ids(tiny_gpt2)
    with pytest.raises(ConfigError, match="needs the source sets"):
        reference_knockout(tiny_gpt2, ids, {"subject": [1]}, 2, 0, 0.5)
    with pytest.raises(DataError, match="aggregate_knockout"):
        aggregate_aie([], knockout_key("subject"))
    assert TraceSettings().kinds == ("hidden", "mlp", "attn")  # knockout only when asked for


# ---------------------------------------------------------------- aggregation

def _knocked(drops: list[list[float]], perspective="entity") -> TraceResult:
    table = torch.tensor(drops)
    return TraceResult(prompt="p", tokens=["a", "b"], token_ids=[1, 2], corrupted=[0], char_spans=[(0, 1)],
                       perspective=perspective, answer=" x", answer_id=3, p_clean=0.5, p_corrupted=0.1,
                       scores={knockout_key(s): table[i:i + 1] for i, s in enumerate(KNOCKOUT_SOURCES)},
                       settings=TraceSettings(kinds=("knockout",), noise_scale=1.0))


def test_aggregate_knockout_means_over_facts_with_the_source():
    nan = math.nan
    a = _knocked([[-0.5, -0.1], [nan, nan], [0.0, 0.2]])
    b = _knocked([[-0.3, 0.1], [-0.2, -0.4], [0.0, 0.0]])
    agg = aggregate_knockout([a, b], n_bootstrap=50)
    assert agg.name == KNOCKOUT and agg.roles == KNOCKOUT_SOURCES
    assert torch.allclose(agg.mean, torch.tensor([[-0.4, 0.0], [-0.2, -0.4], [0.0, 0.1]]))
    assert agg.tokens.tolist() == [2, 1, 2] and agg.n_facts == 2
    assert torch.all(agg.low <= agg.mean + 1e-6) and torch.all(agg.mean <= agg.high + 1e-6)
    rows = agg.rows()
    assert [r["role"] for r in rows[::2]] == list(KNOCKOUT_SOURCES)
    back = RoleAIE.from_tensors(agg.tensors(), KNOCKOUT, "entity", 2, agg.p_clean, agg.p_corrupted, agg.confidence)
    assert back.rows() == rows
    with pytest.raises(DataError):
        aggregate_knockout([a, _knocked([[0.0, 0.0]] * 3, perspective="relation")])


# ---------------------------------------------------------------- stage and figure

def test_knockout_trace_stage_and_figure(compose_config, tiny_gpt2, tmp_path, one_thread):
    from helpers import write_known_user_facts
    from pipeline import figures
    from pipeline.jobs import run_job

    facts = write_known_user_facts(tiny_gpt2, tmp_path / "facts.jsonl")
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "models").symlink_to(Path(os.environ["KLOC_CACHE_DIR"]) / "models")
    sweep = tmp_path / "sweep"
    for perspective in ("entity", "relation"):
        cfg = compose_config("stage=trace", "model=tiny_gpt2", "dataset=user", f"dataset.path={tmp_path / 'facts.jsonl'}",
                             f"perspective={perspective}", "logger=none", f"paths.cache_dir={tmp_path / 'cache'}",
                             "stage.kinds=[knockout]", "stage.severed=false", "stage.window=2", "stage.n_bootstrap=50",
                             "stage.plot_facts=1", "stage.progress=false")
        summary = run_job(cfg, sweep / f"knockout-{perspective}")["results"]
        assert summary["n_traced"] == len(facts) and set(summary["peaks"][KNOCKOUT]) == set(KNOCKOUT_SOURCES)
        assert math.isnan(summary["p_corrupted"]) and summary["p_clean"] > 0
    job = sweep / "knockout-entity"
    rows = [json.loads(line) for line in (job / "aie.jsonl").read_text().splitlines()]
    assert {r["name"] for r in rows} == {KNOCKOUT} and {r["role"] for r in rows} == set(KNOCKOUT_SOURCES)
    assert len(rows) == 3 * tiny_gpt2.adapter.n_layers and all(r["low"] <= r["aie"] <= r["high"] for r in rows)
    assert (job / "figures" / "knockout.png").exists() and (job / "figures" / f"case_{facts[0]['case_id']}.png").exists()
    out = tmp_path / "figures"
    paths = figures.main(["knockout", "--sweep-dir", str(sweep), "--out", str(out)])
    assert {p.name for p in paths} == {"knockout.png", "knockout.pdf", "knockout.csv", "knockout.json"}
    drawn = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(figures, "save_figure", lambda fig, stem: drawn.append(fig) or [])
        figures.write_knockout(sweep, tmp_path / "again")
    assert drawn[0].get_suptitle().startswith("tiny_gpt2: ")  # the figure names its model
    table = json.loads((out / "knockout.json").read_text())
    assert set(table) == {"entity", "relation"}
    import pandas as pd

    frame = pd.read_csv(out / "knockout.csv")
    entity, relation = (frame[frame.perspective == p].reset_index(drop=True) for p in ("entity", "relation"))
    assert ((entity["aie"] - relation["aie"]).abs() < 1e-9).all()  # the sources do not depend on the perspective
    with pytest.raises(DataError, match="fig-trace-entity"):  # a knockout-only job is no restoration trace
        figures.main(["trace", "--perspective", "entity", "--sweep-dir", str(sweep), "--out", str(out)])
    with pytest.raises(DataError, match="fig-knockout"):
        figures.main(["knockout", "--sweep-dir", str(tmp_path / "cache"), "--out", str(out)])
