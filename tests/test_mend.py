"""MEND: the network, training through Fabric (loss goes down, resume), checkpoints, refusals, exact restore."""

from __future__ import annotations

import pytest
import torch

from core.errors import ConfigError, ModelError
from editors import build_editor
from editors.mend import (Mend, MendConfig, MendExample, MendNetwork, MendTrainConfig, NetworkConfig, find_checkpoint,
                          load_checkpoint, save_checkpoint, save_to_cache, train_mend)
from editors.mend.checkpoint import build_metadata, layer_shapes
from editors.mend.factors import edited_forward, gradient_factors, projection_names
from editors.mend.train import edit_losses, validate
from editors.ft import target_batch
from editors.requests import EditRequest, Rewrite

EXAMPLES = [
    MendExample("The mother tongue of Danielle Darrieux is", "English", "Danielle Darrieux speaks", "Paris is the capital of", "France"),
    MendExample("Toko Yasuda plays the", "piano", "Toko Yasuda is a master of the", "John Lennon plays the", "guitar"),
    MendExample("The official religion of Edwin of Northumbria is", "Islam", "Edwin of Northumbria follows", "Rome is in", "Italy"),
    MendExample("Apple A5 was created by", "Google", "Apple A5 was developed by", "Windows was created by", "Microsoft"),
]
REQUEST = EditRequest(7, "Danielle Darrieux", (Rewrite("The mother tongue of {} is", "English"),), "The mother tongue of {} is")


def test_identity_init_is_gradient_descent(tiny_gpt2):
    """Untrained, Delta W = -edit_lr * sum_t delta_t u_t^T = -edit_lr * dL/dW (norm off)."""
    network = MendNetwork(layer_shapes(tiny_gpt2, [2, 3]), NetworkConfig(rank=8, edit_lr=0.5, norm=False)).eval()
    batch = target_batch(tiny_gpt2, [EXAMPLES[0].prompt], [EXAMPLES[0].target])
    factors, _ = gradient_factors(tiny_gpt2, batch, [2, 3])
    updates = network(factors)
    weight = tiny_gpt2.adapter.mlp_out_weight(tiny_gpt2.model, 3)
    weight.requires_grad_(True)
    try:
        from editors.ft import target_nll_rows

        loss = target_nll_rows(tiny_gpt2.model(**batch.inputs()).logits, batch).mean()
        (grad,) = torch.autograd.grad(loss, [weight])
    finally:
        weight.requires_grad_(False)
    grad = grad.T if tiny_gpt2.adapter.mlp_out_layout == "conv1d" else grad  # [d_model d_mlp]
    torch.testing.assert_close(updates[3], -0.5 * grad, rtol=1e-4, atol=1e-7)


def test_training_reduces_loss_and_resumes(tiny_gpt2, tmp_path):
    config = MendTrainConfig(steps=16, lr=3e-3, lr_lr=1e-2, cedit=1.0, cloc=1.0, val_every=100, n_val=4, checkpoint_every=8,
                             log_every=4)
    network_config = NetworkConfig(rank=16, edit_lr=0.05)
    names = projection_names(tiny_gpt2, [2, 3])
    untrained = MendNetwork(layer_shapes(tiny_gpt2, [2, 3]), network_config)
    before = validate(tiny_gpt2, untrained, [2, 3], names, EXAMPLES, 1)
    first = train_mend(tiny_gpt2, EXAMPLES, EXAMPLES, [2, 3], network_config, MendTrainConfig(**{**config.__dict__, "steps": 8}),
                       tmp_path, progress=False)
    assert (tmp_path / "resume.ckpt").exists() and first.resumed_from == 0
    result = train_mend(tiny_gpt2, EXAMPLES, EXAMPLES, [2, 3], network_config, config, tmp_path, progress=False)
    assert result.resumed_from == 8 and len(result.history) == 4  # 2 rows from the first run + 2 new
    after = validate(tiny_gpt2, result.network, [2, 3], names, EXAMPLES, 1)
    total = lambda v: config.cedit * v["edit"] + config.cloc * v["locality"]  # noqa: E731
    assert total(after) < total(before) - 0.1, (before, after)


def _trained_like(loaded) -> MendNetwork:
    """A network with non-identity weights (as after training), for checkpoint round trips."""
    torch.manual_seed(0)
    network = MendNetwork(layer_shapes(loaded, [2, 3]), NetworkConfig(rank=8, edit_lr=0.05))
    network.train()
    network(gradient_factors(loaded, target_batch(loaded, [e.prompt for e in EXAMPLES], [e.target for e in EXAMPLES]), [2, 3])[0])
    with torch.no_grad():
        for name, param in network.named_parameters():
            if name.endswith(".up"):
                param.normal_(0, 0.05)
    return network.eval()


def test_checkpoint_reloads_to_same_edits_and_restores(tiny_gpt2, tmp_path):
    network = _trained_like(tiny_gpt2)
    meta = build_metadata(tiny_gpt2, network, NetworkConfig(rank=8, edit_lr=0.05), {"steps": 0}, {})
    save_checkpoint(tmp_path / "job", network, meta)
    before = {n: p.detach().clone() for n, p in tiny_gpt2.model.named_parameters()}
    direct = Mend(MendConfig(layers=[2, 3]), network=network)
    with direct.apply(tiny_gpt2, [REQUEST]) as result:
        expected = {n: d.clone() for n, d in result.deltas.deltas.items()}
        batch = target_batch(tiny_gpt2, [EXAMPLES[0].prompt], [EXAMPLES[0].target])
        with torch.no_grad():
            in_place = tiny_gpt2.model(**batch.inputs()).logits
    with torch.no_grad():
        updates = network(gradient_factors(tiny_gpt2, batch, [2, 3])[0])
        functional = edited_forward(tiny_gpt2, projection_names(tiny_gpt2, [2, 3]), updates, batch.inputs()).logits
    torch.testing.assert_close(functional, in_place, rtol=1e-4, atol=1e-5)  # training sees the edit that apply makes
    reloaded = build_editor(MendConfig(layers=[2, 3], checkpoint=str(tmp_path / "job")))
    with reloaded.apply(tiny_gpt2, [REQUEST]) as result:
        assert sorted(result.deltas.deltas) == sorted(expected)
        for name, delta in result.deltas.deltas.items():
            assert torch.equal(delta, expected[name])
    assert all(torch.equal(before[n], p) for n, p in tiny_gpt2.model.named_parameters())
    cached = save_to_cache(tmp_path / "cache", network, meta)
    assert find_checkpoint(tmp_path / "cache", tiny_gpt2.identity, [2, 3]) == cached
    with build_editor(MendConfig(layers=[2, 3]), cache_dir=tmp_path / "cache").apply(tiny_gpt2, [REQUEST]) as result:
        assert all(torch.equal(d, expected[n]) for n, d in result.deltas.deltas.items())


def test_checkpoint_for_another_model_is_refused(tiny_gpt2, model_cache, tmp_path):
    from models import load_model

    network = _trained_like(tiny_gpt2)
    save_checkpoint(tmp_path, network, build_metadata(tiny_gpt2, network, NetworkConfig(rank=8), {}, {}))
    tiny_llama = model_cache.setdefault("tiny_llama", load_model("tiny_llama"))
    with pytest.raises(ModelError, match="trained for"):
        load_checkpoint(tmp_path, tiny_llama)
    meta = build_metadata(tiny_gpt2, network, NetworkConfig(rank=8), {}, {})
    meta["model"] = tiny_llama.identity  # the identity matches, the projection shapes do not
    save_checkpoint(tmp_path / "shapes", network, meta)
    with pytest.raises(ModelError, match=r"layer \d was"):
        load_checkpoint(tmp_path / "shapes", tiny_llama)
    with pytest.raises(ConfigError, match="editor.layers"):
        load_checkpoint(tmp_path, tiny_gpt2, layers=[1, 2])
    with pytest.raises(ConfigError, match="no trained MEND"):
        build_editor(MendConfig(layers=[2, 3]), cache_dir=tmp_path / "empty").apply(tiny_gpt2, [REQUEST])


def test_edit_losses_are_differentiable(tiny_gpt2):
    network = MendNetwork(layer_shapes(tiny_gpt2, [3]), NetworkConfig(rank=4))
    losses = edit_losses(tiny_gpt2, network, [3], projection_names(tiny_gpt2, [3]), EXAMPLES[:2])
    (losses["edit"] + losses["locality"]).backward()
    assert network.edit_lrs.grad is not None and network.edit_lrs.grad.abs().sum() > 0
