"""The edit and summarize stages end to end on a tiny model (in-process, a few cases)."""

from __future__ import annotations

import json

import pytest
import torch

from core.io import read_json, read_jsonl
from pipeline.jobs import run_job

FAST = ["model=tiny_gpt2", "dataset=counterfact", "logger=none", "editor.layers=[1]", "editor.stats.n_samples=40",
        "editor.stats.max_tokens=48", "editor.v_num_grad_steps=2", "editor.context_template_lengths=[[3,2]]",
        "stage.n_cases=2", "stage.n_resamples=20", "stage.progress=false"]


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: 1 torch thread (2 shared cores)


@pytest.mark.parametrize("editor", ["rome", "memit", "alphaedit", "r_rome", "rome_attn"])
def test_every_editor_config_composes_and_typos_fail(compose_config, editor):
    from omegaconf import OmegaConf

    cfg = compose_config(f"editor={editor}", "editor.layers=[1]", "model=tiny_gpt2")
    config = OmegaConf.to_object(cfg.editor)
    assert config.name == editor and config.v_lr == 0.5 and config.stats.corpus == "wikitext2"
    with pytest.raises(Exception):
        compose_config(f"editor={editor}", "editor.v_lrr=0.1")


def test_edit_stage_both_perspectives_and_summary(compose_config, tmp_path):
    root = tmp_path / "sweep"
    for editor, perspective in (("rome", "entity"), ("memit", "relation")):
        cfg = compose_config("stage=edit", f"editor={editor}", f"perspective={perspective}", *FAST)
        job = root / f"editor={editor},perspective={perspective}"
        results = run_job(cfg, job)["results"]
        assert results["editor"] == editor and results["perspective"] == perspective and results["n_cases"] == 2
        assert results["n_skipped"] == 0 and results["skip_reasons"] == {} and results["n_loaded"] == results["n_read"]
        rows = read_jsonl(job / "cases.jsonl")
        assert len(rows) == 2 and {"pre", "post", "edit"} <= set(rows[0])
        assert rows[0]["pre"]["entity.reliability"] is not None and "relation.reliability" in rows[0]["post"]
        assert (job / "table.md").read_text().count("post") >= 1
        aggregates = read_json(job / "aggregates.json")
        assert aggregates["editor"] == editor and aggregates["rows"]
    cfg = compose_config("stage=summarize", f"stage.sweep_dir={root}", "logger=none")
    summary = run_job(cfg, tmp_path / "summary")["results"]
    assert len(summary["edit_jobs"]) == 2 and summary["trace_jobs"] == []
    import pandas as pd

    assert len(pd.read_parquet(tmp_path / "summary" / "summary.parquet")) == summary["n_rows"]
    table = (tmp_path / "summary" / "summary.md").read_text()
    assert "| rome | entity | entity | reliability |" in table.replace("tiny_gpt2 ", "").replace("| tiny_gpt2", "")
    assert "99.93" in table and "91.36" in table
    csv = (tmp_path / "summary" / "summary.csv").read_text().splitlines()
    assert csv[0].startswith("job,model,editor,perspective") and len(csv) > 10
    json.dumps(summary)


@pytest.mark.parametrize("editor", ["alphaedit", "r_rome", "rome_attn"])
def test_new_editors_run_through_the_edit_stage(compose_config, tmp_path, editor):
    """python -m pipeline.run stage=edit editor=<editor> model=tiny_gpt2 stage.n_cases=2, in-process."""
    cfg = compose_config("stage=edit", f"editor={editor}", "perspective=entity", *FAST)
    results = run_job(cfg, tmp_path / "job")["results"]
    assert results["editor"] == editor and results["n_cases"] == 2 and results["n_skipped"] == 0
    rows = read_jsonl(tmp_path / "job" / "cases.jsonl")
    assert len(rows) == 2 and all(row["post"]["entity.reliability"] is not None for row in rows)
    assert all(row["edit"]["edit_seconds"] >= 0 for row in rows)


def test_edit_stage_refuses_the_none_editor(compose_config, tmp_path):
    from core.errors import ConfigError

    cfg = compose_config("stage=edit", "editor=none", "model=tiny_gpt2", "dataset=counterfact", "logger=none")
    with pytest.raises(ConfigError, match="editor"):
        run_job(cfg, tmp_path / "job")


def test_edit_stage_on_a_user_file_without_new_objects_says_what_to_add(compose_config, tmp_path):
    from core.errors import ConfigError

    path = tmp_path / "facts.jsonl"
    rows = [{"subject": s, "relation_id": "P17", "template": "{} is located in", "object": "Italy"} for s in ("Rome", "Milan")]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    cfg = compose_config("stage=edit", "editor=rome", "model=tiny_gpt2", "dataset=user", f"dataset.path={path}", "logger=none")
    with pytest.raises(ConfigError, match="of 2 facts, 2 have no new object") as info:
        run_job(cfg, tmp_path / "job")
    assert "new_object" in info.value.hint and "dataset=counterfact" not in info.value.hint


class Killed(BaseException):
    """Stands in for a kill signal (a BaseException, like KeyboardInterrupt, that nothing catches)."""


def test_killed_edit_job_resumes_from_finished_groups(compose_config, tmp_path, monkeypatch):
    """An edit job dies after its first group; the rerun reuses that group and edits only the rest."""
    import editors.base

    cfg = compose_config("stage=edit", "editor=rome", "perspective=entity", *FAST, "stage.n_cases=3")
    job = tmp_path / "job"
    calls, killed = [], []
    original = editors.base.Editor.apply

    def dying_apply(self, loaded, requests):
        calls.append([r.case_id for r in requests])
        if len(calls) == 2 and not killed:
            killed.append(True)
            raise Killed("killed mid-sweep")
        return original(self, loaded, requests)

    monkeypatch.setattr(editors.base.Editor, "apply", dying_apply)
    with pytest.raises(Killed):
        run_job(cfg, job)
    assert read_json(job / "status.json")["status"] == "failed" and not (job / "results.json").exists()
    assert sorted(p.name for p in (job / "progress").iterdir()) == ["group_00000.json", "pre.jsonl"]
    calls.clear()
    results = run_job(cfg, job)["results"]
    assert len(calls) == 2, "the rerun edits groups 1 and 2 only"
    assert results["n_cases"] == 3 and len(read_jsonl(job / "cases.jsonl")) == 3
    assert not (job / "progress").exists()


def test_out_of_memory_in_an_edit_group_halves_the_group(compose_config, tmp_path, monkeypatch):
    """A batched (MEMIT) edit that runs out of GPU memory is retried as smaller groups; the job finishes."""
    import editors.base

    cfg = compose_config("stage=edit", "editor=memit", "perspective=entity", *FAST, "stage.edit_batch_size=2")
    original, sizes = editors.base.Editor.apply, []

    def small_gpu_apply(self, loaded, requests):
        sizes.append(len(requests))
        if len(requests) > 1:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated: only one request fits)")
        return original(self, loaded, requests)

    monkeypatch.setattr(editors.base.Editor, "apply", small_gpu_apply)
    results = run_job(cfg, tmp_path / "job")["results"]
    assert sizes == [2, 1, 1] and results["n_cases"] == 2
    rows = read_jsonl(tmp_path / "job" / "cases.jsonl")
    assert len(rows) == 2 and all(row["post"]["entity.reliability"] is not None for row in rows)
    assert all(row["edit"]["edit_seconds"] >= 0 for row in rows)
