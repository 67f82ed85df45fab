"""Llama-like families (Llama, Mistral, Qwen2, SmolLM2): gated MLP, ``down_proj`` is rewritten."""

from models.adapters.base import ArchitectureAdapter, register_adapter


@register_adapter("llama", "mistral", "qwen2", "qwen3", "olmo2")
def llama_adapter(config) -> ArchitectureAdapter:
    return ArchitectureAdapter(
        family=config.model_type,
        n_layers=config.num_hidden_layers,
        d_model=config.hidden_size,
        d_mlp=config.intermediate_size,
        vocab_size=config.vocab_size,
        embed="model.embed_tokens",
        block="model.layers.{layer}",
        attn="model.layers.{layer}.self_attn",
        mlp="model.layers.{layer}.mlp",
        mlp_in="model.layers.{layer}.mlp.up_proj",
        mlp_out="model.layers.{layer}.mlp.down_proj",
        final_norm="model.norm",
        unembed="lm_head",
        attn_out="model.layers.{layer}.self_attn.o_proj",
        attn_out_layout="linear",
        d_attn=config.num_attention_heads * (getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads),
        mlp_out_layout="linear",
    )
