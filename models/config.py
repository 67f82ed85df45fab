"""Typed schema of the ``model`` config group (registered as ``model/model_schema``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from omegaconf import MISSING, OmegaConf

from core.conf import CONF_DIR, available_options
from core.errors import ConfigError

SOURCES = ("embedded", "hub", "local", "tiny")
DTYPES = ("float32", "bfloat16", "float16", "auto")


@dataclass
class ModelConfig:
    name: str = MISSING
    # embedded: a GGUF file inside a pip package; hub: a Hugging Face id; local: a directory;
    # tiny: a random model built in code (tests).
    source: str = MISSING
    id: Optional[str] = None
    # hub: the commit to load (conf/model pins a 40-hex SHA and cites where it comes from); None follows
    # the repo's default branch, so a push to the hub repo can change results.
    revision: Optional[str] = None
    gguf_package: Optional[str] = None
    gguf_file: Optional[str] = None
    # embedded, split: the GGUF is the concatenation of one ``*.gguf.partNN`` file from each of these
    # pinned distributions ("name==version", in order); assembled once into paths.cache_dir.
    gguf_parts: Optional[list[str]] = None
    # embedded: the GGUF's sha256, checked before use (null: not checked).
    gguf_sha256: Optional[str] = None
    dtype: str = "float32"
    device: str = "auto"
    # "auto" spreads a model over several GPUs (accelerate); None keeps it on ``device``.
    device_map: Optional[str] = None
    attn_implementation: Optional[str] = "sdpa"
    trust_remote_code: bool = False
    # tiny random models: family (gpt2, gptj, llama, gemma3), sizes and seed; the tokenizer is the embedded one's.
    tiny_family: Optional[str] = None
    tiny_layers: int = 4
    tiny_d_model: int = 32
    seed: int = 0


def model_config_by_name(name: str) -> ModelConfig:
    """``conf/model/<name>.yaml`` read below the pipeline (``load_model("tiny_gpt2")``, which cannot compose).

    The yaml is the one source; this reads it onto the schema, as Hydra's compose does
    (``pipeline.api.model_config``, which scripts and notebooks should use: it also takes overrides).
    A model yaml whose defaults list is more than the schema would compose differently: refused.
    """
    path = CONF_DIR / "model" / f"{name}.yaml"
    if not path.exists():
        raise ConfigError("model", name, "unknown model config", hint=f"available: {', '.join(available_options('model'))}")
    values = OmegaConf.load(path)
    defaults = list(values.pop("defaults", ["model_schema", "_self_"]))
    if defaults != ["model_schema", "_self_"]:
        raise ConfigError(f"conf/model/{name}.yaml defaults", defaults, "only [model_schema, _self_] is read outside Hydra",
                          "use pipeline.api.model_config, or keep the model's values in its own yaml")
    merged = OmegaConf.merge(OmegaConf.structured(ModelConfig), values)
    return OmegaConf.to_object(merged)
