"""MEND against the authors' code, through fixtures made outside the package
(tools/fixtures/mend_reference.py -> tests/fixtures/mend, whose README says how): kmeng01/rome's
``baselines/mend`` (their network, ``MEND.edit``, ``MendRewriteExecutor``) for entity requests, and
the RaKE authors' fork of it (``perspective="relation"``) for relation requests.

Both sides hold the same network: the fixture stores their parameters (their names), and
``our_network`` maps them into ours, the one place that says how the two correspond. Everything
compared is deterministic (one forward/backward and the network's forward), so the tolerance is
1e-4 relative (Frobenius norm) throughout; compact cases compare slices and full norms.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from editors.config import MendConfig, NetworkConfig
from editors.ft import target_batch
from editors.mend import Mend, MendNetwork
from editors.mend.checkpoint import layer_shapes
from editors.mend.factors import gradient_factors
from editors.requests import EditRequest, Rewrite, relation_request

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: 1 torch thread (2 shared cores)

FIXTURES = Path(__file__).parent / "fixtures" / "mend"
DETERMINISTIC = 1e-4
DIFFERENT = 1e-2  # where ours must *not* match (another objective or another normalisation)


def relative(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    return float((ours.double() - theirs.double()).norm() / theirs.double().norm())


@pytest.fixture(scope="module")
def reference():
    inputs = json.loads((FIXTURES / "inputs.json").read_text())
    return inputs, load_file(str(FIXTURES / "mend.safetensors"))


def our_network(loaded, tensors, prefix: str, layers: list[int], rank: int) -> MendNetwork:
    """Ours with their weights. Their ``GradientTransform`` per shape ``(d_in, d_out)`` ->
    our ``transforms["{d_in}x{d_out}"]``; ``LRLinear`` u, v, bias, mode_scale/mode_shift
    embeddings -> up, down, bias, mode_scale/mode_shift; running statistics (mean, s = sum of
    squared deviations, k) -> (mean, m2, count); their edit_lrs negated (theirs add lr * the
    transformed gradient, ours subtract it; see NetworkConfig.edit_lr)."""
    theirs = {k[len(prefix) + len("network."):]: v for k, v in tensors.items() if k.startswith(prefix + "network.")}
    network = MendNetwork(layer_shapes(loaded, layers), NetworkConfig(rank=rank))
    state = {"edit_lrs": -theirs["edit_lrs"]}
    for key, transform in network.transforms.items():
        shape = "({}, {})".format(*key.split("x"))
        for i in range(len(transform.layers)):
            mine, their = f"transforms.{key}.layers.{i}", f"{shape}.mlp.layers.{i}"
            state.update({f"{mine}.up": theirs[f"{their}.u"], f"{mine}.down": theirs[f"{their}.v"],
                          f"{mine}.bias": theirs[f"{their}.bias"], f"{mine}.mode_scale": theirs[f"{their}.mode_scale.weight"],
                          f"{mine}.mode_shift": theirs[f"{their}.mode_shift.weight"]})
        for norm, side in (("norm_u", "u"), ("norm_delta", "v")):
            state.update({f"transforms.{key}.{norm}.mean": theirs[f"{shape}.{side}_mean"],
                          f"transforms.{key}.{norm}.m2": theirs[f"{shape}.{side}_s"],
                          f"transforms.{key}.{norm}.count": theirs[f"{shape}.k"][0]})
    network.load_state_dict({k: v.to(network.state_dict()[k].dtype) for k, v in state.items()})
    return network.eval()


def entity_request(r) -> EditRequest:
    return EditRequest(r["case_id"], r["subject"], (Rewrite(r["prompt"], r["target_new"]["str"]),), r["prompt"])


def relation(r) -> EditRequest:
    """Our relation request from the authors' fields (what facts.perspectives.RelationRequest holds)."""
    return relation_request(SimpleNamespace(case_id=r["case_id"], subject=r["subject"], add_template=r["add_rel_prompt"],
                                            target_add=r["relation"]["strs"][0], remove_template=r["rm_rel_prompt"],
                                            target_remove="None"))


def editor(network: MendNetwork, layers: list[int], rewrites: str = "main") -> Mend:
    return Mend(MendConfig(layers=layers, rewrites=rewrites), network=network)


def our_outputs(loaded, network: MendNetwork, requests: list[EditRequest], rewrites: str = "main") -> dict[str, torch.Tensor]:
    """As the fixture's cases: per layer the factors, their transform (eval), and Mend.apply's weight delta."""
    prompts = [r.rewrites[0].template.replace("{}", r.subject) for r in requests]
    factors, _ = gradient_factors(loaded, target_batch(loaded, prompts, [r.target for r in requests]), network.layers)
    out = {}
    with torch.no_grad():
        for layer, (u, delta) in factors.items():
            key, mode = network.group_of[layer]
            out[f"{layer}.u"], out[f"{layer}.delta"] = u, delta
            out[f"{layer}.u_tilde"], out[f"{layer}.delta_tilde"] = network.transforms[key](u, delta, mode)
    with editor(network, network.layers, rewrites).apply(loaded, requests) as result:
        for layer, name in zip(network.layers, result.infos[0]["parameters"]):
            out[f"{layer}.weight_delta"] = result.deltas.deltas[name].clone()
    return out


def check(tensors, prefix: str, ours: dict[str, torch.Tensor]) -> int:
    """Every fixture entry under ``prefix`` (full tensors, or ``_slice`` + ``_norm``) against ours; the count compared."""
    compared = 0
    for key, value in ours.items():
        if f"{prefix}.{key}" in tensors:
            assert value.shape == tensors[f"{prefix}.{key}"].shape, key
            assert relative(value, tensors[f"{prefix}.{key}"]) < DETERMINISTIC, (prefix, key)
            compared += 1
        elif f"{prefix}.{key}_slice" in tensors:
            theirs = tensors[f"{prefix}.{key}_slice"]
            mine = value[: theirs.shape[0], : theirs.shape[1]] if key.endswith("weight_delta") else value[:, : theirs.shape[1]]
            assert mine.shape == theirs.shape, key
            assert relative(mine, theirs) < DETERMINISTIC, (prefix, key)
            assert relative(value.norm(), tensors[f"{prefix}.{key}_norm"]) < DETERMINISTIC, (prefix, key)
            compared += 1
    return compared


def test_network_is_not_the_identity(tiny_gpt2, reference):
    """The fixture's network changes the (normalised) factors by 29% .. 230%, so matching it is not trivial."""
    inputs, tensors = reference
    network = our_network(tiny_gpt2, tensors, "", inputs["layers"], inputs["network"]["rank"])
    for layer in inputs["layers"]:
        key, mode = network.group_of[layer]
        transform = network.transforms[key]
        u, delta = tensors[f"entity0.{layer}.u"], tensors[f"entity0.{layer}.delta"]
        assert relative(transform.norm_u(u), tensors[f"entity0.{layer}.u_tilde"]) > 0.1
        assert relative(transform.norm_delta(delta), tensors[f"entity0.{layer}.delta_tilde"]) > 0.1


def test_entity_edits_match(tiny_gpt2, reference):
    """Factors, transformed factors and weight deltas of each entity request (the first in full)."""
    inputs, tensors = reference
    network = our_network(tiny_gpt2, tensors, "", inputs["layers"], inputs["network"]["rank"])
    for i, request in enumerate(inputs["requests"]):
        expected = 5 * len(inputs["layers"]) if i == 0 else 3 * len(inputs["layers"])
        assert check(tensors, f"entity{i}", our_outputs(tiny_gpt2, network, [entity_request(request)])) == expected


def test_batch_of_requests_matches_token_mean(tiny_gpt2, reference):
    """Three requests edited together (targets of 1-3 tokens): the loss is the mean over all target tokens."""
    inputs, tensors = reference
    network = our_network(tiny_gpt2, tensors, "", inputs["layers"], inputs["network"]["rank"])
    ours = our_outputs(tiny_gpt2, network, [entity_request(r) for r in inputs["requests"]])
    assert check(tensors, "batch", ours) == len(inputs["layers"])


def test_relation_edits_match_rake(tiny_gpt2, reference):
    """rewrites=main edits add_rel_prompt -> relation phrase, as RaKE's MEND; rewrites=all (with the removal) does not."""
    inputs, tensors = reference
    network = our_network(tiny_gpt2, tensors, "", inputs["layers"], inputs["network"]["rank"])
    for i, request in enumerate(inputs["relation_requests"]):
        expected = 5 * len(inputs["layers"]) if i == 0 else 3 * len(inputs["layers"])
        assert check(tensors, f"relation{i}", our_outputs(tiny_gpt2, network, [relation(request)])) == expected
    request = relation(inputs["relation_requests"][0])
    with editor(network, inputs["layers"], "all").apply(tiny_gpt2, [request]) as result:
        for layer, name in zip(inputs["layers"], result.infos[0]["parameters"]):
            assert relative(result.deltas.deltas[name], tensors[f"relation0.{layer}.weight_delta"]) > DIFFERENT


def test_their_executor_is_training_mode_with_fresh_statistics(tiny_gpt2, reference):
    """Their executor leaves MEND in training mode with norm_init unset after loading: the first edit
    replaces the trained statistics by its own tokens', later edits accumulate. Ours in training mode
    from empty statistics reproduces that (deltas, transformed factors, statistics: per-token Welford
    in float32 vs our batched float64 merge); our editor (eval, trained statistics) differs from it."""
    inputs, tensors = reference
    layers = inputs["layers"]
    network = our_network(tiny_gpt2, tensors, "", layers, inputs["network"]["rank"])
    trained = copy.deepcopy(network)
    for name, buffer in network.named_buffers():
        buffer.zero_()
    network.train()
    for i in inputs["executor_cases"]:
        request = entity_request(inputs["requests"][i])
        batch = target_batch(tiny_gpt2, [request.rewrites[0].template.replace("{}", request.subject)], [request.target])
        factors, _ = gradient_factors(tiny_gpt2, batch, layers)
        twin = copy.deepcopy(network)  # the same sequence of statistics updates, to read the transformed factors
        with torch.no_grad():
            updates = network(factors)
            ours = {}
            for layer, (u, delta) in factors.items():
                key, mode = twin.group_of[layer]
                ours[f"{layer}.u_tilde"], ours[f"{layer}.delta_tilde"] = twin.transforms[key](u, delta, mode)
                ours[f"{layer}.weight_delta"] = tiny_gpt2.adapter.to_stored_layout(updates[layer])
        assert check(tensors, f"executor{i}", ours) == 3 * len(layers)
        for key, transform in network.transforms.items():
            shape = "({}, {})".format(*key.split("x"))
            for norm, side in ((transform.norm_u, "u"), (transform.norm_delta, "v")):
                assert relative(norm.mean, tensors[f"executor{i}.norm.{shape}.{side}_mean"]) < DETERMINISTIC
                assert relative(norm.m2, tensors[f"executor{i}.norm.{shape}.{side}_s"]) < DETERMINISTIC
                assert float(norm.count) == float(tensors[f"executor{i}.norm.{shape}.k"][0])
    evaluated = our_outputs(tiny_gpt2, trained, [entity_request(inputs["requests"][0])])
    for layer in layers:
        theirs = tensors[f"executor0.{layer}.weight_delta_slice"]
        assert relative(evaluated[f"{layer}.weight_delta"][: theirs.shape[0], : theirs.shape[1]], theirs) > DIFFERENT


def test_smollm2_edit_matches(smollm2, reference):
    """One request on SmolLM2-135M (nn.Linear layout, two layers sharing one transform): slices and norms."""
    inputs, tensors = reference
    spec = inputs["smollm2"]
    network = our_network(smollm2, {k: v.float() for k, v in tensors.items()}, "smollm2.", spec["layers"], spec["rank"])
    ours = our_outputs(smollm2, network, [entity_request(inputs["requests"][spec["request"]])])
    assert check(tensors, "smollm2", ours) == 5 * len(spec["layers"])


def test_initialisation_is_theirs(tiny_gpt2):
    """As their LRLinear(init="id"): up = 0, down ~ N(0, 1), zero bias and shift, unit scale: the
    identity (after normalisation), whatever the input, the last layer's clamp included."""
    torch.manual_seed(0)
    network = MendNetwork(layer_shapes(tiny_gpt2, [2, 3]), NetworkConfig(rank=64, edit_lr=0.5, norm=False)).eval()
    for layer in network.transforms["128x32"].layers:
        assert not layer.up.any() and not layer.bias.any() and not layer.mode_shift.any() and bool((layer.mode_scale == 1).all())
        assert abs(float(layer.down.std()) - 1) < 0.05 and abs(float(layer.down.mean())) < 0.05
    u, delta = torch.randn(5, 128), torch.randn(5, 32)
    u_tilde, delta_tilde = network.transforms["128x32"](u, delta, 1)
    assert torch.equal(u_tilde, u) and torch.equal(delta_tilde, delta)
