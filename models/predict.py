"""Batched greedy prediction: what does the model say after each prompt?"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from models.load import LoadedModel


@torch.no_grad()
def greedy_continuations(loaded: LoadedModel, prompts: list[str], max_new_tokens: list[int] | int,
                         batch_size: int = 64, progress: bool = True) -> list[str]:
    """Greedy continuation of each prompt, ``max_new_tokens[i]`` tokens long (left-padded batches).

    Prompts are sorted by token length so that batches carry little padding; the result keeps
    the input order.
    """
    tokenizer = loaded.tokenizer
    if isinstance(max_new_tokens, int):
        max_new_tokens = [max_new_tokens] * len(prompts)
    if not prompts:
        return []
    lengths = [len(ids) for ids in tokenizer(prompts)["input_ids"]]
    order = sorted(range(len(prompts)), key=lambda i: (lengths[i], max_new_tokens[i]))
    outputs: list[str] = [""] * len(prompts)
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
        for batch in tqdm(batches, desc="greedy", disable=not progress):
            encoded = tokenizer([prompts[i] for i in batch], return_tensors="pt", padding=True).to(loaded.device)
            steps = max(max_new_tokens[i] for i in batch)
            generated = loaded.model.generate(**encoded, max_new_tokens=steps, do_sample=False,
                                              pad_token_id=tokenizer.pad_token_id, num_beams=1)
            new_tokens = generated[:, encoded["input_ids"].shape[1]:]
            for row, index in enumerate(batch):
                outputs[index] = tokenizer.decode(new_tokens[row, : max_new_tokens[index]], skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side
    return outputs


def starts_with_target(continuation: str, target: str) -> bool:
    """True if the continuation begins with the target string (whitespace-insensitive at the start)."""
    target = target.strip()
    return bool(target) and continuation.lstrip().startswith(target)


@torch.no_grad()
def next_tokens(loaded: LoadedModel, prompts: list[str], batch_size: int = 64, progress: bool = True) -> list[int]:
    """The greedy next token after each prompt: one forward pass per batch, logits at the last position only."""
    tokenizer = loaded.tokenizer
    if not prompts:
        return []
    lengths = [len(ids) for ids in tokenizer(prompts)["input_ids"]]
    order = sorted(range(len(prompts)), key=lambda i: lengths[i])
    result: list[int] = [0] * len(prompts)
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
        for batch in tqdm(batches, desc="next token", disable=not progress):
            encoded = tokenizer([prompts[i] for i in batch], return_tensors="pt", padding=True).to(loaded.device)
            logits = loaded.model(**encoded, logits_to_keep=1).logits[:, -1]  # no full-vocab logits per position
            for row, index in enumerate(batch):
                result[index] = int(logits[row].argmax())
    finally:
        tokenizer.padding_side = side
    return result


def could_start_with(token_text: str, target: str) -> bool:
    """Whether a continuation beginning with ``token_text`` can still begin with ``target``."""
    head, target = token_text.lstrip(), target.strip()
    if not head:
        return True  # a whitespace-only token decides nothing yet
    return target.startswith(head) or head.startswith(target)
