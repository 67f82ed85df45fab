"""Gemma 3 text models (``Gemma3ForCausalLM``, model_type ``gemma3_text``; e.g. Gemma 3 270M).

How the block differs from GPT-2, GPT-J and Llama, and what each hook point is here::

    h   = resid_pre + post_attention_layernorm(self_attn(input_layernorm(resid_pre)))
    out = h + post_feedforward_layernorm(down_proj(gelu(gate_proj(x)) * up_proj(x))),  x = pre_feedforward_layernorm(h)

* ``hook_embed``: output of ``model.embed_tokens``, a ``Gemma3TextScaledWordEmbedding`` that
  multiplies the looked-up rows by sqrt(d_model) *inside* the module. This is exactly what block 0
  sees (no position embeddings), so corruption noise is added to the scaled embeddings and its
  scale (``tracing.noise.embedding_std``) is measured on the module's output, not on the raw
  weight rows (which are sqrt(d_model) times smaller).
* ``blocks.{l}.hook_resid_pre`` / ``hook_resid_post``: input / output of ``model.layers.{l}``.
* ``blocks.{l}.hook_attn_out``: output of ``post_attention_layernorm`` -- despite its name this
  norm is applied to the attention output, and its output is what is added to the residual stream.
* ``blocks.{l}.hook_mlp_out``: output of ``post_feedforward_layernorm``, i.e. the MLP output read
  *after* its post-norm. Restoring or severing "the MLP" therefore patches what the MLP adds to the
  residual stream, the same thing as in the other families (resid_post = resid_pre + attn_out +
  mlp_out holds exactly).
* ``blocks.{l}.mlp.hook_post``: input of ``mlp.down_proj`` (gelu(gate) * up), the ROME/MEMIT key.
* ``blocks.{l}.mlp.hook_out``: output of ``mlp.down_proj`` *before* the post-norm, the output of
  the rewritten weight (``nn.Linear``, stored [out in]). ROME optimises v* and MEND takes its
  output gradient here, so W_out k* = v* stays a linear problem. MEMIT spreads its residual target
  over the layers as W_out-output changes, as for the other families; with the post-norm in
  between this is a first-order approximation (the norm rescales the change by about
  weight / rms of the MLP output), which MEMIT's per-layer recomputation of the residual partly
  absorbs.
* ``blocks.{l}.mlp.hook_pre``: output of ``mlp.up_proj`` (KN's pre-activation option; it scales
  ``hook_post`` linearly, as in Llama).
* ``blocks.{l}.attn.hook_z`` / ``attn.hook_out``: input / output of ``self_attn.o_proj`` (before the
  post-attention norm), the key and value of ``rome_attn``; ``attn.hook_mask``: the
  ``attention_mask`` that ``self_attn`` receives (per layer type: sliding-window or global).
* ``hook_final_norm``: output of ``model.norm``; the logits are ``lm_head`` of it. ``lm_head`` is
  tied to ``embed_tokens`` (same tensor, unscaled); no editor here writes either.

Attention is grouped-query with alternating sliding-window and global layers
(``config.layer_types``); ``models.blocks.BlockStack`` gives each layer its own mask and rotary
embedding. Final-logit soft-capping is not supported (Gemma 3 does not use it; Gemma 2 did).
"""

from core.errors import ModelError
from models.adapters.base import ArchitectureAdapter, register_adapter


@register_adapter("gemma3_text")
def gemma3_adapter(config) -> ArchitectureAdapter:
    if getattr(config, "final_logit_softcapping", None) is not None:
        raise ModelError("model.config.final_logit_softcapping", config.final_logit_softcapping,
                         "soft-capped logits are not supported (the unembedding is read as a plain linear map)",
                         hint="Gemma 3 checkpoints set it to null")
    return ArchitectureAdapter(
        family="gemma3",
        n_layers=config.num_hidden_layers,
        d_model=config.hidden_size,
        d_mlp=config.intermediate_size,
        vocab_size=config.vocab_size,
        embed="model.embed_tokens",
        block="model.layers.{layer}",
        attn="model.layers.{layer}.post_attention_layernorm",
        mlp="model.layers.{layer}.post_feedforward_layernorm",
        mlp_in="model.layers.{layer}.mlp.up_proj",
        mlp_out="model.layers.{layer}.mlp.down_proj",
        final_norm="model.norm",
        unembed="lm_head",
        mlp_out_layout="linear",
        attn_out="model.layers.{layer}.self_attn.o_proj",
        attn_out_layout="linear",
        d_attn=config.num_attention_heads * config.head_dim,
        attn_core="model.layers.{layer}.self_attn",
    )
