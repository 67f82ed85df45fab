"""GPT-2 family (gpt2, gpt2-xl): Conv1D weights stored as [in out]."""

from models.adapters.base import ArchitectureAdapter, register_adapter


@register_adapter("gpt2")
def gpt2_adapter(config) -> ArchitectureAdapter:
    return ArchitectureAdapter(
        family="gpt2",
        n_layers=config.n_layer,
        d_model=config.n_embd,
        d_mlp=config.n_inner or 4 * config.n_embd,
        vocab_size=config.vocab_size,
        embed="transformer.wte",
        block="transformer.h.{layer}",
        attn="transformer.h.{layer}.attn",
        mlp="transformer.h.{layer}.mlp",
        mlp_in="transformer.h.{layer}.mlp.c_fc",
        mlp_out="transformer.h.{layer}.mlp.c_proj",
        final_norm="transformer.ln_f",
        unembed="lm_head",
        attn_out="transformer.h.{layer}.attn.c_proj",
        attn_out_layout="conv1d",
        d_attn=config.n_embd,
        mlp_out_layout="conv1d",
    )
