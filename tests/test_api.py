"""pipeline.api: typed configs composed as the CLI composes them, and the edit stage as one call."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from core.conf import available_options
from core.errors import ConfigError
from pipeline import api


def test_editor_config_equals_the_cli_compose(compose_config):
    from editors.rome import RomeConfig

    config = api.editor_config("rome", model="tiny_gpt2")
    assert isinstance(config, RomeConfig)
    assert config == OmegaConf.to_object(compose_config("editor=rome", "model=tiny_gpt2").editor)
    assert config.layers == [1] and config.stats.n_samples == 200  # conf/editor_model/rome_tiny_gpt2.yaml


def test_keyword_and_string_overrides_agree():
    by_keyword = api.editor_config("rome", model="tiny_gpt2", v_lr=0.1, **{"stats.n_samples": 20}, kl_prompts=["{} was"])
    by_string = api.editor_config("rome", model="tiny_gpt2",
                                  overrides=["editor.v_lr=0.1", "editor.stats.n_samples=20", "editor.kl_prompts=['{} was']"])
    assert by_keyword == by_string
    assert by_keyword.v_lr == 0.1 and by_keyword.stats.n_samples == 20 and by_keyword.kl_prompts == ["{} was"]


@pytest.mark.parametrize("values", [{"v_lrr": 0.1}, {"stats.n_sample": 3}, {"v_lr": "fast"}])
def test_typos_and_wrong_types_fail_at_compose(values):
    with pytest.raises(ConfigError, match="overrides"):
        api.editor_config("rome", model="tiny_gpt2", **values)


def test_an_unknown_option_lists_the_choices():
    with pytest.raises(ConfigError, match="rome") as info:
        api.editor_config("romee", model="tiny_gpt2")
    assert info.value.key == "editor" and info.value.value == "romee"


@pytest.mark.parametrize("editor", [name for name in available_options("editor") if name != "none"])
def test_every_editor_composes(editor):
    config = api.editor_config(editor, model="tiny_gpt2")
    assert config.name == editor


def test_trace_dataset_stage_and_paths_settings():
    from facts import DatasetConfig
    from pipeline.stages.edit import EditStageConfig
    from tracing.settings import TraceSettings

    settings = api.trace_settings(samples=3, kinds=["hidden"], severed=False)
    assert isinstance(settings, TraceSettings)
    assert settings.samples == 3 and settings.kinds == ("hidden",) and settings.severed == () and settings.window == 10
    assert api.dataset_config("counterfact", limit=2) == DatasetConfig(name="counterfact", limit=2)
    stage = api.stage_config("edit", n_cases=3)
    assert isinstance(stage, EditStageConfig) and stage.n_cases == 3
    assert set(api.paths_config()) >= {"cache_dir", "output_dir", "data_dir", "root_dir"}


def test_compose_leaves_global_hydra_as_it_was():
    from hydra.core.global_hydra import GlobalHydra

    before = GlobalHydra.instance().is_initialized()
    api.editor_config("rome", model="tiny_gpt2")
    assert GlobalHydra.instance().is_initialized() == before


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("perspective", ["entity", "relation"])
def test_edit_and_evaluate_two_counterfact_facts(tiny_gpt2, perspective):
    import torch

    from facts import DatasetConfig, load_facts

    facts = [fact for fact in load_facts(DatasetConfig(name="counterfact", limit=20)) if fact.relation_id][:2]
    rome = api.editor_config("rome", model="tiny_gpt2", v_num_grad_steps=2, context_template_lengths=[[3, 2]],
                             **{"stats.n_samples": 40, "stats.max_tokens": 48})
    weights = {name: p.detach().clone() for name, p in tiny_gpt2.model.named_parameters()}
    outcome = api.edit_and_evaluate(tiny_gpt2, facts, editor=rome, perspective=perspective, n_resamples=20,
                                    quality={"enabled": False})
    assert [row["case_id"] for row in outcome.rows] == [fact.case_id for fact in facts]
    assert {row["when"] for row in outcome.tidy()} == {"pre", "post"}
    assert outcome.table.has_post and outcome.summary["editor"] == "rome" and outcome.summary["perspective"] == perspective
    assert "|" in outcome.markdown()
    for name, p in tiny_gpt2.model.named_parameters():  # restored bit for bit after every edit
        assert torch.equal(p, weights[name]), name


def test_one_user_level_default_cache_dir(monkeypatch, tmp_path):
    """Without KLOC_CACHE_DIR the config and the library share ${XDG_CACHE_HOME}/knowledge-localization,
    whatever the working directory; KLOC_CACHE_DIR overrides both."""
    from models.load import default_cache_dir

    monkeypatch.delenv("KLOC_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.chdir(tmp_path)
    expected = tmp_path / "xdg" / "knowledge-localization"
    assert default_cache_dir() == expected
    assert api.paths_config()["cache_dir"] == str(expected)
    monkeypatch.setenv("KLOC_CACHE_DIR", str(tmp_path / "mine"))
    assert default_cache_dir() == tmp_path / "mine" and api.paths_config()["cache_dir"] == str(tmp_path / "mine")
    assert api.paths_config(["paths.cache_dir=/elsewhere"])["cache_dir"] == "/elsewhere"


@pytest.mark.usefixtures("one_thread")
def test_edit_and_evaluate_matches_the_edit_stage(compose_config, tiny_gpt2, tmp_path):
    """The same cases and settings give the stage's cases.jsonl rows and aggregates.json table."""
    from core.io import read_json, read_jsonl
    from facts import DatasetConfig, load_facts
    from pipeline.jobs import run_job

    editor = ["editor.layers=[1]", "editor.stats.n_samples=40", "editor.stats.max_tokens=48", "editor.v_num_grad_steps=2",
              "editor.context_template_lengths=[[3,2]]"]
    stage = ["stage.n_cases=2", "stage.n_resamples=20", "stage.quality.enabled=false"]
    cfg = compose_config("stage=edit", "editor=rome", "model=tiny_gpt2", "dataset=counterfact", "dataset.limit=2",
                         "logger=none", *editor, *stage)
    run_job(cfg, tmp_path / "job")
    facts = list(load_facts(DatasetConfig(name="counterfact", limit=2)))
    outcome = api.edit_and_evaluate(tiny_gpt2, facts, editor="rome", overrides=[*editor, *stage])
    stored = read_jsonl(tmp_path / "job" / "cases.jsonl")
    assert [(r["pre"], r["post"]) for r in outcome.rows] == [(r["pre"], r["post"]) for r in stored]
    assert outcome.table.to_dict()["rows"] == read_json(tmp_path / "job" / "aggregates.json")["rows"]


@pytest.mark.parametrize("name", available_options("model"))
def test_model_config_by_name_reads_what_compose_composes(name):
    """load_model("<name>") reads conf/model below the pipeline; it must agree with the compose API."""
    from models.config import model_config_by_name

    assert model_config_by_name(name) == api.model_config(name)
    assert api.model_config(name, dtype="bfloat16").dtype == "bfloat16"


def test_train_mend_without_an_editor_trains_the_composed_mend_editor(compose_config):
    """editor=none: train_mend's editor is editor=mend composed for the job's model (conf/editor_model)."""
    from pipeline.stages.train_mend import mend_editor

    for editor in ("none", "mend"):
        editor_cfg = mend_editor(compose_config("stage=train_mend", f"editor={editor}", "model=tiny_gpt2"))
        assert editor_cfg == api.editor_config("mend", model="tiny_gpt2") and editor_cfg.layers
    with pytest.raises(ConfigError, match="mend"):
        mend_editor(compose_config("stage=train_mend", "editor=rome", "model=tiny_gpt2"))
