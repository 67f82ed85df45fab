"""Errors that name the offending key, its value and a hint.

Every user-facing failure in the toolkit is a ``ToolkitError`` so that the pipeline can store
class, key, value and hint in ``status.json`` and a user sees what to change, e.g.::

    editor.layers=[40]: out of range for gpt2 (12 layers). Hint: use 0-11.
"""

from __future__ import annotations

from typing import Any


class ToolkitError(Exception):
    """Base error: ``key=value: problem. Hint: ...``."""

    def __init__(self, key: str, value: Any, problem: str, hint: str = "") -> None:
        self.key = key
        self.value = value
        self.problem = problem
        self.hint = hint
        super().__init__(self.render())

    def render(self) -> str:
        text = f"{self.key}={self.value!r}: {self.problem}"
        if self.hint:
            text += f". Hint: {self.hint}"
        return text

    def to_dict(self) -> dict[str, Any]:
        return {
            "class": type(self).__name__,
            "key": self.key,
            "value": repr(self.value),
            "problem": self.problem,
            "hint": self.hint,
            "message": self.render(),
        }


class ConfigError(ToolkitError):
    """A configuration value is invalid (wrong choice, out of range, inconsistent)."""


class ModelError(ToolkitError):
    """A model cannot be loaded or has no architecture adapter."""


class CacheError(ToolkitError):
    """A cache entry is missing, corrupt, or was made with different settings."""


class DataError(ToolkitError):
    """A data record is malformed; carries the record's case id."""

    def __init__(self, key: str, value: Any, problem: str, hint: str = "", case_id: Any = None) -> None:
        self.case_id = case_id
        super().__init__(key, value, problem, hint)

    def render(self) -> str:
        prefix = f"case {self.case_id}: " if self.case_id is not None else ""
        return prefix + super().render()

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "case_id": self.case_id}


class ResourceError(ToolkitError):
    """The machine ran out of something the job needs (disk space, a writable directory)."""
