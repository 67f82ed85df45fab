"""Model loading, architecture adapters and the one scoped hook mechanism."""

from models.adapters import ArchitectureAdapter, adapter_for
from models.hooks import Hooks, StopForward, run_with_cache
from models.load import LoadedModel, load_model

__all__ = ["ArchitectureAdapter", "adapter_for", "Hooks", "StopForward", "run_with_cache", "LoadedModel", "load_model"]
