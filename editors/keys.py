"""Keys: the input of the rewritten projection at the lookup token, averaged over contexts.

The key hook defaults to the MLP input (``blocks.{l}.mlp.hook_post``, ROME/MEMIT/AlphaEdit);
``rome_attn`` reads the attention output projection's input (``blocks.{l}.attn.hook_z``).

Prompts are built as ``context.replace("{}", template)`` with the subject filled in, tokenized
once with char offsets, so the lookup token (the last subject token, or the prompt's last token)
is found from the subject's char span, never by re-tokenizing pieces.
The average over contexts is flat (ROME) or per group of contexts (MEMIT; ``request_keys``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from einops import rearrange
from torch import Tensor

from core.errors import ConfigError, DataError
from editors.requests import EditRequest, Lookup
from models.adapters import PROJECTIONS
from models.hooks import Hooks
from models.load import LoadedModel


@dataclass(frozen=True)
class EncodedPrompt:
    ids: list[int]
    lookup: int  # token index of the lookup token


def encode_prompt(tokenizer, context: str, template: str, subject: str, lookup: Lookup = "subject_last") -> EncodedPrompt:
    """Tokenize ``context`` around ``template`` filled with ``subject``; find the lookup token."""
    full = context.replace("{}", template, 1)
    start = full.index("{}")
    text = full.replace("{}", subject, 1)
    encoded = tokenizer(text, return_offsets_mapping=True, add_special_tokens=False)
    ids, offsets = encoded["input_ids"], encoded["offset_mapping"]
    if lookup == "prompt_last":
        return EncodedPrompt(ids, len(ids) - 1)
    end = start + len(subject)
    inside = [i for i, (a, b) in enumerate(offsets) if a < end and b > start]
    if not inside:
        raise DataError("subject", subject, f"no token covers the subject in {text!r}", "is the subject empty?")
    return EncodedPrompt(ids, inside[-1])


def request_contexts(contexts: Sequence[str], n_contexts: int | None) -> list[str]:
    return list(contexts if n_contexts is None else contexts[:n_contexts])


@torch.no_grad()
def activations_at(loaded: LoadedModel, prompts: Sequence[EncodedPrompt], names: Sequence[str], stop_after: str,
                   batch_size: int = 64) -> dict[str, Tensor]:
    """``{hook name: [prompt d]}`` activations at each prompt's lookup token (float32)."""
    out: dict[str, list[Tensor]] = {name: [] for name in names}
    pad = loaded.tokenizer.pad_token_id
    for begin in range(0, len(prompts), batch_size):
        chunk = prompts[begin:begin + batch_size]
        width = max(len(p.ids) for p in chunk)
        ids = torch.tensor([p.ids + [pad] * (width - len(p.ids)) for p in chunk], device=loaded.device)  # [batch pos]
        mask = torch.tensor([[1] * len(p.ids) + [0] * (width - len(p.ids)) for p in chunk], device=loaded.device)
        rows = torch.arange(len(chunk), device=loaded.device)
        where = torch.tensor([p.lookup for p in chunk], device=loaded.device)

        def read(tensor: Tensor, name: str) -> None:
            out[name].append(tensor[rows, where].float())  # [batch d]

        with Hooks(loaded.model, loaded.adapter, {name: read for name in names}, stop_after=stop_after):
            loaded.model(input_ids=ids, attention_mask=mask)
    return {name: torch.cat(chunks) for name, chunks in out.items()}


MLP_KEY = PROJECTIONS["mlp_out"][0]  # blocks.{layer}.mlp.hook_post


def keys_at(loaded: LoadedModel, prompts: Sequence[EncodedPrompt], layers: Sequence[int], batch_size: int = 64,
            hook: str = MLP_KEY) -> dict[int, Tensor]:
    """``{layer: [prompt d_key]}`` keys (``hook`` with ``{layer}`` filled in) at each prompt's lookup token.

    The forward stops at the deepest layer.
    """
    layers = sorted(set(layers))
    names = [hook.format(layer=layer) for layer in layers]
    found = activations_at(loaded, prompts, names, stop_after=names[-1], batch_size=batch_size)
    return {layer: found[name] for layer, name in zip(layers, names)}


def request_keys(loaded: LoadedModel, requests: Sequence[EditRequest], contexts: Sequence[str], layers: Sequence[int],
                 batch_size: int = 64, groups: Sequence[int] | None = None, hook: str = MLP_KEY) -> dict[int, Tensor]:
    """``{layer: [request d_key]}``: each request's key prompt averaged over the context templates.

    ``groups`` (sizes of consecutive runs of ``contexts``, summing to their number): the mean over
    groups of each group's mean, as MEMIT's compute_ks averages per context type (so ``"{}"``,
    a group of its own, weighs as much as all generated templates together); None: the flat mean
    (ROME's compute_u). ``hook``: the key's hook point (the MLP's by default; ``rome_attn``: the
    attention output projection's input).
    """
    if groups is not None and (sum(groups) != len(contexts) or min(groups) < 1):
        raise ConfigError("context_groups", list(groups), f"sizes >= 1 summing to the {len(contexts)} context templates",
                          "groups follow context_template_lengths: [1] + the counts")
    prompts = [encode_prompt(loaded.tokenizer, c, r.key_template, r.subject, r.lookup) for r in requests for c in contexts]
    keys = keys_at(loaded, prompts, layers, batch_size, hook)
    out = {}
    for layer, k in keys.items():
        k = rearrange(k, "(request context) d -> request context d", context=len(contexts))
        if groups is None:
            out[layer] = k.mean(1)
        else:
            out[layer] = torch.stack([part.mean(1) for part in k.split(list(groups), dim=1)], dim=1).mean(1)
    return out
