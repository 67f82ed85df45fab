"""KN (knowledge neurons, Dai et al. 2022): attribute, select, then move the neurons' value vectors.

Attribution: for a prompt and the *old* target token y at position t (the position predicting
it), each MLP neuron i of layer l (``blocks.{l}.mlp.hook_post``) gets the integrated gradient of
p(y) along the path that scales layer l's activation at t from 0 to its value a (midpoint rule,
``steps`` points)::

    IG_l,i = a_i / m * sum_k  d p(y) / d x_i  at x = (k + 1/2) / m * a

so sum_i IG_l,i ~ p(y | a) - p(y | layer l's activation at t zeroed) (completeness). Multi-token
targets are teacher forced and their per-token attributions averaged. Batched: layer l's scaled
runs only differ from the clean run from block l on and at position t only, so every (layer,
step) row starts at its own block from the clean residual at t, attends to the clean keys/values
of positions < t (``models.blocks``), and the rows of all layers share one staircase batch.

Selection: per prompt, neurons above ``adaptive_threshold`` x the prompt's max attribution
(coarse); kept if coarse in more than ``share_threshold`` x the prompts (refined). The prompts
are the rewrite prompt inside the first ``n_prompts`` context templates ("{}" itself first).

Edit (EasyEdit KN "edit" mode): each kept neuron's value vector (its column of the MLP output
projection) moves by ``edit_scale`` x (mean unembedding of the new target's tokens - the old's).

The authors' knowledge-neurons code (ROME/RaKE baselines/kn) differs in five places, each a
``KnConfig`` option (``activation``, ``ig_points``, ``target_positions``, ``target_space``,
``edit_rule``), and runs one prompt (``n_prompts: 1``): tests/fixtures/kn/README.md.

Old target: ``request.target_true`` when the request carries one; else the second rewrite's target
(a relation request's removal target "None", which the authors' KN takes as the ground truth of
the add prompt); else the model's greedy continuation of the prompt (``old_target: prediction``
always uses it; knowledge-neurons' edit mode subtracts the prediction).
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from einops import repeat
from torch import Tensor

from editors.base import EditResult, Editor
from editors.config import KnConfig
from editors.deltas import WeightDeltas
from editors.requests import EditRequest
from editors.templates import context_templates
from models.blocks import BlockStack, PrefixCache
from models.hooks import Hooks, recorder
from models.load import LoadedModel
from models.scoring import encode_prompts, encode_targets

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------- attribution
@dataclass
class _CleanRun:
    resid: list[Tensor]  # resid[l]: [1 pos d_model] entering block l
    keys: dict[int, Tensor]  # [1 heads pos head_dim]
    values: dict[int, Tensor]
    activations: dict[int, Tensor]  # [pos d_mlp] mlp.hook_post
    final: Tensor  # [pos d_model] after the last block


@torch.no_grad()
def _clean_run(stack: BlockStack, ids: Tensor, layers: Sequence[int], hook: str) -> _CleanRun:
    positions = torch.arange(ids.shape[1], device=stack.device)
    hidden = stack.block_input(stack.token_embeddings(ids), positions)
    cache = PrefixCache(record=True)
    kwargs = stack.position_kwargs(positions, 0)
    store: dict[str, Tensor] = {}
    resid = []
    with Hooks(stack.model, stack.adapter, {f"blocks.{layer}.mlp.{hook}": recorder(store) for layer in layers}):
        for block in range(stack.n_layers):
            resid.append(hidden)
            hidden = stack.run_block(block, hidden, kwargs, cache)
    return _CleanRun(resid, cache.keys, cache.values, {layer: store[f"blocks.{layer}.mlp.{hook}"][0] for layer in layers}, hidden[0])


def _staircase(stack: BlockStack, clean: _CleanRun, t: int, layers: list[int], alphas: Tensor, token: int, hook: str) -> Tensor:
    """Gradients of p(token) at t w.r.t. the scaled activations.  -> [layer step d_mlp]"""
    steps = len(alphas)
    positions = torch.arange(t, t + 1, device=stack.device)
    kwargs = stack.position_kwargs(positions, t)
    leaves = {layer: (alphas[:, None] * clean.activations[layer][t]).detach().requires_grad_(True) for layer in layers}
    state: Tensor | None = None  # [row 1 d_model]

    def insert(tensor: Tensor, name: str) -> Tensor:  # tensor: [row 1 d_mlp]; the newest rows are this layer's
        layer = int(name.split(".")[1])
        return torch.cat([tensor[:-steps], leaves[layer][:, None].to(tensor.dtype)])

    with torch.enable_grad():
        for block in range(layers[0], stack.n_layers):
            if block in leaves:
                new = repeat(clean.resid[block][0, t], "d -> step 1 d", step=steps)
                state = new if state is None else torch.cat([state, new])
            prefix = {}
            if t > 0:
                prefix[block] = tuple(repeat(kv[block][0, :, :t], "h pos d -> row h pos d", row=state.shape[0])
                                      for kv in (clean.keys, clean.values))
            hooks = {f"blocks.{block}.mlp.{hook}": insert} if block in leaves else {}
            with Hooks(stack.model, stack.adapter, hooks):
                state = stack.run_block(block, state, kwargs, PrefixCache(prefix))
        probs = stack.logits(state[:, 0]).float().softmax(-1)[:, token]  # [row]
        grads = torch.autograd.grad(probs.sum(), [leaves[layer] for layer in layers])
    return torch.stack([g.detach().float() for g in grads])


def attribution_scores(loaded: LoadedModel, prompt: str, target: str | list[int], layers: Sequence[int], steps: int = 20,
                       max_rows: int = 512, activation: str = "post", points: str = "midpoint",
                       prompt_last: bool = False) -> Tensor:
    """Integrated-gradient attributions of the MLP neurons for ``" " + target`` after ``prompt``.  -> [layer d_mlp]

    ``target`` is a string or its token ids; multi-token targets are teacher forced (or, with
    ``prompt_last``, all read at the prompt's last position) and their attributions averaged. Rows
    follow ``sorted(set(layers))``. ``activation`` (``mlp.hook_post`` or ``mlp.hook_pre``) and
    ``points`` (midpoint rule or ``linspace(0, 1, steps)``): see ``KnConfig``.
    """
    layers = sorted(set(layers))
    hook = f"hook_{activation}"
    stack = BlockStack(loaded.model, loaded.adapter)
    prompt_ids = encode_prompts(loaded, [prompt])[0]
    target_ids = list(target) if isinstance(target, list) else encode_targets(loaded, [target])[0]
    ids = torch.tensor([prompt_ids if prompt_last else prompt_ids + target_ids[:-1]], device=stack.device)
    clean = _clean_run(stack, ids, layers, hook)
    if points == "linspace":
        alphas = torch.linspace(0, 1, steps, device=stack.device)
    else:
        alphas = (torch.arange(steps, device=stack.device, dtype=torch.float32) + 0.5) / steps
    per_chunk = max(1, max_rows // steps)
    scores = torch.zeros(len(layers), loaded.adapter.d_mlp, device=stack.device)
    for j, token in enumerate(target_ids):
        t = len(prompt_ids) - 1 + (0 if prompt_last else j)
        grads = torch.cat([_staircase(stack, clean, t, layers[i:i + per_chunk], alphas.to(stack.dtype), token, hook)
                           for i in range(0, len(layers), per_chunk)])  # [layer step d_mlp]
        activations = torch.stack([clean.activations[layer][t].float() for layer in layers])  # [layer d_mlp]
        scores += activations * grads.mean(1)
    return scores / len(target_ids)


def coarse_neurons(scores: Tensor, layers: Sequence[int], adaptive_threshold: float) -> set[tuple[int, int]]:
    """(layer, neuron) pairs with a score above ``adaptive_threshold`` x the max score.  scores: [layer d_mlp]"""
    top = float(scores.max())
    if top <= 0:
        return set()
    found = torch.nonzero(scores > adaptive_threshold * top).tolist()
    return {(layers[i], n) for i, n in found}


def refine_neurons(coarse: Sequence[set[tuple[int, int]]], share_threshold: float) -> list[tuple[int, int]]:
    """Neurons coarse in more than ``share_threshold`` x the prompts (knowledge-neurons' ``count > p n``)."""
    counts = Counter(neuron for found in coarse for neuron in found)
    return sorted(neuron for neuron, count in counts.items() if count > share_threshold * len(coarse))


# ------------------------------------------------------------------------------------- editor
def edit_direction(loaded: LoadedModel, new_ids: list[int], old_ids: list[int], scale: float, rule: str) -> Tensor:
    """What each kept neuron's value vector moves by.  -> [d_model]

    symmetric: ``scale`` x (mean new - mean old unembedding); authors: + each new token's row once,
    - ``scale`` x the first old token's (knowledge-neurons' GPT-2 edit; see ``KnConfig.edit_rule``).
    """
    unembedding = loaded.adapter.unembedding_matrix(loaded.model).detach().float()  # [vocab d_model]
    if rule == "authors":
        return unembedding[new_ids].sum(0) - scale * unembedding[old_ids[0]]
    return scale * (unembedding[new_ids].mean(0) - unembedding[old_ids].mean(0))


def value_vector_update(loaded: LoadedModel, neurons: Sequence[tuple[int, int]], direction: Tensor) -> dict[int, Tensor]:
    """``{layer: [d_model d_mlp]}`` adding ``direction`` to each neuron's value vector."""
    updates: dict[int, Tensor] = {}
    for layer, neuron in neurons:
        update = updates.setdefault(layer, torch.zeros(loaded.adapter.d_model, loaded.adapter.d_mlp, device=loaded.device))
        update[:, neuron] += direction
    return updates


@torch.no_grad()
def _greedy_ids(loaded: LoadedModel, prompt: str, n_tokens: int) -> list[int]:
    ids = torch.tensor(encode_prompts(loaded, [prompt]), device=loaded.device)
    out: list[int] = []
    for _ in range(n_tokens):
        token = int(loaded.model(input_ids=ids).logits[0, -1].argmax())
        out.append(token)
        ids = torch.cat([ids, torch.tensor([[token]], device=loaded.device)], dim=1)
    return out


class Kn(Editor):
    name = "kn"
    config: KnConfig

    def apply(self, loaded: LoadedModel, requests: Sequence[EditRequest]) -> EditResult:
        """Attribution never changes the weights, so only the edited projections are snapshotted."""
        return self.apply_read_only(loaded, requests)

    def target_ids(self, loaded: LoadedModel, text: str) -> list[int]:
        """``" " + text`` as evaluated, or ``text`` itself (``target_space: bare``, the authors')."""
        if self.config.target_space == "bare":
            return list(loaded.tokenizer(text, add_special_tokens=False)["input_ids"])
        return encode_targets(loaded, [text])[0]

    def old_target(self, loaded: LoadedModel, request: EditRequest, prompt: str) -> tuple[str | None, list[int]]:
        """The old target's text (None when predicted) and its token ids."""
        if self.config.old_target == "request":
            text = getattr(request, "target_true", None) or (request.rewrites[1].target if len(request.rewrites) > 1 else None)
            if text:
                return text, self.target_ids(loaded, text)
        n_tokens = len(self.target_ids(loaded, request.target))
        return None, _greedy_ids(loaded, prompt, n_tokens)

    def compute(self, loaded: LoadedModel, requests: list[EditRequest]) -> tuple[WeightDeltas, list[dict[str, Any]]]:
        config = self.config
        layers = config.attributed_layers(loaded.adapter.n_layers)
        contexts = context_templates(loaded, config.context_template_lengths, config.context_prompts, config.context_seed,
                                     cache_dir=self.cache_dir)[:config.n_prompts]
        updates: dict[int, Tensor] = {}
        infos = []
        for request in requests:
            main = request.rewrites[0]
            template = main.template.replace("{}", request.subject, 1)
            prompts = [context.replace("{}", template, 1) for context in contexts]
            old_text, old_ids = self.old_target(loaded, request, template)
            attributed = old_text if old_text is not None else loaded.tokenizer.decode(old_ids)
            coarse = [coarse_neurons(attribution_scores(loaded, p, old_ids, layers, config.steps, config.max_rows, config.activation,
                                                        config.ig_points, config.target_positions == "prompt_last"),
                                     layers, config.adaptive_threshold) for p in prompts]
            neurons = refine_neurons(coarse, config.share_threshold)
            new_ids = self.target_ids(loaded, main.target)
            erased = _greedy_ids(loaded, template, 1) if config.edit_rule == "authors" else old_ids
            direction = edit_direction(loaded, new_ids, erased, config.edit_scale, config.edit_rule)
            for layer, update in value_vector_update(loaded, neurons, direction).items():
                updates[layer] = updates[layer] + update if layer in updates else update
            infos.append({"case_id": request.case_id, "request": request.describe(), "old_target": attributed,
                          "n_prompts": len(prompts), "n_coarse": [len(c) for c in coarse], "n_neurons": len(neurons),
                          "neurons": [list(n) for n in neurons]})
            if not neurons:
                log.warning("kn: no neuron shared by > %.0f%% of %d prompts for %s; nothing to edit",
                            100 * config.share_threshold, len(prompts), request.describe())
        return WeightDeltas.for_mlp_out(loaded.model, loaded.adapter, updates), infos
