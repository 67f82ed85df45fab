"""AlphaEdit on tiny random models: the paper's closed form, preserved keys unchanged, the edit lands,
weights restore bit-for-bit, and the K_p state across apply() calls (kept while edits are in force)."""

from __future__ import annotations

import pytest
import torch

from core.errors import ConfigError
from editors import build_editor
from helpers import changed, parameter_name, relative, subject_last, top_token, weights
from editors.alphaedit import null_space_projection, projected_update
from editors.config import AlphaEditConfig, StatsConfig
from editors.templates import template_groups
from editors.keys import activations_at, encode_prompt, request_keys
from editors.stats import second_moments

STATS = StatsConfig(corpus="wikitext2", n_samples=120, max_tokens=64, batch_size=16)
# Tiny random models have MLP outputs of norm ~0.03: the published clamp/decay would freeze v*.
TINY_VALUES = dict(v_num_grad_steps=15, v_lr=0.5, v_weight_decay=0.0, clamp_norm_factor=1e4, kl_factor=0.0,
                   context_template_lengths=[[4, 2]])
# Tiny keys have second-moment eigenvalues ~1e-6..5e-2 (conf/editor_model/alphaedit_tiny_*.yaml)
TINY_ALPHA = dict(nullspace_threshold=3e-5, l2=1e-5, context_prompts=["The"])

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: 1 torch thread (2 shared cores)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("new_editor_cache")


# ------------------------------------------------------------------------------------ AlphaEdit
def test_projected_update_is_the_papers_equation_and_lives_in_the_null_space():
    """Delta = R^T K P (K^T K P + K_p^T K_p P + l2 I)^-1, and Delta k = 0 for k outside P's range."""
    torch.manual_seed(0)
    d_model, d_mlp, n, l2 = 5, 12, 3, 0.1
    samples = torch.randn(400, d_mlp, dtype=torch.float64) * torch.linspace(0.01, 2, d_mlp, dtype=torch.float64)
    moment = samples.T @ samples / 400
    projection = null_space_projection(moment, threshold=0.3)
    eigenvalues, eigenvectors = torch.linalg.eigh(moment)
    assert 0 < int(torch.linalg.matrix_rank(projection)) == int((eigenvalues < 0.3).sum()) < d_mlp
    keys, residual = torch.randn(n, d_mlp, dtype=torch.float64), torch.randn(n, d_model, dtype=torch.float64)
    earlier = torch.randn(4, d_mlp, dtype=torch.float64)
    preserved = earlier.T @ earlier
    update = projected_update(keys, residual, projection, preserved, l2)
    gram = keys.T @ keys
    paper = residual.T @ keys @ projection @ torch.linalg.inv(gram @ projection + preserved @ projection + l2 * torch.eye(d_mlp, dtype=torch.float64))
    torch.testing.assert_close(update, paper, atol=1e-10, rtol=1e-8)
    kept = eigenvectors[:, eigenvalues >= 0.3]  # the preserved directions
    assert float((update @ kept).abs().max()) < 1e-12 * float(update.abs().max())
    torch.testing.assert_close(update @ projection, update, atol=1e-12, rtol=1e-10)


def alphaedit(cache, **overrides):
    return build_editor(AlphaEditConfig(layers=[1, 2], stats=STATS, **{**TINY_VALUES, **TINY_ALPHA, **overrides}), cache_dir=cache)


def test_alphaedit_keeps_preserved_keys_and_edits(tiny_model, cache):
    """Keys in the span of C's eigenvectors with eigenvalue >= threshold map as before; the edit lands."""
    loaded, editor = tiny_model, alphaedit(cache)
    before = weights(loaded)
    moments = second_moments(loaded, [1, 2], STATS, cache_dir=cache)
    request = subject_last("English")
    with editor.apply(loaded, [request]) as result:
        assert changed(before, loaded) == {parameter_name(loaded, "mlp_out", 1), parameter_name(loaded, "mlp_out", 2)}
        assert top_token(loaded, "Mother tongue: Danielle Darrieux") == "English", result.infos
        for layer in (1, 2):
            eigenvalues, eigenvectors = torch.linalg.eigh(moments[layer])
            kept = eigenvectors[:, eigenvalues >= editor.config.nullspace_threshold].float()  # [d_mlp kept]
            probes = (torch.randn(8, kept.shape[1], generator=torch.Generator().manual_seed(layer)) @ kept.T) * 0.3
            out_proj = loaded.adapter.module(loaded.model, "mlp_out", layer)
            name = parameter_name(loaded, "mlp_out", layer)
            delta = loaded.adapter.projection_matrix(loaded.model, "mlp_out", layer).detach() - (
                before[name].T if loaded.adapter.mlp_out_layout == "conv1d" else before[name])
            moved = probes @ delta.T  # [probe d_model]
            with torch.no_grad():
                scale = out_proj(probes).norm()
            assert float(moved.norm()) < 1e-5 * float(delta.norm() * probes.norm()), layer
            assert float(moved.norm()) < 1e-3 * float(scale), layer
    assert not changed(before, loaded)


def test_alphaedit_earlier_keys_hold_under_a_later_batch_and_restore_forgets_them(tiny_gpt2, cache):
    loaded = tiny_gpt2
    first = [subject_last("English"), subject_last("Paris", "Toko Yasuda", 1)]
    second = [subject_last("Rome", "Apple A5", 2)]
    prompts = [encode_prompt(loaded.tokenizer, "{}", r.key_template, r.subject) for r in first]
    probe = "blocks.2.hook_mlp_out"

    def outputs():
        return activations_at(loaded, prompts, [probe], stop_after=probe)[probe]

    movement = {}
    for keep_state in (True, False):
        editor = alphaedit(cache)
        with editor.apply(loaded, first):
            after_first = outputs()
            assert set(editor.preserved(loaded)) == {1, 2}
            if not keep_state:
                editor.reset()
            with editor.apply(loaded, second) as result:
                movement[keep_state] = relative(outputs(), after_first)
                assert top_token(loaded, "Mother tongue: Apple A5") == "Rome", result.infos
            if keep_state:  # the second batch's keys are forgotten when it is undone, the first batch's kept
                grams = editor.preserved(loaded)
                groups = template_groups(editor.config.context_template_lengths)  # MEMIT's per-group key average
                keys = request_keys(loaded, first, editor.contexts(loaded), [1], groups=groups)[1].double()
                torch.testing.assert_close(grams[1], keys.T @ keys, atol=1e-9, rtol=1e-6)
        assert editor.preserved(loaded) == {}
    # with K_p the first batch's layer-2 outputs barely move; without it the second edit moves them far more
    assert movement[True] < 0.05 and movement[True] < movement[False] / 10, movement


def test_alphaedit_threshold_below_every_eigenvalue_is_a_config_error(tiny_gpt2, cache):
    before = weights(tiny_gpt2)
    with pytest.raises(ConfigError) as info:
        alphaedit(cache, nullspace_threshold=1e-12).apply(tiny_gpt2, [subject_last("English")])
    assert info.value.key == "editor.nullspace_threshold" and "smallest" in info.value.problem
    assert not changed(before, tiny_gpt2)
