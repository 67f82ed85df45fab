"""stage=calibrate on a tiny random model: compose, files, the pick, the fluency floor, resume, bad knobs.

One calibration job (tiny GPT-J, 3 ROME layers x 2 training cases) is run once for the module: it is
killed at its second grid point, resumed, then rerun (skipped). Its generations are replaced by a
loop while the edit of layer 2 is in force, so that point's fluency falls to 0 and the floor must
exclude it whatever its scores.
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import torch
import yaml

from core.errors import ConfigError
from core.io import atomic_save_tensors
from helpers import shared_model_cache
from pipeline.jobs import run_job

pytestmark = pytest.mark.usefixtures("one_thread")

FAST = ["stage=calibrate", "editor=rome", "model=tiny_gptj", "logger=none", "editor.stats.n_samples=40",
        "editor.stats.max_tokens=48", "editor.v_num_grad_steps=10", "editor.context_template_lengths=[[3,2]]",
        "stage.n_cases=2", "stage.n_resamples=20", "stage.progress=false", "stage.quality.max_new_tokens=8",
        "stage.quality.nll_tokens=128", "stage.quality.nll_window=64", "stage.dataset.limit=10",
        "stage.search.rome.layers=[[0],[1],[2]]", "stage.max_fluency_drop=0.3", "stage.max_collapse_rate=1.0"]
WRECKED = [2]  # the layer whose point generates loops
AIE = [0.01, 0.05, 0.02, 0.0]  # the fake trace's MLP AIE at the last subject token: peak at layer 1


def _compose(root: Path, *extra: str):
    from pipeline.api import compose

    return compose([*FAST, f"paths.output_dir={root / 'outputs'}", f"paths.cache_dir={shared_model_cache(root)}", *extra])


def _fake_trace(root: Path) -> Path:
    """A trace job dir holding only what calibrate reads: aie.safetensors and the perspective."""
    from tracing.spans import ROLES

    trace = root / "trace_job"
    mean = torch.zeros(len(ROLES), len(AIE))
    mean[ROLES.index("last_corrupted")] = torch.tensor(AIE)
    atomic_save_tensors(trace / "aie.safetensors", {"mlp.mean": mean})
    (trace / "results.json").write_text('{"stage": "trace", "results": {"perspective": "entity"}}')
    return trace


def _instrument(mp: pytest.MonkeyPatch, calls: dict, kill_at: int | None) -> None:
    """Count editor builds and pre-edit scorings; loop the generations under the WRECKED edit; raise
    at the ``kill_at``-th build (a simulated kill: the job stops mid-grid)."""
    import pipeline.stages.edit as edit
    import pipeline.stages.quality as quality

    real_build, real_generate, real_score = edit.build_editor, quality.greedy_continuations, edit.score_cases
    wrecked = {"on": False}

    def build(config, **kwargs):
        calls["builds"].append(list(config.layers))
        if kill_at is not None and len(calls["builds"]) == kill_at:
            raise RuntimeError("killed")
        editor = real_build(config, **kwargs)
        if list(config.layers) == WRECKED:
            real_apply = editor.apply

            @contextlib.contextmanager
            def apply(loaded, requests):
                with real_apply(loaded, requests) as result:
                    wrecked["on"] = True
                    try:
                        yield result
                    finally:
                        wrecked["on"] = False
            editor.apply = apply
        return editor

    def generate(loaded, prompts, max_new_tokens, **kwargs):
        if wrecked["on"]:
            return [" the" * max_new_tokens for _ in prompts]
        return real_generate(loaded, prompts, max_new_tokens, **kwargs)

    def score(*args, **kwargs):
        calls["pre"] += 1
        return real_score(*args, **kwargs)

    mp.setattr(edit, "build_editor", build)
    mp.setattr(edit, "score_cases", score)
    mp.setattr(quality, "greedy_continuations", generate)


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory, one_thread):
    root = tmp_path_factory.mktemp("calibrate")
    cfg = _compose(root, f"stage.trace_dir={_fake_trace(root)}")
    job = root / "job"
    runs = []
    for kill_at in (2, None, None):  # killed at the 2nd point, resumed, rerun
        calls = {"builds": [], "pre": 0}
        with pytest.MonkeyPatch.context() as mp:
            _instrument(mp, calls, kill_at)
            try:
                payload = run_job(cfg, job)
            except RuntimeError as err:
                assert str(err) == "killed"
                payload = None
                calls["progress"] = sorted(p.name for p in (job / "progress" / "points").iterdir())
        runs.append(SimpleNamespace(payload=payload, **calls))
    return SimpleNamespace(root=root, job=job, runs=runs, results=runs[1].payload["results"],
                           csv=pd.read_csv(job / "calibration.csv"))


# -- compose and grids ---------------------------------------------------------------------------------
@pytest.mark.parametrize("editor", ["rome", "memit", "ft", "kn"])
def test_calibrate_composes_for_every_editor_with_a_space(compose_config, editor):
    from omegaconf import OmegaConf

    from pipeline.stages.config import CalibrateStageConfig, EditStageConfig

    cfg = compose_config("stage=calibrate", f"editor={editor}", "model=tiny_gpt2")
    settings = OmegaConf.to_object(cfg.stage)
    assert isinstance(settings, CalibrateStageConfig) and editor in settings.search
    settings.validate()
    assert settings.dataset.split == "train" and settings.quality.enabled
    edit = settings.edit_settings()
    assert type(edit) is EditStageConfig and edit.n_cases == settings.n_cases and edit.name == "edit"
    with pytest.raises(Exception, match="n_casez"):
        compose_config("stage=calibrate", "stage.n_casez=3")


def test_auto_layers_are_sized_from_the_model():
    from pipeline.stages.grid import auto_layers, expand

    assert auto_layers(30, 15) == [[layer] for layer in range(0, 30, 2)]  # every 2nd layer of 30
    assert auto_layers(4, 15) == [[0], [1], [2], [3]]
    assert auto_layers(30, 15, window=5) == [list(range(end - 4, end + 1)) for end in range(4, 30, 2)]
    assert auto_layers(4, 15, window=5) == [[0, 1, 2, 3]]  # a window wider than the model: the whole model
    points = expand({"layers": "auto", "mom2_update_weight": [1e3, 1e4]}, 30, 15, window=5)
    assert len(points) == 13 * 2 and points[0].values == {"layers": [0, 1, 2, 3, 4], "mom2_update_weight": 1e3}
    assert points[1].label == "layers=[0,1,2,3,4] mom2_update_weight=10000"


# -- the job's files and its pick ------------------------------------------------------------------------
def test_job_writes_table_figure_and_the_winning_yaml(calibrated):
    job, results = calibrated.job, calibrated.results
    for name in ("calibration.csv", "calibration.md", "calibration.png", "calibration.pdf", "points.jsonl",
                 "rome_tiny_gptj.yaml"):
        assert (job / name).stat().st_size > 0, name
    assert not (job / "progress").exists()
    frame = calibrated.csv
    assert list(frame["layers"]) == ["[0]", "[1]", "[2]"] and set(frame["n_cases"]) == {2}
    assert (frame["locality_drop"] == frame["locality_pre"] - frame["locality"]).all()
    text = (job / "rome_tiny_gptj.yaml").read_text()
    assert text.startswith("# @package editor\n# Calibrated by stage=calibrate in " + str(job))
    assert "N=2 CounterFact train cases" in text and "# Winner:" in text and "# Runner-up:" in text
    values = yaml.safe_load(text)
    assert values["layers"] == results["winner"]["values"]["layers"] and values["clamp_norm_factor"] == 4.0
    assert values["stats"] == yaml.safe_load(Path("conf/editor_model/rome_tiny_gptj.yaml").read_text())["stats"]
    assert "layers: [" in text  # flow-style lists, as the hand-written files
    from omegaconf import OmegaConf

    from editors.config import RomeConfig

    merged = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(RomeConfig(layers=[0])), values))
    assert merged.layers == values["layers"]  # it is a valid editor_model file for the schema
    markdown = (job / "calibration.md").read_text()
    assert f"**Winner:** `{results['winner']['label']}`" in markdown


def test_winner_is_the_argmax_of_the_harmonic_mean_among_eligible_points(calibrated):
    frame = calibrated.csv
    hand = []
    for row in frame.to_dict("records"):
        rates = [row["reliability"], row["generality"], row["locality"]]
        hm = 0.0 if min(rates) == 0 else 3 / sum(1 / r for r in rates)
        assert math.isclose(hm, row["score"], abs_tol=1e-12)
        eligible = row["fluency_drop"] <= 0.3 and row["collapse_rate"] <= 1.0
        assert eligible == row["eligible"], row
        hand.append((hm, -row["point"], row["point"], eligible))
    best = max(entry for entry in hand if entry[3])
    assert calibrated.results["winner"]["point"] == best[2]
    assert calibrated.results["n_eligible"] == sum(entry[3] for entry in hand)
    ranked = sorted((entry for entry in hand if entry[3]), reverse=True)
    assert calibrated.results["runner_up"]["point"] == ranked[1][2]


def test_fluency_floor_excludes_a_point(calibrated):
    wrecked = calibrated.csv[calibrated.csv["layers"] == str(WRECKED).replace(" ", "")].iloc[0]
    assert wrecked["fluency"] == 0.0 and wrecked["fluency_drop"] == 1.0
    assert not wrecked["eligible"] and "fluency fell 100.0%" in wrecked["ineligible"] and pd.isna(wrecked["rank"])
    assert calibrated.results["winner"]["values"]["layers"] != WRECKED


def test_mlp_aie_of_the_trace_dir_is_drawn_and_compared(calibrated):
    frame, results = calibrated.csv, calibrated.results
    assert list(frame["mlp_aie"]) == pytest.approx(AIE[:3])
    assert results["aie_peak_layer"] == 1 and results["trace"]["source"] == str(calibrated.root / "trace_job")
    assert "peaks at layer 1" in (calibrated.job / "calibration.md").read_text()


def test_killed_job_resumes_its_finished_points_and_a_finished_job_is_skipped(calibrated):
    killed, resumed, rerun = calibrated.runs
    assert killed.payload is None and killed.builds == [[0], [1]] and killed.progress == ["point_0000.json"]
    assert resumed.builds == [[1], [2]]  # point 0 came from its file
    assert resumed.pre == 0  # the unedited model's rows too (progress/pre.jsonl)
    assert rerun.builds == [] and rerun.pre == 0 and rerun.payload == resumed.payload


def test_changed_grid_is_refused_on_a_finished_job(calibrated):
    with pytest.raises(ConfigError) as info:
        run_job(_compose(calibrated.root, "stage.max_fluency_drop=0.2",
                         f"stage.trace_dir={calibrated.root / 'trace_job'}"), calibrated.job)
    assert info.value.key == "config" and "stage.max_fluency_drop" in str(info.value)


def test_install_copies_the_yaml_and_never_overwrites_silently(calibrated, tmp_path):
    from pipeline.calibrate_install import install

    conf = tmp_path / "conf"
    (conf / "editor_model").mkdir(parents=True)
    target, _ = install(calibrated.job, conf)
    assert target.read_text() == (calibrated.job / "rome_tiny_gptj.yaml").read_text()
    target.write_text("# @package editor\nlayers: [3]\n")
    with pytest.raises(ConfigError, match="--overwrite") as info:
        install(calibrated.job, conf)
    assert "-layers: [3]" in info.value.hint and target.read_text().endswith("[3]\n")
    install(calibrated.job, conf, overwrite=True)
    assert target.read_text() == (calibrated.job / "rome_tiny_gptj.yaml").read_text()


# -- refusals before any work ------------------------------------------------------------------------------
@pytest.mark.parametrize("override, key", [
    ("+stage.search.rome.layerz=[[1]]", "stage.search.rome.layerz"),  # a knob is added with +
    ("+stage.search.rome.v_lrr=[0.1,0.5]", "stage.search.rome.v_lrr"),
    ("stage.search.rome.clamp_norm_factor=auto", "stage.search.rome.clamp_norm_factor"),
    ("+stage.search.rome.v_lr=0.5", "stage.search.rome.v_lr"),
    ("+stage.search.rome.name=[memit]", "stage.search.rome.name"),
    ("perspective=relation", "perspective"),
    ("stage.dataset.split=edit", "stage.dataset.split"),
    ("stage.trace_dir=/nonexistent/trace", "stage.trace_dir"),
])
def test_a_bad_knob_is_refused_before_the_model_loads(tmp_path, monkeypatch, override, key):
    import pipeline.stages.calibrate as calibrate

    monkeypatch.setattr(calibrate, "load_configured_model", lambda cfg: pytest.fail("the model loaded"))
    with pytest.raises(ConfigError) as info:
        run_job(_compose(tmp_path, override), tmp_path / "job")
    assert info.value.key == key


def test_mend_is_refused_with_what_to_run_instead(compose_config, tmp_path):
    cfg = compose_config("stage=calibrate", "editor=mend", "model=tiny_gpt2", "logger=none",
                         f"paths.cache_dir={shared_model_cache(tmp_path)}")
    with pytest.raises(ConfigError) as info:
        run_job(cfg, tmp_path / "job")
    assert info.value.key == "editor" and "stage=train_mend" in info.value.hint


def test_a_knob_typo_on_the_command_line_fails_at_compose(tmp_path):
    with pytest.raises(ConfigError, match="stage.search.rome.layerz"):
        _compose(tmp_path, "stage.search.rome.layerz=[[1]]")


def test_a_bad_value_is_refused_before_any_edit(tmp_path, monkeypatch):
    import pipeline.stages.edit as edit

    monkeypatch.setattr(edit, "build_editor", lambda *a, **k: pytest.fail("an edit started"))
    for override, key, problem in (("stage.search.rome.layers=[[1],[7]]", "stage.search.rome", "out of range"),
                                   ("stage.search.rome.clamp_norm_factor=[fast]", "stage.search.rome.clamp_norm_factor",
                                    "not a valid editor.clamp_norm_factor")):
        with pytest.raises(ConfigError) as info:
            run_job(_compose(tmp_path, override), tmp_path / "job")
        assert info.value.key == key and problem in str(info.value), str(info.value)


# -- the pure rules ----------------------------------------------------------------------------------------
def test_eligibility_ranking_and_rank_correlation_by_hand():
    from metrics.calibration import Eligibility, fluency_drop, ineligible_reason, ranking, spearman

    rule = Eligibility(max_fluency_drop=0.05, max_collapse_rate=0.1)
    assert fluency_drop(5.0, 4.0) == pytest.approx(0.2) and fluency_drop(5.0, 6.0) == pytest.approx(-0.2)
    assert fluency_drop(0.0, 0.0) == 0.0 and math.isnan(fluency_drop(None, 1.0)) and fluency_drop(5.0, math.inf) == math.inf
    assert ineligible_reason(0.06, 0.0, rule) == "fluency fell 6.0% (> 5%)"
    assert ineligible_reason(0.0, 0.2, rule) == "20% of edits collapsed (> 10%)"
    assert ineligible_reason(0.05, 0.1, rule) is None and ineligible_reason(math.nan, 0.0, rule) == "fluency not measured"
    # the best score (0.9) is ineligible: the winner is the best eligible one; ties keep grid order; NaN last
    assert ranking([0.9, 0.5, 0.7, 0.7, math.nan], [False, True, True, True, True]) == [2, 3, 1, 4]
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(0.9486832980505138)  # scipy.stats.spearmanr
    assert math.isnan(spearman([1, 2], [1, 2])) and math.isnan(spearman([1, 1, 1], [1, 2, 3]))
