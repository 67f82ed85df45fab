"""FT: the L-inf bound holds, only the configured projection changes, and apply restores bit-for-bit."""

from __future__ import annotations

import pytest
import torch

from core.errors import ConfigError
from editors import build_editor
from editors.config import FtConfig
from editors.ft import target_batch, target_nll_rows
from editors.requests import EditRequest, Rewrite
from models.scoring import target_nll

REQUEST = EditRequest(0, "Danielle Darrieux", (Rewrite("The mother tongue of {} is", "English"),), "The mother tongue of {} is")


def _weights(loaded):
    return {n: p.detach().clone() for n, p in loaded.model.named_parameters()}


def test_ft_respects_norm_bound_and_restores(tiny_model):
    before = _weights(tiny_model)
    prompt = "The mother tongue of Danielle Darrieux is"
    nll_before = float(target_nll(tiny_model, [prompt], ["English"])[0])
    eps = 1e-3
    editor = build_editor(FtConfig(layers=[1], num_steps=10, lr=1e-2, norm_constraint=eps, early_stop_loss=0.0))
    with editor.apply(tiny_model, [REQUEST]) as result:
        after = _weights(tiny_model)
        nll_after = float(target_nll(tiny_model, [prompt], ["English"])[0])
        changed = [n for n in before if not torch.equal(before[n], after[n])]
        weight = tiny_model.adapter.mlp_out_weight(tiny_model.model, 1)
        name = next(n for n, p in tiny_model.model.named_parameters() if p is weight)
        assert changed == [name]
        change = (after[name] - before[name]).abs().max().item()
        assert 0 < change <= eps * (1 + 1e-4)
        assert result.infos[0]["steps"] == 10
    assert nll_after < nll_before
    assert all(torch.equal(before[n], p) for n, p in tiny_model.model.named_parameters())


def test_ft_unconstrained_moves_further_and_stops_early(tiny_gpt2):
    config = FtConfig(layers=[3], num_steps=200, lr=5e-2, norm_constraint=None, early_stop_loss=8.0)
    with build_editor(config).apply(tiny_gpt2, [REQUEST]) as result:
        info = result.infos[0]
        assert info["max_abs_change"] > 1e-3
        assert info["loss_first"] > 8.0 > info["loss_last"] and info["steps"] < 200  # stopped once below the threshold


def test_target_batch_matches_scoring(tiny_gpt2):
    prompts, targets = ["The capital of France is", "Paris is in"], ["Paris", "the country of France"]
    batch = target_batch(tiny_gpt2, prompts, targets)
    with torch.no_grad():
        rows = target_nll_rows(tiny_gpt2.model(**batch.inputs()).logits, batch)
    torch.testing.assert_close(rows.cpu(), target_nll(tiny_gpt2, prompts, targets), rtol=1e-5, atol=1e-5)


def test_ft_config_errors(tiny_gpt2):
    with pytest.raises(ConfigError, match="editor.layers"):
        build_editor(FtConfig(layers=[9])).apply(tiny_gpt2, [REQUEST])
    with pytest.raises(ConfigError, match="editor.rewrites"):
        build_editor(FtConfig(rewrites="some")).apply(tiny_gpt2, [REQUEST])


def test_ft_train_bias_restores_bias(tiny_gpt2):
    """train_bias: the bias is trained, in the deltas, and restored bit-for-bit with the weight."""
    before = _weights(tiny_gpt2)
    config = FtConfig(layers=[1], num_steps=3, lr=1e-2, norm_constraint=1e-3, early_stop_loss=0.0, train_bias=True)
    with build_editor(config).apply(tiny_gpt2, [REQUEST]) as result:
        after = _weights(tiny_gpt2)
        assert sorted(result.deltas.deltas) == ["transformer.h.1.mlp.c_proj.bias", "transformer.h.1.mlp.c_proj.weight"]
        for name, delta in result.deltas.deltas.items():
            assert torch.equal(after[name], before[name] + delta)
    assert all(torch.equal(before[n], p) for n, p in tiny_gpt2.model.named_parameters())


def test_ft_prompt_last_reads_every_target_token_at_the_prompt(tiny_gpt2):
    """target_positions=prompt_last: the rows are the prompts, each target token read at the last one."""
    batch = target_batch(tiny_gpt2, ["The capital of France is", "Hi"], ["San Francisco Bay", "x"], prompt_last=True)
    assert batch.token_cols.tolist() == [batch.prompt_lengths[0] - 1] * 3 + [batch.prompt_lengths[1] - 1]
    assert batch.input_ids.shape[1] == max(batch.prompt_lengths)
