"""r-ROME and ROME at attention on tiny random models: which key each closed form solves at, the
attention projection's update, bit-for-bit restore, and the attention keys' own statistics."""

from __future__ import annotations

import pytest
import torch

from core.errors import ConfigError
from editors import EditRequest, Rewrite, build_editor
from helpers import changed, parameter_name, relative, subject_last, top_token, weights
from editors.config import RomeConfig, StatsConfig
from editors.keys import encode_prompt, keys_at, request_keys
from editors.rome_attn import RomeAttn
from editors.stats import second_moments
from editors.values import optimize_values

STATS = StatsConfig(corpus="wikitext2", n_samples=120, max_tokens=64, batch_size=16)
# Tiny random models have MLP outputs of norm ~0.03: the published clamp/decay would freeze v*.
TINY_VALUES = dict(v_num_grad_steps=15, v_lr=0.5, v_weight_decay=0.0, clamp_norm_factor=1e4, kl_factor=0.0,
                   context_template_lengths=[[4, 2]])

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: 1 torch thread (2 shared cores)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("new_editor_cache")


# ------------------------------------------------------------------------------------ r-ROME
def test_r_rome_solves_at_the_averaged_key_and_rome_at_the_prompt_key(tiny_gpt2, cache):
    """r-ROME: (W + Delta) k* = v* (k* averaged over contexts); ROME: (W + Delta) k_prompt = v*."""
    loaded = tiny_gpt2
    request = EditRequest(0, "Danielle Darrieux", (Rewrite("The mother tongue of {} is", "English"),), "The mother tongue of {} is")
    configs = {name: RomeConfig(name=name, layers=[1], stats=STATS, constraint_key=key, **TINY_VALUES)
               for name, key in (("rome", "prompt"), ("r_rome", "mean"))}
    editors = {name: build_editor(config, cache_dir=cache) for name, config in configs.items()}
    contexts = editors["rome"].contexts(loaded)
    value = optimize_values(loaded, [request], contexts, "blocks.1.hook_mlp_out", configs["rome"].value_settings())[0]
    key_star = request_keys(loaded, [request], contexts, [1])[1]
    key_prompt = keys_at(loaded, [encode_prompt(loaded.tokenizer, "{}", request.key_template, request.subject)], [1])[1]
    assert relative(key_star, key_prompt) > 0.05  # the two keys differ, so the two updates must
    out_proj = loaded.adapter.module(loaded.model, "mlp_out", 1)
    deltas = {}
    for name, editor in editors.items():
        with editor.apply(loaded, [request]) as result, torch.no_grad():
            at_star, at_prompt = out_proj(key_star)[0], out_proj(key_prompt)[0]
            deltas[name] = result.deltas.deltas[parameter_name(loaded, "mlp_out", 1)]
        solved, other = (at_star, at_prompt) if name == "r_rome" else (at_prompt, at_star)
        assert relative(solved, value.target) < 1e-4, name
        assert relative(other, value.target) > 1e-2, name
    assert relative(deltas["r_rome"], deltas["rome"]) > 1e-2


def test_r_rome_composes_as_rome_with_the_mean_key(compose_config):
    from omegaconf import OmegaConf

    rome = OmegaConf.to_object(compose_config("editor=rome", "model=smollm2_135m").editor)
    r_rome = OmegaConf.to_object(compose_config("editor=r_rome", "model=smollm2_135m").editor)
    assert (r_rome.name, r_rome.constraint_key, rome.constraint_key) == ("r_rome", "mean", "prompt")
    assert r_rome.layers == rome.layers and r_rome.stats == rome.stats and r_rome.v_lr == rome.v_lr
    with pytest.raises(ConfigError) as info:  # when the stage converts the config, before any work
        OmegaConf.to_object(compose_config("editor=r_rome", "model=tiny_gpt2", "editor.constraint_key=prompt").editor)
    assert info.value.key == "editor.constraint_key"


# ------------------------------------------------------------------------------------ ROME at attention
def rome_attn(cache, **overrides):
    return build_editor(RomeConfig(name="rome_attn", layers=[1], stats=STATS, **{**TINY_VALUES, **overrides}), cache_dir=cache)


def test_rome_attn_solves_at_the_attention_projection_and_restores(tiny_model, cache):
    loaded = tiny_model
    editor = rome_attn(cache)
    assert isinstance(editor, RomeAttn)
    request = subject_last("English")
    contexts = editor.contexts(loaded)
    value = optimize_values(loaded, [request], contexts, "blocks.1.attn.hook_out", editor.config.value_settings())[0]
    bare = encode_prompt(loaded.tokenizer, "{}", request.key_template, request.subject)
    key = keys_at(loaded, [bare], [1], hook="blocks.{layer}.attn.hook_z")[1]  # [1 d_attn]
    assert key.shape == (1, loaded.adapter.d_attn)
    before = weights(loaded)
    with editor.apply(loaded, [request]) as result:
        assert changed(before, loaded) == {parameter_name(loaded, "attn_out", 1)}
        with torch.no_grad():
            now = loaded.adapter.module(loaded.model, "attn_out", 1)(key)[0]
        assert relative(now, value.target) < 1e-4
        if loaded.adapter.family != "gemma3":
            assert top_token(loaded, "Mother tongue: Danielle Darrieux") == "English", result.infos
        else:  # Gemma 3's post-attention norm caps one layer's contribution: v* raises the target, not to top-1
            info = result.infos[0]["layer_1"]
            assert info["loss_last"] < info["loss_first"] - 1.0, result.infos
        update = result.deltas.deltas[parameter_name(loaded, "attn_out", 1)]
        assert torch.linalg.matrix_rank(update, rtol=1e-4) == 1
    assert not changed(before, loaded)


def test_rome_attn_at_the_mlp_is_rome(tiny_gpt2, cache):
    """The same loop at the MLP's site gives ROME's deltas (so rome.py could reuse it)."""

    class AtMlp(RomeAttn):
        edited_projection = "mlp_out"

    config = RomeConfig(layers=[1], stats=STATS, **{**TINY_VALUES, "v_num_grad_steps": 5})
    request = subject_last("English")
    with build_editor(config, cache_dir=cache).apply(tiny_gpt2, [request]) as rome:
        expected = dict(rome.deltas.deltas)
    with AtMlp(config, cache_dir=cache).apply(tiny_gpt2, [request]) as attn:
        assert attn.deltas.names() == sorted(expected)
        for name, delta in attn.deltas.deltas.items():
            torch.testing.assert_close(delta, expected[name], atol=0, rtol=0)


def test_attention_key_statistics_are_cached_apart(tiny_gpt2, tmp_path):
    mlp = second_moments(tiny_gpt2, [1], STATS, cache_dir=tmp_path)[1]
    attn = second_moments(tiny_gpt2, [1], STATS, cache_dir=tmp_path, hook="blocks.{layer}.attn.hook_z")[1]
    assert mlp.shape == (tiny_gpt2.adapter.d_mlp,) * 2 and attn.shape == (tiny_gpt2.adapter.d_attn,) * 2
    again = second_moments(tiny_gpt2, [1], STATS, cache_dir=tmp_path, hook="blocks.{layer}.attn.hook_z")[1]
    assert torch.equal(again, attn) and len(list((tmp_path / "second_moments").glob("*/key.json"))) == 2
