"""FT-L against the authors' code, through fixtures made outside the package
(tools/fixtures/ft_reference.py -> tests/fixtures/ft; its README says how and lists every difference):
entity edits against kmeng01/rome ``baselines/ft/ft_main.py`` ``execute_ft``, relation edits
against the RaKE fork's ``execute_rel_ft``, on the tiny GPT-2 and (one request) SmolLM2.

FT is deterministic (Adam steps, then the L-inf clamp), so every delta -- after each of the first
steps, at the end, alone and batched -- must match within 1e-4 relative (Frobenius norm), with the
two options that reproduce the authors' loss: ``target_positions=prompt_last`` and ``train_bias``.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from editors.config import FtConfig
from editors.ft import Ft
from editors.requests import EditRequest, Rewrite, relation_request

pytestmark = pytest.mark.usefixtures("one_thread")

FIXTURES = Path(__file__).parent / "fixtures" / "ft"
DETERMINISTIC = 1e-4


def relative(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    return float((ours.double() - theirs.double()).norm() / theirs.double().norm())


@pytest.fixture(scope="module")
def reference():
    return json.loads((FIXTURES / "inputs.json").read_text()), load_file(str(FIXTURES / "ft.safetensors"))


def entity_requests(inputs) -> list[EditRequest]:
    return [EditRequest(r["case_id"], r["subject"], (Rewrite(r["prompt"], r["target_new"]["str"]),), r["prompt"])
            for r in inputs["entity_requests"]]


def relation_requests(inputs) -> list[EditRequest]:
    return [relation_request(SimpleNamespace(case_id=r["case_id"], subject=r["subject"], add_template=r["add_rel_prompt"],
                                             target_add=r["relation"]["strs"][0], remove_template=r["rm_rel_prompt"],
                                             target_remove="None"))
            for r in inputs["relation_requests"]]


def authors_config(hparams, **overrides) -> FtConfig:
    """Their hparams, with the options that reproduce ft_main's loss and trained parameters."""
    settings = dict(layers=hparams["layers"], num_steps=hparams["num_steps"], lr=hparams["lr"],
                    weight_decay=hparams["weight_decay"], norm_constraint=hparams["norm_constraint"],
                    target_positions="prompt_last", train_bias=True)
    return FtConfig(**{**settings, **overrides})


def deltas(loaded, config: FtConfig, requests: list[EditRequest]) -> dict[str, torch.Tensor]:
    """Ours, keyed like the fixture (``weight`` / ``bias``)."""
    with Ft(config).apply(loaded, requests) as result:
        return {name.rsplit(".", 1)[1]: delta.clone() for name, delta in result.deltas.deltas.items()}


def check(ours: dict[str, torch.Tensor], tensors, prefix: str) -> None:
    theirs = {key.rsplit(".", 1)[1]: value for key, value in tensors.items() if key.startswith(prefix + ".")}
    assert sorted(ours) == sorted(theirs) == ["bias", "weight"]
    for key in theirs:
        assert relative(ours[key], theirs[key]) < DETERMINISTIC, (prefix, key, relative(ours[key], theirs[key]))


def test_entity_steps_and_final_deltas(tiny_gpt2, reference):
    """The first steps and the end of execute_ft, one request at a time, one- and three-token targets."""
    inputs, tensors = reference
    requests, hparams = entity_requests(inputs), inputs["hparams"]
    for step in range(1, inputs["recorded_steps"] + 1):
        check(deltas(tiny_gpt2, authors_config(hparams, num_steps=step), requests[2:3]), tensors, f"entity.r2.step{step}")
    for i in (0, 2):
        assert inputs["runs"][f"entity.r{i}"]["epochs"] == hparams["num_steps"]
        check(deltas(tiny_gpt2, authors_config(hparams), requests[i:i + 1]), tensors, f"entity.r{i}.final")


def test_entity_batch(tiny_gpt2, reference):
    """All three requests in one padded batch (their loss: mean over requests of each one's token mean)."""
    inputs, tensors = reference
    check(deltas(tiny_gpt2, authors_config(inputs["hparams"]), entity_requests(inputs)), tensors, "entity.batch.final")


def test_relation_steps_and_final_deltas(tiny_gpt2, reference):
    """execute_rel_ft: add prompt -> " " + relation phrase (our ``rewrites: main``)."""
    inputs, tensors = reference
    requests, hparams = relation_requests(inputs), inputs["hparams"]
    for step in range(1, inputs["recorded_steps"] + 1):
        check(deltas(tiny_gpt2, authors_config(hparams, num_steps=step), requests[:1]), tensors, f"relation.r0.step{step}")
    for i in range(len(requests)):
        check(deltas(tiny_gpt2, authors_config(hparams), requests[i:i + 1]), tensors, f"relation.r{i}.final")


def test_defaults_differ_where_documented(tiny_gpt2, reference):
    """Our defaults (teacher forcing, weight only) are a different objective for several-token targets
    and leave the bias alone; a one-token target gives the same weight trajectory once the bias is trained."""
    inputs, tensors = reference
    config = dataclasses.replace(authors_config(inputs["hparams"]), target_positions="teacher_forced", train_bias=False)
    requests = entity_requests(inputs)
    ours = deltas(tiny_gpt2, config, requests[2:3])
    assert sorted(ours) == ["weight"]
    assert relative(ours["weight"], tensors["entity.r2.final.weight"]) > 0.05
    one_token = deltas(tiny_gpt2, dataclasses.replace(config, train_bias=True), requests[:1])
    check(one_token, tensors, "entity.r0.final")


def test_smollm2_delta(smollm2, reference):
    """SmolLM2 (Llama: down_proj has no bias), published hparams, the three-token target: rows + norm."""
    inputs, tensors = reference
    setting = inputs["smollm2"]
    request = entity_requests(inputs)[setting["request"]]
    ours = deltas(smollm2, authors_config(setting["hparams"]), [request])
    assert sorted(ours) == ["weight"]
    assert relative(ours["weight"][:setting["rows"]], tensors["smollm2.rows"]) < DETERMINISTIC
    assert abs(float(ours["weight"].double().norm()) / float(tensors["smollm2.norm"]) - 1) < DETERMINISTIC
