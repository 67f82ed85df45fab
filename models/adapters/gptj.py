"""GPT-J family: attention and MLP run in parallel on the same layer-normed input."""

from models.adapters.base import ArchitectureAdapter, register_adapter


@register_adapter("gptj")
def gptj_adapter(config) -> ArchitectureAdapter:
    return ArchitectureAdapter(
        family="gptj",
        n_layers=config.n_layer,
        d_model=config.n_embd,
        d_mlp=config.n_inner or 4 * config.n_embd,
        vocab_size=config.vocab_size,
        embed="transformer.wte",
        block="transformer.h.{layer}",
        attn="transformer.h.{layer}.attn",
        mlp="transformer.h.{layer}.mlp",
        mlp_in="transformer.h.{layer}.mlp.fc_in",
        mlp_out="transformer.h.{layer}.mlp.fc_out",
        final_norm="transformer.ln_f",
        unembed="lm_head",
        attn_out="transformer.h.{layer}.attn.out_proj",
        attn_out_layout="linear",
        d_attn=config.n_embd,
        mlp_out_layout="linear",
    )
