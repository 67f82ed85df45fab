"""Every bad input we know of, each with the named error it must get before work starts.

A case is (id, action, error class, key): ``action(ctx)`` must raise ``error``, and the error must
name ``key`` (``ToolkitError.key``; for errors Hydra raises at compose time, the key must appear in
the message). The number of cases is the number of bad inputs covered, so it only ever grows:
add a case here with every fix. Sections follow the code that owns the check.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pytest

from core.errors import ConfigError, ToolkitError
from pipeline.jobs import run_job


@dataclass
class BadInputContext:
    """What an action gets: a scratch dir, the compose helper and an in-process job runner."""

    tmp_path: Path
    compose: Callable[..., Any]

    def job(self, *overrides: str, job_dir: Path | None = None) -> dict:
        """Compose with tiny, fast defaults (overridable) and run the job in-process."""
        cfg = self.compose("model=tiny_gpt2", "logger=none", f"paths.cache_dir={self.tmp_path / 'cache'}", *overrides)
        return run_job(cfg, job_dir or self.tmp_path / "job")


@dataclass(frozen=True)
class BadInput:
    id: str
    action: Callable[[BadInputContext], Any]
    error: type[BaseException]
    key: str


# --- top-level keys and the job wrapper (pipeline/run.py, pipeline/jobs.py, pipeline/config.py) ---
JOB_CASES: list[BadInput] = [
    BadInput("model.dtype=float8", lambda c: c.job("stage=known", "dataset=known", "model.dtype=float8"),
             ConfigError, "model.dtype"),
]

# --- caches: corrupt, truncated or unreadable entries (core/hashing.py and every cache user) ---
CACHE_CASES: list[BadInput] = [
]

# --- models, data files and stage inputs (models/, facts/, editors/, pipeline/stages/) ---
def _choices(ctx: BadInputContext, *overrides: str) -> None:
    """The entry point's check of Hydra's recorded group choices (pipeline.choices)."""
    from pipeline.choices import check_group_choices

    check_group_choices(dict(ctx.compose(*overrides, return_hydra_config=True).hydra.runtime.choices))


INPUT_CASES: list[BadInput] = [
    BadInput("editor=rome_schema", lambda c: _choices(c, "editor=rome_schema"), ConfigError, "editor"),
    BadInput("editor.name=memit on rome", lambda c: c.job("stage=edit", "editor=rome", "editor.name=memit"),
             ConfigError, "editor.name"),
    BadInput("editor.name=memit on rome (full)", lambda c: c.job("editor=rome", "editor.name=memit"),
             ConfigError, "editor.name"),
]

CASES = JOB_CASES + CACHE_CASES + INPUT_CASES


@pytest.fixture()
def ctx(tmp_path, compose_config) -> BadInputContext:
    return BadInputContext(tmp_path=tmp_path, compose=compose_config)


def named_key(err: BaseException) -> str | None:
    return err.key if isinstance(err, ToolkitError) else None


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.id)
def test_bad_input_gets_a_named_error(case: BadInput, ctx: BadInputContext) -> None:
    with pytest.raises(case.error) as info:
        case.action(ctx)
    key = named_key(info.value)
    if key is not None:
        assert key == case.key, str(info.value)
    else:
        assert case.key in str(info.value), str(info.value)
