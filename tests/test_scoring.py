"""models.scoring: exact NLLs on controlled logits, agreement with plain forwards, cache == concat."""

from __future__ import annotations

import math

import pytest
import torch

from core.errors import DataError
from helpers import bias_only
from models import Hooks
from models.scoring import candidate_nll, encode_targets, target_nll

PROMPTS = ["The capital of France is", "Danielle Darrieux's mother tongue is", "Hi", "In Rome, the official language is"]
CANDIDATES = ["Paris", "London town", "French", "native language of the state"]


def expected_nll(loaded, bias: torch.Tensor, target: str) -> float:
    """Hand formula: mean over the target's tokens of logsumexp(bias) - bias[token]."""
    ids = loaded.tokenizer(" " + target, add_special_tokens=False)["input_ids"]
    log_z = torch.logsumexp(bias.double(), dim=0).item()
    return sum(log_z - bias[i].item() for i in ids) / len(ids)


def reference_nll(loaded, prompt: str, target: str) -> float:
    """One plain forward of the full model on prompt ids + target ids (ROME's construction)."""
    prompt_ids = loaded.tokenizer(prompt)["input_ids"]
    target_ids = loaded.tokenizer(" " + target, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = loaded.model(torch.tensor([prompt_ids + target_ids])).logits[0].float()
    logprobs = torch.log_softmax(logits, dim=-1)
    return -sum(logprobs[len(prompt_ids) - 1 + j, t].item() for j, t in enumerate(target_ids)) / len(target_ids)


def test_bias_model_gives_hand_computed_nll():
    paris, london, town = 7042, 4528, 3102
    loaded, bias = bias_only({paris: 6.0, london: 2.0, town: -1.0})
    assert encode_targets(loaded, ["Paris", "London town"]) == [[paris], [london, town]]
    log_z = math.log(49152 - 3 + math.exp(6.0) + math.exp(2.0) + math.exp(-1.0))
    nll = target_nll(loaded, ["The capital of France is", "Hi"], ["Paris", "London town"])
    assert nll.tolist() == pytest.approx([log_z - 6.0, log_z - (2.0 - 1.0) / 2], abs=1e-4)  # fp32 softmax over 49k logits
    for method in ("cache", "concat"):
        scores = candidate_nll(loaded, PROMPTS, [CANDIDATES] * len(PROMPTS), batch_size=5, method=method)
        expected = torch.tensor([[expected_nll(loaded, bias, c) for c in CANDIDATES]] * len(PROMPTS))
        torch.testing.assert_close(scores, expected.float(), atol=1e-4, rtol=0)


def test_target_nll_matches_plain_forward(tiny_model):
    pairs = [(p, c) for p in PROMPTS for c in CANDIDATES[1:3]]
    nll = target_nll(tiny_model, [p for p, _ in pairs], [c for _, c in pairs], batch_size=5)
    expected = torch.tensor([reference_nll(tiny_model, p, c) for p, c in pairs])
    torch.testing.assert_close(nll, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("batch_size", [3, 256])
def test_cached_candidates_match_concatenation(tiny_model, batch_size):
    candidates = [CANDIDATES, CANDIDATES[::-1], ["Paris", "French", "Hi", "native language"], CANDIDATES]
    cached = candidate_nll(tiny_model, PROMPTS, candidates, batch_size=batch_size, method="cache")
    concat = candidate_nll(tiny_model, PROMPTS, candidates, batch_size=batch_size, method="concat")
    assert cached.shape == (len(PROMPTS), 4)
    torch.testing.assert_close(cached, concat, atol=1e-5, rtol=0)
    assert cached[0, 0].item() == pytest.approx(reference_nll(tiny_model, PROMPTS[0], "Paris"), abs=1e-5)


def test_hooks_on_final_norm_apply_to_both_paths(tiny_model):
    """Zeroed final hidden states leave logits = the unembedding's bias (zero for GPT-2/Llama: uniform)."""
    unembed = tiny_model.adapter.module(tiny_model.model, "unembed")
    bias = unembed(torch.zeros(tiny_model.adapter.d_model)).detach()
    zero = {"hook_final_norm": lambda tensor, name: torch.zeros_like(tensor)}
    with Hooks(tiny_model.model, tiny_model.adapter, zero):
        cached = candidate_nll(tiny_model, PROMPTS[:2], [CANDIDATES[:2]] * 2, method="cache")
        concat = candidate_nll(tiny_model, PROMPTS[:2], [CANDIDATES[:2]] * 2, method="concat")
    expected = torch.tensor([[expected_nll(tiny_model, bias, c) for c in CANDIDATES[:2]]] * 2)
    torch.testing.assert_close(cached, expected.float(), atol=1e-5, rtol=0)
    torch.testing.assert_close(concat, expected.float(), atol=1e-5, rtol=0)
    if not bias.any():
        assert cached.flatten().tolist() == pytest.approx([math.log(tiny_model.adapter.vocab_size)] * 4, abs=1e-5)


def test_empty_inputs(tiny_gpt2):
    assert target_nll(tiny_gpt2, [], []).shape == (0,)
    assert candidate_nll(tiny_gpt2, [], []).shape == (0, 0)


@pytest.mark.parametrize("prompts, targets, match", [
    (["Hi"], [""], "empty target"),
    (["Hi"], [" Paris"], "whitespace"),
    (["Hi", "Ho"], ["Paris"], "1 targets"),
    ([""], ["Paris"], "no tokens"),
])
def test_target_nll_errors(tiny_gpt2, prompts, targets, match):
    with pytest.raises(DataError, match=match):
        target_nll(tiny_gpt2, prompts, targets)


def test_candidate_nll_errors(tiny_gpt2):
    with pytest.raises(DataError, match="same, non-zero number"):
        candidate_nll(tiny_gpt2, ["Hi", "Ho"], [["a", "b"], ["a"]])
    with pytest.raises(DataError, match="candidate lists"):
        candidate_nll(tiny_gpt2, ["Hi", "Ho"], [["a"]])
    with pytest.raises(DataError, match="unknown scoring method"):
        candidate_nll(tiny_gpt2, ["Hi"], [["a"]], method="fast")
