"""The correctness oracle: one full forward pass per restoration, as ROME's ``trace_with_patch`` does.

Slow on purpose and deliberately plain: every restored run is a complete ``model(input_ids)``
call on the ``samples`` noisy copies of the prompt, with hooks that add the noise to the token
embeddings and write the clean (or, for severed traces, the corrupted) activations back. The
batched engine (``tracing.engine``) must reproduce it within 1e-5 in fp32.

Attention knockout: one clean ``model(input_ids)`` call per (source set, layer) that hands every
attention module of the window a full 4D mask built here (causal, minus the blocked edges).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor

from models.hooks import Hooks, HookFn, recorder
from models.load import LoadedModel
from tracing.inputs import TraceInputs, TraceScores
from tracing.knockout import MASK_HOOK, check_sources
from tracing.settings import TraceSettings, knockout_key, severed_key, window_layers

HOOK = {"hidden": "blocks.{layer}.hook_resid_post", "mlp": "blocks.{layer}.hook_mlp_out", "attn": "blocks.{layer}.hook_attn_out"}


def _setter(position: int, value: Tensor) -> HookFn:
    """Write ``value`` ([d_model] or [batch d_model]) at ``position`` of every batch row."""

    def write(tensor: Tensor, name: str) -> Tensor:
        tensor = tensor.clone()
        tensor[:, position] = value
        return tensor

    return write


@torch.no_grad()
def reference_scores(loaded: LoadedModel, inputs: TraceInputs, settings: TraceSettings,
                     cells: Sequence[tuple[int, int]] | None = None) -> TraceScores:
    """Restored p(answer) for every (token, layer) cell (or only ``cells``; the rest are NaN)."""
    model, adapter = loaded.model, loaded.adapter
    n_layers, n_tokens, samples = adapter.n_layers, inputs.n_tokens, settings.samples
    device, dtype = loaded.device, next(model.parameters()).dtype
    ids = inputs.token_ids.to(device)[None]  # [1 pos]
    noisy_ids = ids.expand(samples, n_tokens)
    noise = inputs.noise.to(device=device, dtype=dtype)  # [sample n_corrupted d_model]
    positions = list(inputs.positions)

    def corrupt(tensor: Tensor, name: str) -> Tensor:
        tensor = tensor.clone()
        tensor[:, positions] += noise
        return tensor

    names = {kind: [HOOK[kind].format(layer=layer) for layer in range(n_layers)] for kind in HOOK}
    clean: dict[str, Tensor] = {}
    with Hooks(model, adapter, {name: recorder(clean) for kind in HOOK for name in names[kind]}):
        clean_logits = model(input_ids=ids, use_cache=False).logits[0, -1].float()
    answer_id = int(clean_logits.argmax()) if inputs.answer_id is None else inputs.answer_id

    def p_answer(hooks: dict[str, list[HookFn]]) -> float:
        with Hooks(model, adapter, {"hook_embed": [corrupt], **hooks}):
            logits = model(input_ids=noisy_ids, use_cache=False).logits[:, -1].float()  # [sample vocab]
        return float(torch.softmax(logits, dim=-1)[:, answer_id].mean())

    p_clean = float(torch.softmax(clean_logits, -1)[answer_id])
    knocked = {}
    if settings.knockout_names:
        knocked = reference_knockout(loaded, ids, inputs.sources, settings.window, answer_id, p_clean)
    if not settings.table_names:  # a knockout alone needs no corrupted run
        return TraceScores(answer_id, p_clean, float("nan"), knocked)

    corrupted: dict[str, Tensor] = {}
    sever_names = [name for sublayer in settings.severed for name in names[sublayer]]
    with Hooks(model, adapter, {"hook_embed": [corrupt], **{name: [recorder(corrupted)] for name in sever_names}}):
        corrupted_logits = model(input_ids=noisy_ids, use_cache=False).logits[:, -1].float()
    p_corrupted = float(torch.softmax(corrupted_logits, dim=-1)[:, answer_id].mean())

    all_cells = [(t, layer) for t in range(n_tokens) for layer in range(n_layers)] if cells is None else list(cells)
    plans: dict[str, Callable[[int, int], dict[str, list[HookFn]]]] = {}
    for kind in settings.restored:
        plans[kind] = _window_plan(kind, clean, settings.window, n_layers) if kind != "hidden" else _hidden_plan(clean)
    for sublayer in settings.severed:
        plans[severed_key(sublayer)] = _severed_plan(sublayer, clean, corrupted, n_layers)
    scores = {name: torch.full((n_tokens, n_layers), float("nan")) for name in plans}
    for name, plan in plans.items():
        for t, layer in all_cells:
            scores[name][t, layer] = p_answer(plan(t, layer))
    return TraceScores(answer_id, p_clean, p_corrupted, {**scores, **knocked})


@torch.no_grad()
def reference_knockout(loaded: LoadedModel, ids: Tensor, sources: dict[str, Sequence[int]], window: int,
                       answer_id: int, p_clean: float) -> dict[str, Tensor]:
    """``{knockout_<source>: [1 layer]}`` relative drops, one full forward per (source, layer); NaN for empty sources."""
    check_sources(sources)
    model, adapter = loaded.model, loaded.adapter
    n_layers, n_tokens = adapter.n_layers, ids.shape[1]
    causal = torch.ones(n_tokens, n_tokens, dtype=torch.bool, device=ids.device).tril()  # [query key]
    drops = {}
    for name, positions in sources.items():
        drops[knockout_key(name)] = torch.full((1, n_layers), float("nan"))
        if not positions:
            continue
        mask = causal.clone()
        mask[n_tokens - 1, list(positions)] = False
        full = mask[None, None]  # [1 1 query key]
        replace = lambda allowed, hook_name: full  # noqa: E731
        for layer in range(n_layers):
            hooks = {MASK_HOOK.format(layer=j): [replace] for j in window_layers(layer, window, n_layers)}
            with Hooks(model, adapter, hooks):
                logits = model(input_ids=ids, use_cache=False).logits[0, -1].float()
            p = float(torch.softmax(logits, dim=-1)[answer_id])
            drops[knockout_key(name)][0, layer] = (p - p_clean) / p_clean
    return drops


def _hidden_plan(clean: dict[str, Tensor]):
    def plan(t: int, layer: int) -> dict[str, list[HookFn]]:
        name = HOOK["hidden"].format(layer=layer)
        return {name: [_setter(t, clean[name][0, t])]}

    return plan


def _window_plan(kind: str, clean: dict[str, Tensor], window: int, n_layers: int):
    def plan(t: int, layer: int) -> dict[str, list[HookFn]]:
        hooks = {}
        for j in window_layers(layer, window, n_layers):
            name = HOOK[kind].format(layer=j)
            hooks[name] = [_setter(t, clean[name][0, t])]
        return hooks

    return plan


def _severed_plan(sublayer: str, clean: dict[str, Tensor], corrupted: dict[str, Tensor], n_layers: int):
    def plan(t: int, layer: int) -> dict[str, list[HookFn]]:
        hidden = HOOK["hidden"].format(layer=layer)
        hooks = {hidden: [_setter(t, clean[hidden][0, t])]}
        for j in range(layer + 1, n_layers):
            name = HOOK[sublayer].format(layer=j)
            hooks[name] = [_setter(t, corrupted[name][:, t])]
        return hooks

    return plan
