"""The default stage (``full``) in-process on a tiny model: trace + edits + both-sided scores in one
job, the trace reused from the cache by a second job, and a killed job resuming at the step it lacks."""

from __future__ import annotations

import pytest

from core.io import read_json, read_jsonl
from helpers import write_known_user_facts
from pipeline.jobs import run_job

SMALL = ["model=tiny_gpt2", "logger=none", "editor.layers=[1]", "editor.stats.n_samples=40", "editor.stats.max_tokens=48",
         "editor.v_num_grad_steps=2", "editor.context_template_lengths=[[3,2]]", "stage.edit.n_cases=2",
         "stage.edit.n_resamples=20", "stage.edit.progress=false", "stage.trace.n_facts=2", "stage.trace.samples=2",
         "stage.trace.window=2", "stage.trace.n_bootstrap=50", "stage.trace.plot_facts=1", "stage.trace.progress=false",
         "stage.trace.severed=false"]


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: 1 torch thread (2 shared cores)


class Killed(BaseException):
    """Stands in for a kill signal."""


def test_default_stage_is_full(compose_config):
    cfg = compose_config()
    assert cfg.stage.name == "full" and cfg.stage.trace_dataset.name == "known" and cfg.stage.edit.n_cases == 100


def test_full_job_traces_edits_and_resumes(compose_config, tiny_gpt2, tmp_path, monkeypatch):
    facts = tmp_path / "facts.jsonl"
    write_known_user_facts(tiny_gpt2, facts)
    cache = f"paths.cache_dir={tmp_path / 'cache'}"
    (tmp_path / "cache").mkdir()
    import os
    from pathlib import Path

    (tmp_path / "cache" / "models").symlink_to(Path(os.environ.get("KLOC_CACHE_DIR", ".cache")).resolve() / "models")
    cfg = compose_config("editor=rome", "perspective=entity", *SMALL, "stage.trace_dataset.name=user",
                         f"stage.trace_dataset.path={facts}", cache)

    import pipeline.stages.full as full

    original = full.edit_cases

    def dying_edit(*args, **kwargs):
        raise Killed("killed during the edit step")

    monkeypatch.setattr(full, "edit_cases", dying_edit)
    job = tmp_path / "job"
    with pytest.raises(Killed):
        run_job(cfg, job)
    first_trace = read_json(job / "trace" / "results.json")
    assert first_trace["n_traced"] == 2 and first_trace["n_from_cache"] == 0
    monkeypatch.setattr(full, "edit_cases", original)
    results = run_job(cfg, job)["results"]
    assert results["trace"]["reused"] is True, "the resumed job must not redo its finished trace step"
    assert results["edit"]["n_cases"] == 2 and len(read_jsonl(job / "edit" / "cases.jsonl")) == 2
    assert (job / "trace" / "aie.safetensors").exists() and (job / "trace" / "figures" / "aie_roles.png").exists()
    assert {"entity.reliability", "entity.generality", "entity.locality", "relation.reliability"} <= set(results["edit"]["post"])

    # A second job of the sweep (another editor) needs the same trace: it reads every fact from the cache.
    other = compose_config("editor=memit", "perspective=entity", *SMALL, "stage.trace_dataset.name=user",
                           f"stage.trace_dataset.path={facts}", cache)
    second = run_job(other, tmp_path / "job2")["results"]
    assert second["trace"]["n_from_cache"] == second["trace"]["n_traced"] == 2
    assert second["trace"]["p_clean"] == results["trace"]["p_clean"]


def test_full_job_with_editor_none_only_traces(compose_config, tiny_gpt2, tmp_path):
    facts = tmp_path / "facts.jsonl"
    write_known_user_facts(tiny_gpt2, facts)
    overrides = [o for o in SMALL if not o.startswith("editor.")]
    cfg = compose_config("editor=none", *overrides, "stage.trace_dataset.name=user", f"stage.trace_dataset.path={facts}")
    results = run_job(cfg, tmp_path / "job")["results"]
    assert "trace" in results and "edit" not in results


def test_bad_step_settings_name_their_full_key(compose_config, tmp_path):
    from core.errors import ConfigError

    for override, key in (("stage.trace.n_facts=0", "stage.trace.n_facts"), ("stage.edit.n_cases=0", "stage.edit.n_cases")):
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            run_job(compose_config("model=tiny_gpt2", "logger=none", override), tmp_path / key)
