"""KN: integrated-gradient completeness, threshold/sharing selection, the value-vector edit, exact restore."""

from __future__ import annotations

import torch

from editors import build_editor
from editors.config import KnConfig
from editors.kn import attribution_scores, coarse_neurons, refine_neurons
from editors.requests import EditRequest, Rewrite
from models.hooks import Hooks
from models.scoring import encode_prompts

PROMPT = "The mother tongue of Danielle Darrieux is"


@torch.no_grad()
def _p_last(loaded, ids, token, zero_layer=None) -> float:
    def zero(tensor, name):
        tensor = tensor.clone()
        tensor[:, -1] = 0
        return tensor

    hooks = {f"blocks.{zero_layer}.mlp.hook_post": zero} if zero_layer is not None else {}
    with Hooks(loaded.model, loaded.adapter, hooks):
        return float(loaded.model(input_ids=ids).logits[0, -1].softmax(-1)[token])


def test_integrated_gradients_completeness(tiny_model):
    ids = torch.tensor(encode_prompts(tiny_model, [PROMPT]), device=tiny_model.device)
    with torch.no_grad():
        token = int(tiny_model.model(input_ids=ids).logits[0, -1].argmax())  # a token with a sizeable probability
    layers = list(range(tiny_model.adapter.n_layers))
    scores = attribution_scores(tiny_model, PROMPT, [token], layers, steps=64, max_rows=64)  # several staircase chunks
    p = _p_last(tiny_model, ids, token)
    for layer in layers:
        expected = p - _p_last(tiny_model, ids, token, zero_layer=layer)
        assert abs(float(scores[layer].sum()) - expected) <= 1e-3 * abs(expected) + 1e-7, (layer, expected)


def test_selection_follows_thresholds():
    scores = torch.tensor([[0.0, 1.0, 0.25], [0.15, -2.0, 0.3]])  # [layer d_mlp]
    assert coarse_neurons(scores, [5, 7], 0.2) == {(5, 1), (5, 2), (7, 2)}
    assert coarse_neurons(-scores.abs(), [5, 7], 0.2) == set()
    coarse = [{(5, 1), (7, 2)}, {(5, 1)}, {(5, 1), (7, 2)}, {(7, 0)}, {(5, 1)}]
    assert refine_neurons(coarse, 0.4) == [(5, 1)]  # 4/5 > 0.4; (7, 2) 2/5 is not > 0.4
    assert refine_neurons(coarse, 0.2) == [(5, 1), (7, 2)]


def test_kn_edits_chosen_value_vectors_and_restores(tiny_gpt2, tmp_path):
    before = {n: p.detach().clone() for n, p in tiny_gpt2.model.named_parameters()}
    request = EditRequest(0, "Danielle Darrieux", (Rewrite("The mother tongue of {} is", "English"),
                                                    Rewrite("The relation between {} and French is", "None")),
                          "The mother tongue of {} is")
    config = KnConfig(layers=[0, 1, 2, 3], steps=8, n_prompts=3, share_threshold=0.3, context_template_lengths=[[4, 2]])
    editor = build_editor(config, cache_dir=tmp_path)
    with editor.apply(tiny_gpt2, [request]) as result:
        info = result.infos[0]
        assert info["old_target"] == "None" and info["n_prompts"] == 3
        neurons = {tuple(n) for n in info["neurons"]}
        assert neurons, "no neuron selected"
        unembedding = tiny_gpt2.adapter.unembedding_matrix(tiny_gpt2.model).detach()
        new, old = (tiny_gpt2.tokenizer(" " + t, add_special_tokens=False)["input_ids"] for t in ("English", "None"))
        direction = 2.0 * (unembedding[new].mean(0) - unembedding[old].mean(0))
        for layer in range(4):
            weight = tiny_gpt2.adapter.mlp_out_matrix(tiny_gpt2.model, layer).detach()
            original = before[next(n for n, p in tiny_gpt2.model.named_parameters() if p is tiny_gpt2.adapter.mlp_out_weight(tiny_gpt2.model, layer))]
            original = original.T if tiny_gpt2.adapter.mlp_out_layout == "conv1d" else original
            moved = {(layer, int(i)) for i in torch.nonzero((weight != original).any(0)).flatten()}
            assert moved == {n for n in neurons if n[0] == layer}
            for _, i in moved:
                torch.testing.assert_close(weight[:, i] - original[:, i], direction, rtol=1e-4, atol=1e-5)
    assert all(torch.equal(before[n], p) for n, p in tiny_gpt2.model.named_parameters())
