"""Architecture adapters: one small table per model family, mapping canonical names to HF modules."""

from models.adapters.base import PROJECTIONS, ArchitectureAdapter, HookPoint, adapter_for, register_adapter, supported_model_types
from models.adapters import gemma3, gpt2, gptj, llama  # noqa: F401  (register the families)

__all__ = ["PROJECTIONS", "ArchitectureAdapter", "HookPoint", "adapter_for", "register_adapter", "supported_model_types"]
