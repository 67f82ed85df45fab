"""Model loading, architecture adapters and the one scoped hook mechanism."""

from core.lazy import lazy_exports

__getattr__ = lazy_exports(__name__, {"models.adapters": ("ArchitectureAdapter", "adapter_for"),
                                      "models.hooks": ("Hooks", "StopForward", "run_with_cache"),
                                      "models.load": ("LoadedModel", "load_model")})

__all__ = ["ArchitectureAdapter", "adapter_for", "Hooks", "StopForward", "run_with_cache", "LoadedModel", "load_model"]
