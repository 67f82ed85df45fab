"""Editors on tiny random models: exact restore, rank one, configured layers only, closed forms
against direct least squares, efficacy, both perspectives, cached tails against full forwards."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from core.errors import ConfigError
from editors import EditRequest, Rewrite, WeightDeltas, applied, build_editor, entity_request, relation_request
from editors.config import MemitConfig, RomeConfig, StatsConfig, ValueSettings
from editors.deltas import snapshot
from editors.keys import encode_prompt, keys_at, request_keys
from editors.memit import authors_removal_contexts, least_squares_update, unique_keys
from editors.templates import template_groups
from editors.reference import optimize_value_reference
from editors.rome import rank_one_update
from editors.values import optimize_values, rewrite_targets

STATS = StatsConfig(corpus="wikitext2", n_samples=120, max_tokens=64, batch_size=16)
CONTEXTS = ["{}", "A short story. {}", "It was late and the. {}"]
# Tiny random models have MLP outputs of norm ~0.03: the published clamp/decay would freeze v*.
TINY_VALUES = dict(v_num_grad_steps=25, v_lr=0.5, v_weight_decay=0.0, clamp_norm_factor=1e4, kl_factor=0.0,
                   context_template_lengths=[[4, 2]])


def mother_tongue(target: str = "English", subject: str = "Danielle Darrieux", case_id: int = 0) -> EditRequest:
    return EditRequest(case_id, subject, (Rewrite("The mother tongue of {} is", target),), "The mother tongue of {} is")


def subject_last(target: str, subject: str = "Danielle Darrieux", case_id: int = 0) -> EditRequest:
    """A prompt that ends with the subject: in random tiny models, the subject token's influence on a
    later position is capped by near-uniform attention, so efficacy is tested where it is direct."""
    return EditRequest(case_id, subject, (Rewrite("Mother tongue: {}", target),), "Mother tongue: {}")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("editor_cache")


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: 1 torch thread (2 shared cores)


def top_token(loaded, prompt: str) -> str:
    ids = loaded.tokenizer(prompt, return_tensors="pt").to(loaded.device)
    with torch.no_grad():
        return loaded.tokenizer.decode(loaded.model(**ids).logits[0, -1].argmax()).strip()


def target_logprob(loaded, prompt: str, target: str) -> float:
    ids = loaded.tokenizer(prompt, return_tensors="pt").to(loaded.device)
    token = loaded.tokenizer(" " + target, add_special_tokens=False)["input_ids"][0]
    with torch.no_grad():
        return float(loaded.model(**ids).logits[0, -1].log_softmax(-1)[token])


def reaches(loaded, prompt: str, target: str, before: float) -> bool:
    """Top-1 after the edit; for Gemma 3, a rise of 1 nat. Its post-norm fixes each MLP output's rms at
    |1 + weight| (1 in a random model) whatever the rewritten weight gives, so one random layer cannot
    outvote the others as an unbounded v* can in the other families."""
    if loaded.adapter.family == "gemma3":
        return target_logprob(loaded, prompt, target) > before + 1.0
    return top_token(loaded, prompt) == target


def weights(loaded) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in loaded.model.named_parameters()}


def changed(before: dict, loaded) -> set[str]:
    return {name for name, p in loaded.model.named_parameters() if not torch.equal(before[name], p)}


def mlp_out_name(loaded, layer: int) -> str:
    weight = loaded.adapter.mlp_out_weight(loaded.model, layer)
    return next(name for name, p in loaded.model.named_parameters() if p is weight)


# ------------------------------------------------------------------------------------ deltas
def test_applied_restores_bit_for_bit_even_after_an_exception(tiny_model):
    before = weights(tiny_model)
    update = torch.randn(tiny_model.adapter.d_model, tiny_model.adapter.d_mlp) * 1e-3
    deltas = WeightDeltas.for_mlp_out(tiny_model.model, tiny_model.adapter, {1: update})
    with pytest.raises(RuntimeError, match="boom"):
        with applied(tiny_model.model, deltas):
            assert changed(before, tiny_model) == {mlp_out_name(tiny_model, 1)}
            raise RuntimeError("boom")
    assert not changed(before, tiny_model)


def test_layout_comes_from_the_adapter(tiny_model):
    """Whatever the stored layout (GPT-2 Conv1D [in out], Linear [out in]), the out projection moves by U k."""
    layer, adapter = 2, tiny_model.adapter
    out_proj = adapter.module(tiny_model.model, "mlp_out", layer)
    key = torch.randn(3, adapter.d_mlp)
    update = torch.randn(adapter.d_model, adapter.d_mlp)
    with torch.no_grad():
        base = out_proj(key)
        with applied(tiny_model.model, WeightDeltas.for_mlp_out(tiny_model.model, adapter, {layer: update})):
            moved = out_proj(key) - base
    torch.testing.assert_close(moved, key @ update.T, atol=1e-4, rtol=1e-4)
    expected = "conv1d" if adapter.family == "gpt2" else "linear"
    assert adapter.mlp_out_layout == expected


# ------------------------------------------------------------------------------------ keys
def test_lookup_token_is_the_last_subject_token(tiny_gpt2):
    tokenizer = tiny_gpt2.tokenizer
    prompt = encode_prompt(tokenizer, "Once upon a time. {}", "The mother tongue of {} is", "Danielle Darrieux")
    assert tokenizer.decode(prompt.ids[: prompt.lookup + 1]).endswith("Danielle Darrieux")
    last = encode_prompt(tokenizer, "{}", "The mother tongue of {} is", "Danielle Darrieux", lookup="prompt_last")
    assert last.lookup == len(last.ids) - 1 and tokenizer.decode(last.ids[last.lookup]) == " is"


# ------------------------------------------------------------------------------------ values
@pytest.mark.parametrize("relation_removal", ["spaced", "authors"])
@pytest.mark.parametrize("hook", ["blocks.1.mlp.hook_out", "blocks.2.hook_resid_post"])
def test_cached_tail_optimisation_matches_the_full_forward_reference(tiny_model, hook, relation_removal):
    # (not the last layer: there the lookup token cannot reach the target's position, the gradient is
    # float noise around zero, and Adam's sign-like first steps would amplify it differently)
    settings = ValueSettings(steps=4, lr=0.1, weight_decay=0.5, clamp_norm_factor=4.0, kl_factor=0.0625,
                             relation_removal=relation_removal)
    relation = EditRequest(1, "Paris", (Rewrite("The relation between {} and France is", "capital city"),
                                        Rewrite("The relation between {} and Italy is", "None", 2, removal=True)),
                           "The relation between {} and Italy is")
    requests = [mother_tongue(), relation]
    fast = optimize_values(tiny_model, requests, CONTEXTS, hook, settings)
    for request, result in zip(requests, fast):  # jointly optimised == one by one with full forwards
        slow = optimize_value_reference(tiny_model, request, CONTEXTS, hook, settings)
        torch.testing.assert_close(result.init, slow.init, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(result.target, slow.target, atol=1e-4, rtol=1e-3)
        assert result.losses == pytest.approx(slow.losses, rel=1e-3, abs=1e-4)


def test_relation_removal_changes_only_the_removal_target(tiny_gpt2):
    """authors: tok("None") (no space), divided by the add target's length; the add rewrite and entity edits unchanged."""
    tokenizer = tiny_gpt2.tokenizer

    def ids(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    relation = EditRequest(1, "Paris", (Rewrite("The relation between {} and France is", "capital city"),
                                        Rewrite("The relation between {} and Italy is", "None", 5, removal=True)),
                           "The relation between {} and Italy is")
    add = (ids(" capital city"), len(ids(" capital city")))
    assert rewrite_targets(tokenizer, relation) == [add, (ids(" None"), len(ids(" None")))]
    assert rewrite_targets(tokenizer, relation, "authors") == [add, (ids("None"), len(add[0]))]
    entity = mother_tongue()
    assert rewrite_targets(tokenizer, entity, "authors") == rewrite_targets(tokenizer, entity) == [(ids(" English"), len(ids(" English")))]


# ------------------------------------------------------------------------------------ ROME
def test_rome_closed_form_matches_constrained_least_squares():
    """min ||Delta K||_F s.t. Delta k = r, solved through its KKT system with lstsq."""
    torch.manual_seed(0)
    d_model, d_mlp, n = 5, 8, 200
    samples = torch.randn(n, d_mlp, dtype=torch.float64) @ torch.randn(d_mlp, d_mlp, dtype=torch.float64)
    moment = samples.T @ samples / n
    key, residual = torch.randn(d_mlp, dtype=torch.float64), torch.randn(d_model, dtype=torch.float64)
    closed = rank_one_update(residual, key, key, torch.linalg.inv(moment))
    kkt = torch.zeros(d_mlp + 1, d_mlp + 1, dtype=torch.float64)
    kkt[:d_mlp, :d_mlp], kkt[:d_mlp, d_mlp], kkt[d_mlp, :d_mlp] = moment, key, key
    rhs = torch.cat([torch.zeros(d_mlp, d_model, dtype=torch.float64), residual[None]])
    direct = torch.linalg.lstsq(kkt, rhs).solution[:d_mlp].T
    torch.testing.assert_close(closed, direct, atol=1e-8, rtol=1e-6)
    assert torch.linalg.matrix_rank(closed) == 1
    torch.testing.assert_close(closed @ key, residual)


def rome(cache, **overrides) -> object:
    return build_editor(RomeConfig(layers=[1], stats=STATS, **{**TINY_VALUES, **overrides}), cache_dir=cache)


def test_rome_edit_is_rank_one_on_the_configured_layer_and_reaches_the_target(tiny_model, cache):
    before = weights(tiny_model)
    prompt = "Mother tongue: Danielle Darrieux"
    target = "English" if top_token(tiny_model, prompt) != "English" else "Paris"
    start = target_logprob(tiny_model, prompt, target)
    with rome(cache).apply(tiny_model, [subject_last(target)]) as result:
        name = mlp_out_name(tiny_model, 1)
        assert changed(before, tiny_model) == {name}
        update = dict(tiny_model.model.named_parameters())[name].detach() - before[name]
        assert torch.linalg.matrix_rank(update, rtol=1e-4) == 1
        assert reaches(tiny_model, prompt, target, start), result.infos
        with applied(tiny_model.model, WeightDeltas()):  # nesting is harmless
            pass
    assert not changed(before, tiny_model)


@pytest.mark.parametrize("name", ["tiny_gpt2", "tiny_gemma3"])  # Gemma 3: v* lives before the MLP's post-norm
def test_rome_constraint_holds_for_the_bare_prompt(name, model_cache, cache):
    from tests.conftest import _load

    loaded = _load(name, model_cache)
    editor = rome(cache)
    request = mother_tongue("English")
    bare = encode_prompt(loaded.tokenizer, "{}", request.key_template, request.subject)
    with editor.apply(loaded, [request]) as result:
        out_proj = loaded.adapter.module(loaded.model, "mlp_out", 1)
        key = keys_at(loaded, [bare], [1])[1]
        with torch.no_grad():
            now = out_proj(key)[0]
    value = optimize_values(loaded, [request], editor.contexts(loaded), "blocks.1.mlp.hook_out",
                            editor.config.value_settings())[0]
    torch.testing.assert_close(now, value.target, atol=1e-3, rtol=1e-3)
    assert result.restored


def test_exception_inside_the_edit_context_restores(tiny_model, cache):
    before = weights(tiny_model)
    with pytest.raises(KeyError):
        with rome(cache, v_num_grad_steps=2).apply(tiny_model, [mother_tongue()]):
            assert changed(before, tiny_model)
            raise KeyError("inside")
    assert not changed(before, tiny_model)


def test_failing_edit_leaves_the_model_untouched(tiny_gpt2, cache):
    before = weights(tiny_gpt2)
    bad = EditRequest(0, "Nobody", (Rewrite("{} is", "x"),), "{} is")
    with pytest.raises(Exception):
        rome(cache, layers=[99]).apply(tiny_gpt2, [bad])
    assert not changed(before, tiny_gpt2)


# ------------------------------------------------------------------------------------ MEMIT
def test_memit_update_matches_direct_least_squares():
    """min weight * tr(D C D^T) + ||D K^T - R^T||^2 as one stacked lstsq problem."""
    torch.manual_seed(1)
    d_model, d_mlp, n, weight = 6, 10, 4, 3.0
    samples = torch.randn(300, d_mlp, dtype=torch.float64)
    moment = samples.T @ samples / 300
    keys, residual = torch.randn(n, d_mlp, dtype=torch.float64), torch.randn(n, d_model, dtype=torch.float64)
    closed = least_squares_update(keys, residual, moment, weight)
    root = torch.linalg.cholesky(moment)  # C = L L^T, so tr(D C D^T) = ||L^T D^T||^2
    design = torch.cat([keys, weight ** 0.5 * root.T])  # [n + d_mlp, d_mlp]
    rhs = torch.cat([residual, torch.zeros(d_mlp, d_model, dtype=torch.float64)])
    direct = torch.linalg.lstsq(design, rhs).solution.T
    torch.testing.assert_close(closed, direct, atol=1e-8, rtol=1e-6)


def memit(cache, **overrides):
    values = {**TINY_VALUES, "context_template_lengths": [[4, 2]], "context_prompts": ["The"]}
    return build_editor(MemitConfig(layers=[1, 2], stats=STATS, mom2_update_weight=10.0, **{**values, **overrides}),
                        cache_dir=cache)


def test_memit_changes_only_the_configured_layers_and_edits(tiny_model, cache):
    before = weights(tiny_model)
    requests = [subject_last("English"), subject_last("Paris", "Toko Yasuda", 1), subject_last("English", "Apple A5", 2)]
    prompts = [r.rewrites[0].template.replace("{}", r.subject) for r in requests]
    starts = [target_logprob(tiny_model, p, r.target) for p, r in zip(prompts, requests)]
    with memit(cache).apply(tiny_model, requests) as result:
        assert changed(before, tiny_model) == {mlp_out_name(tiny_model, 1), mlp_out_name(tiny_model, 2)}
        hits = [reaches(tiny_model, p, r.target, start) for p, r, start in zip(prompts, requests, starts)]
        assert sum(hits) >= 2, (hits, result.infos)
    assert not changed(before, tiny_model)


def test_memit_requests_with_the_same_subject_share_a_key(tiny_gpt2, cache, caplog):
    same = [mother_tongue("English", case_id=0), mother_tongue("German", case_id=1),
            EditRequest(2, "Danielle Darrieux", (Rewrite("{} was born in", "Rome"),), "{} was born in")]
    representatives, index = unique_keys(same)
    assert [r.case_id for r in representatives] == [0, 2] and index == [0, 0, 1]
    assert "share the key" in caplog.text
    before = weights(tiny_gpt2)
    with memit(cache, v_num_grad_steps=3).apply(tiny_gpt2, same) as result:
        assert len(result.infos) == 3
    assert not changed(before, tiny_gpt2)


# ------------------------------------------------------------------------------------ perspectives
def test_both_perspectives_build_requests_and_edit(tiny_gpt2, cache):
    from facts.perspectives import build_relation_request
    from facts.relations import load_relation_table
    from facts.schema import Fact

    fact = Fact(case_id=7, subject="Danielle Darrieux", relation_id="P103", template="The mother tongue of {} is",
                prompt="The mother tongue of Danielle Darrieux is", target_true="French", target_new="English",
                neighborhood_prompts=("The mother tongue of Léon Blum is",), neighborhood_target="French")
    entity = entity_request(fact)
    assert entity.rewrites == (Rewrite("The mother tongue of {} is", "English"),)
    relation = relation_request(build_relation_request(fact, load_relation_table()["P103"]))
    add, remove = relation.rewrites
    assert add.template == "The relation between {} and English is" and remove.target == "None" and remove.n_contexts == 5
    assert relation.key_template == remove.template
    for request in (entity, relation, dataclasses.replace(relation, lookup="prompt_last")):
        before = weights(tiny_gpt2)
        with rome(cache, v_num_grad_steps=3).apply(tiny_gpt2, [request]) as result:
            assert changed(before, tiny_gpt2) == {mlp_out_name(tiny_gpt2, 1)}
        assert result.infos[0]["case_id"] == 7
        assert not changed(before, tiny_gpt2)


def test_keys_average_over_contexts(tiny_llama_model):
    loaded = tiny_llama_model
    request = mother_tongue()
    averaged = request_keys(loaded, [request], CONTEXTS, [0, 2])
    single = {layer: keys_at(loaded, [encode_prompt(loaded.tokenizer, c, request.key_template, request.subject)
                                      for c in CONTEXTS], [layer])[layer].mean(0) for layer in (0, 2)}
    for layer in (0, 2):
        torch.testing.assert_close(averaged[layer][0], single[layer])


def test_keys_average_per_context_group(tiny_llama_model):
    """MEMIT's compute_ks: mean of each group's mean ("{}" alone, then the generated run); bad groups are refused."""
    loaded = tiny_llama_model
    request = mother_tongue()
    single = keys_at(loaded, [encode_prompt(loaded.tokenizer, c, request.key_template, request.subject) for c in CONTEXTS], [1])[1]
    grouped = request_keys(loaded, [request], CONTEXTS, [1], groups=template_groups([[4, 2]]))[1][0]
    torch.testing.assert_close(grouped, (single[0] + single[1:].mean(0)) / 2)
    for bad in ([1, 1], [0, 3], [1, 3]):
        with pytest.raises(ConfigError, match="context_groups"):
            request_keys(loaded, [request], CONTEXTS, [1], groups=bad)


def test_template_groups_and_authors_removal_contexts():
    assert template_groups([[10, 5]]) == [1, 5]
    assert template_groups([[5, 10], [10, 0], [10, 10]]) == [1, 10, 10]
    relation = relation_request(_relation_fields())
    entity = mother_tongue()
    widened = authors_removal_contexts([relation, entity], [1, 5])  # RaKE's [:5] over MEMIT's two groups: all six
    assert [r.n_contexts for r in widened[0].rewrites] == [None, 6]
    assert widened[1] == entity
    assert [r.n_contexts for r in authors_removal_contexts([relation], [1, 1, 1, 1, 1, 1, 1])[0].rewrites] == [None, 5]


def _relation_fields():
    from types import SimpleNamespace

    return SimpleNamespace(case_id=0, subject="Toyota", add_template="The relation between {} and Paris is",
                           target_add="headquarters location", remove_template="The relation between {} and Toyota City is",
                           target_remove="None")


@pytest.fixture(scope="module")
def tiny_llama_model(model_cache):
    from models import load_model

    if "tiny_llama" not in model_cache:
        model_cache["tiny_llama"] = load_model("tiny_llama")
    return model_cache["tiny_llama"]


def test_snapshot_is_a_copy(tiny_gpt2):
    name = mlp_out_name(tiny_gpt2, 0)
    copy = snapshot(tiny_gpt2.model, [name])[name]
    assert copy.data_ptr() != dict(tiny_gpt2.model.named_parameters())[name].data_ptr()


def test_build_editor_refuses_a_config_renamed_to_another_editor():
    from core.errors import ConfigError

    config = RomeConfig(layers=[1], stats=STATS, **TINY_VALUES)
    config.name = "memit"  # what editor=rome editor.name=memit composes to
    with pytest.raises(ConfigError) as info:
        build_editor(config)
    assert info.value.key == "editor.name" and "editor=memit" in info.value.hint


def _editor_configs():
    from editors.config import AlphaEditConfig, FtConfig, KnConfig, MendConfig

    return {"rome": RomeConfig, "memit": MemitConfig, "ft": FtConfig, "kn": KnConfig, "mend": MendConfig,
            "alphaedit": AlphaEditConfig}


def _config_error(make, n_layers: int = 12):
    """The ConfigError raised by building a config and validating it for a 12-layer model (None if valid)."""
    from core.errors import ConfigError

    try:
        make().validate(n_layers)
    except ConfigError as error:
        return error
    return None


@pytest.mark.parametrize("name", ["rome", "memit", "ft", "kn", "mend", "alphaedit"])
def test_editor_config_without_layers_is_a_config_error_or_valid(name):
    """``RomeConfig()`` (layers required) names editor.layers, not a TypeError; the others have defaults."""
    error = _config_error(_editor_configs()[name])
    if name in ("rome", "memit", "alphaedit"):
        assert error is not None and error.key == "editor.layers" and "required" in error.problem
        assert "editor_model" in error.hint
    else:
        assert error is None


@pytest.mark.parametrize("layers", ["???", 5, "5", [], ["a"], [1.5], [True], [12], [-1]])
@pytest.mark.parametrize("name", ["rome", "memit", "ft", "kn", "mend", "alphaedit"])
def test_editor_config_with_bad_layers_is_a_config_error(name, layers):
    error = _config_error(lambda: _editor_configs()[name](layers=layers))
    assert error is not None and error.key == "editor.layers"
