"""Tiny random models of each adapter family, built from a config in code (no download).

They share the embedded model's tokenizer so that prompts, subject spans and targets behave as in
real runs; weights come from a fixed seed so every test sees the same model.
"""

from __future__ import annotations

import torch
from transformers import (Gemma3ForCausalLM, Gemma3TextConfig, GPT2Config, GPT2LMHeadModel, GPTJConfig, GPTJForCausalLM,
                          LlamaConfig, LlamaForCausalLM, PreTrainedModel)

from core.errors import ConfigError

TINY_FAMILIES = ("gpt2", "gptj", "llama", "gemma3")
# Gemma 3: a window shorter than the test prompts, so sliding layers really differ from global ones.
TINY_SLIDING_WINDOW = 4


def build_tiny_model(family: str, vocab_size: int, n_layers: int = 4, d_model: int = 32, seed: int = 0,
                     attn_implementation: str | None = "sdpa", bos_token_id: int | None = None,
                     eos_token_id: int | None = None) -> PreTrainedModel:
    """A randomly initialised causal LM with ``n_layers`` blocks of width ``d_model``."""
    n_heads = 4
    ids = {"bos_token_id": bos_token_id, "eos_token_id": eos_token_id, "pad_token_id": eos_token_id}
    if family == "gpt2":
        config = GPT2Config(vocab_size=vocab_size, n_positions=256, n_embd=d_model, n_layer=n_layers, n_head=n_heads,
                            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **ids)
        cls = GPT2LMHeadModel
    elif family == "gptj":
        config = GPTJConfig(vocab_size=vocab_size, n_positions=256, n_embd=d_model, n_layer=n_layers, n_head=n_heads,
                            rotary_dim=d_model // n_heads // 2, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **ids)
        cls = GPTJForCausalLM
    elif family == "llama":
        config = LlamaConfig(vocab_size=vocab_size, hidden_size=d_model, intermediate_size=2 * d_model,
                             num_hidden_layers=n_layers, num_attention_heads=n_heads, num_key_value_heads=2,
                             max_position_embeddings=256, tie_word_embeddings=False, **ids)
        cls = LlamaForCausalLM
    elif family == "gemma3":
        config = Gemma3TextConfig(vocab_size=vocab_size, hidden_size=d_model, intermediate_size=2 * d_model,
                                  num_hidden_layers=n_layers, num_attention_heads=n_heads, num_key_value_heads=2,
                                  head_dim=d_model // n_heads, query_pre_attn_scalar=d_model // n_heads,
                                  max_position_embeddings=256, sliding_window=TINY_SLIDING_WINDOW,
                                  layer_types=["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n_layers)],
                                  tie_word_embeddings=True, **ids)
        cls = Gemma3ForCausalLM
    else:
        raise ConfigError("model.tiny_family", family, "unknown tiny family", hint=f"use one of {', '.join(TINY_FAMILIES)}")
    if attn_implementation:
        config._attn_implementation = attn_implementation
    generator_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = cls(config)
    finally:
        torch.random.set_rng_state(generator_state)
    # Random weights give near-uniform outputs; a larger unembedding scale gives peaked,
    # test-friendly distributions without changing the architecture.
    # Gemma 3 ties the unembedding to the embedding, which it scales by sqrt(d_model) on the way in:
    # its norms (1 + weight, initialised to 0) keep the residual scale, so the same factor works.
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(8.0)
    return model
