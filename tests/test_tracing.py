"""The batched tracing engine against the one-forward-per-restoration oracle, on every tiny family."""

from __future__ import annotations

import pytest
import torch

from tracing.api import perspective_char_spans
from tracing.engine import _run_chunk, engine_scores, plan_jobs
from tracing.inputs import make_inputs
from tracing.reference import reference_scores
from tracing.settings import TraceSettings, window_layers
from tracing.spans import corrupted_positions

# Short on purpose (the reference runs tokens x layers x kinds forwards); the subject sits in the
# middle so the relation perspective corrupts two token spans.
PROMPT = "The capital of Italy is"
SUBJECT = "Italy"


def _inputs(loaded, perspective: str, settings: TraceSettings, answer_id=None, relation_span="template"):
    spans = perspective_char_spans(PROMPT, SUBJECT, perspective, relation_span)
    ids, positions = corrupted_positions(loaded.tokenizer, PROMPT, spans)
    return make_inputs(ids, positions, answer_id, settings, loaded.adapter.d_model, PROMPT)


def _assert_close(a, b, tol=1e-5):
    assert a.answer_id == b.answer_id
    assert abs(a.p_clean - b.p_clean) < tol and abs(a.p_corrupted - b.p_corrupted) < tol
    assert sorted(a.scores) == sorted(b.scores)
    for name in a.scores:
        diff = (a.scores[name] - b.scores[name]).abs().max().item()
        assert diff < tol, f"{name}: max |engine - reference| = {diff}"


@pytest.mark.parametrize("perspective,window", [("entity", 3), ("relation", 2)])
def test_engine_matches_reference(tiny_model, perspective, window):
    settings = TraceSettings(kinds=("hidden", "mlp", "attn"), severed=("mlp", "attn"), window=window, samples=2,
                             noise_scale=0.5, seed=3)
    inputs = _inputs(tiny_model, perspective, settings)
    # max_rows=5 forces several chunks per token (2 jobs x 2 samples), exercising the staircase joins.
    _assert_close(engine_scores(tiny_model, inputs, settings, max_rows=5), reference_scores(tiny_model, inputs, settings))


def test_engine_matches_reference_phrase_span_true_answer(tiny_gpt2):
    settings = TraceSettings(kinds=("hidden", "mlp"), window=10, samples=3, noise="uniform", noise_scale=1.0)
    answer = tiny_gpt2.tokenizer(" Rome", add_special_tokens=False)["input_ids"][0]
    inputs = _inputs(tiny_gpt2, "relation", settings, answer_id=answer, relation_span="phrase")
    engine = engine_scores(tiny_gpt2, inputs, settings)
    assert engine.answer_id == answer
    _assert_close(engine, reference_scores(tiny_gpt2, inputs, settings))


def test_seeds_reproduce_and_differ(tiny_gpt2):
    settings = TraceSettings(kinds=("hidden",), samples=2, noise_scale=0.5, seed=1)
    first = engine_scores(tiny_gpt2, _inputs(tiny_gpt2, "entity", settings), settings)
    again = engine_scores(tiny_gpt2, _inputs(tiny_gpt2, "entity", settings), settings)
    assert torch.equal(first.scores["hidden"], again.scores["hidden"]) and first.p_corrupted == again.p_corrupted
    other = TraceSettings(kinds=("hidden",), samples=2, noise_scale=0.5, seed=2)
    different = engine_scores(tiny_gpt2, _inputs(tiny_gpt2, "entity", other), other)
    assert different.p_corrupted != first.p_corrupted


def test_zero_noise_restores_nothing(tiny_model):
    """Without noise the corrupted run is the clean run: every restoration gives the clean p."""
    settings = TraceSettings(kinds=("hidden", "mlp", "attn"), severed=("mlp",), samples=2, noise_scale=0.0, window=2)
    result = engine_scores(tiny_model, _inputs(tiny_model, "entity", settings), settings)
    assert abs(result.p_corrupted - result.p_clean) < 1e-6
    for table in result.scores.values():
        assert torch.allclose(table, torch.full_like(table, result.p_clean), atol=1e-5)


def test_last_cell_is_clean_and_prefix_is_corrupted(tiny_model):
    loaded = tiny_model
    settings = TraceSettings(kinds=("hidden",), samples=2, noise_scale=1.0)
    inputs = _inputs(loaded, "entity", settings)
    result = engine_scores(loaded, inputs, settings)
    hidden = result.scores["hidden"]
    assert abs(hidden[-1, -1].item() - result.p_clean) < 1e-6  # the final state of the last token is the clean one
    before = min(inputs.positions)
    assert before > 0 and torch.all(hidden[:before] == result.p_corrupted)


def test_out_of_memory_backoff(tiny_gpt2, monkeypatch):
    """A chunk that raises out-of-memory is split in halves and the results are unchanged."""
    import tracing.engine as engine

    settings = TraceSettings(kinds=("hidden", "mlp"), samples=2, noise_scale=0.5)
    inputs = _inputs(tiny_gpt2, "entity", settings)
    expected = engine_scores(tiny_gpt2, inputs, settings)
    calls = []

    def flaky(stack, clean, corrupted, t, jobs, samples, answer_id):
        calls.append(len(jobs))
        if len(jobs) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return _run_chunk(stack, clean, corrupted, t, jobs, samples, answer_id)

    monkeypatch.setattr(engine, "_run_chunk", flaky)
    got = engine_scores(tiny_gpt2, inputs, settings, max_rows=100)
    assert max(calls) > 2 and any(n <= 2 for n in calls)
    assert torch.allclose(got.scores["hidden"], expected.scores["hidden"], atol=1e-6)


def test_plan_jobs_windows():
    jobs = plan_jobs(TraceSettings(kinds=("hidden", "mlp"), severed=("attn",), window=10), n_layers=12)
    assert len(jobs) == 36
    mlp = {job.layer: job for job in jobs if job.name == "mlp"}
    assert mlp[0].patched == range(0, 5) and mlp[6].patched == range(1, 11) and mlp[11].patched == range(6, 12)
    assert mlp[6].entry == 1
    severed = {job.layer: job for job in jobs if job.name == "hidden_severed_attn"}
    assert severed[3].patched == range(4, 12) and not severed[3].from_clean and severed[3].entry == 4
    assert window_layers(5, 1, 12) == range(5, 6) and window_layers(0, 3, 12) == range(0, 2)


def test_smollm2_engine_matches_reference_on_cells(smollm2):
    settings = TraceSettings(kinds=("hidden",), severed=("mlp",), samples=2, noise_scale=0.1)
    prompt = "The Eiffel Tower is in"
    ids, positions = corrupted_positions(smollm2.tokenizer, prompt, perspective_char_spans(prompt, "The Eiffel Tower", "entity"))
    inputs = make_inputs(ids, positions, None, settings, smollm2.adapter.d_model, prompt)
    cells = [(1, 0), (3, 14), (len(ids) - 1, 20), (len(ids) - 2, 29)]
    assert len(ids) == 6 and list(positions) == [0, 1, 2, 3]
    reference = reference_scores(smollm2, inputs, settings, cells=cells)
    engine = engine_scores(smollm2, inputs, settings)
    assert abs(engine.p_clean - reference.p_clean) < 1e-5
    for name in engine.scores:
        for t, layer in cells:
            assert abs(engine.scores[name][t, layer] - reference.scores[name][t, layer]) < 1e-5, (name, t, layer)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_engine_runs_in_half_precision(dtype):
    """bf16 / fp16 models trace in their own dtype; the engine stays close to the reference in that dtype."""
    from dataclasses import replace

    from models import load_model
    from models.config import model_config_by_name

    loaded = load_model(replace(model_config_by_name("tiny_llama"), dtype=dtype))
    assert next(loaded.model.parameters()).dtype == getattr(torch, dtype)
    settings = TraceSettings(kinds=("hidden", "attn"), severed=("mlp",), samples=2, window=2, noise_scale=0.5)
    inputs = _inputs(loaded, "entity", settings)
    engine, reference = engine_scores(loaded, inputs, settings), reference_scores(loaded, inputs, settings)
    for name, table in engine.scores.items():
        assert torch.isfinite(table).all() and (table >= 0).all() and (table <= 1).all()
        assert (table - reference.scores[name]).abs().max() < 2e-2
