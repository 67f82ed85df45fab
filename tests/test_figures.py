"""make figures / make report on a tiny model, in-process: trace jobs from both perspectives (with
severed traces) and edit jobs in one sweep dir, then the summarize stage, the figure commands and the
report, checked file by file."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

from core.errors import DataError
from core.io import read_json
from helpers import write_known_user_facts
from pipeline.jobs import run_job

TRACE = ["stage=trace", "model=tiny_gpt2", "logger=none", "stage.samples=2", "stage.window=2", "stage.n_bootstrap=50",
         "stage.plot_facts=1", "stage.progress=false"]
EDIT = ["stage=edit", "model=tiny_gpt2", "dataset=counterfact", "logger=none", "editor.layers=[1]",
        "editor.stats.n_samples=40", "editor.stats.max_tokens=48", "editor.v_num_grad_steps=2",
        "editor.context_template_lengths=[[3,2]]", "stage.n_cases=2", "stage.n_resamples=20", "stage.progress=false"]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, tiny_gpt2):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from core.conf import CONF_DIR
    from pipeline.config import register_configs

    root = tmp_path_factory.mktemp("figures")
    facts = root / "facts.jsonl"
    write_known_user_facts(tiny_gpt2, facts)
    register_configs()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)

    def job(name: str, *overrides: str) -> None:
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose(config_name="config", overrides=[f"paths.output_dir={root / 'outputs'}", *overrides])
        run_job(cfg, root / "sweep" / name)

    for perspective in ("entity", "relation"):
        job(f"trace-{perspective}", *TRACE, "dataset=user", f"dataset.path={facts}", f"perspective={perspective}")
    job("rome-entity", *EDIT, "editor=rome", "perspective=entity")
    job("memit-relation", *EDIT, "editor=memit", "perspective=relation")
    GlobalHydra.instance().clear()
    torch.set_num_threads(threads)
    return root


def test_summarize_collects_edits_and_traces_into_csv_and_parquet(sweep, compose_config, tmp_path):
    cfg = compose_config("stage=summarize", f"stage.sweep_dir={sweep / 'sweep'}", "logger=none")
    results = run_job(cfg, tmp_path / "summary")["results"]
    assert results["edit_jobs"] == ["memit-relation", "rome-entity"]
    assert results["trace_jobs"] == ["trace-entity", "trace-relation"]
    aie = pd.read_parquet(tmp_path / "summary" / "aie.parquet")
    assert len(aie) == results["n_aie_rows"] and set(aie["perspective"]) == {"entity", "relation"}
    assert {"hidden_severed_mlp", "hidden_severed_attn"} <= set(aie["name"])
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "summary" / "aie.csv"), aie, check_dtype=False)
    edits = pd.read_parquet(tmp_path / "summary" / "summary.parquet")
    assert set(edits["editor"]) == {"rome", "memit"} and set(edits["stage"]) == {"pre", "post"}


def test_figure_commands_and_report(sweep, tmp_path):
    from pipeline import figures, report

    out = tmp_path / "figures" / "tiny_gpt2"
    for perspective in ("entity", "relation"):
        figures.main(["trace", "--perspective", perspective, "--sweep-dir", str(sweep / "sweep"), "--out", str(out)])
    figures.main(["severed", "--sweep-dir", str(sweep / "sweep"), "--out", str(out)])
    figures.main(["table", "--sweep-dir", str(sweep / "sweep"), "--out", str(out)])
    for stem in ("trace_entity_roles", "trace_entity_curves", "trace_relation_roles", "trace_relation_curves", "severed"):
        assert (out / f"{stem}.png").stat().st_size > 0 and (out / f"{stem}.pdf").stat().st_size > 0
    meta = read_json(out / "trace_entity.json")
    assert meta["n_layers"] == 4 and meta["n_facts"] == 2 and meta["perspective"] == "entity"
    aie = pd.read_csv(out / "trace_relation_aie.csv")
    # The table drawn from the job's aie.safetensors equals the rows the job wrote to aie.jsonl.
    job_rows = pd.DataFrame([json.loads(line) for line in (sweep / "sweep" / "trace-relation" / "aie.jsonl").read_text().splitlines()])
    merged = aie.merge(job_rows, on=["name", "role", "layer"], suffixes=("", "_job"))
    assert len(merged) == len(aie) == len(job_rows)
    assert ((merged["aie"] - merged["aie_job"]).abs().fillna(0) < 1e-9).all()
    table = (out / "table_editing.md").read_text()
    assert "| rome | entity | entity | reliability |" in table and "99.93" in table
    assert (out / "editing.png").stat().st_size > 0 and (out / "editing.pdf").stat().st_size > 0

    # Every figure names its model; a role without tokens reads n/a (tiny_gpt2's relation facts have no
    # subsequent tokens), in the heatmap rows and in the curves' legend.
    import matplotlib.text

    drawn = {}

    def keep(fig, stem):
        drawn[stem.name if hasattr(stem, "name") else stem.rsplit("/", 1)[-1]] = fig
        return []

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(figures, "save_figure", keep)
        figures.write_trace(sweep / "sweep", "relation", tmp_path / "again")
        figures.write_severed(sweep / "sweep", tmp_path / "again")
    assert set(drawn) == {"trace_relation_roles", "trace_relation_curves", "severed"}
    assert all(fig.get_suptitle().startswith("tiny_gpt2: ") for fig in drawn.values())
    aggregates, _ = figures.job_aggregates(sweep / "sweep" / "trace-relation")
    empty = [r for r, n in enumerate(aggregates["hidden"].tokens) if int(n) == 0]
    assert empty  # else this check checks nothing
    texts = [t.get_text() for ax in drawn["trace_relation_roles"].axes for t in ax.findobj(matplotlib.text.Text)]
    assert texts.count("n/a") == len(empty) * 3  # each empty row of the hidden / mlp / attn panels
    legend = [t.get_text() for t in drawn["trace_relation_curves"].legends[0].get_texts()]
    assert sum(label.endswith(": n/a") for label in legend) == len(empty) and len(legend) == len(aggregates["hidden"].roles)

    report_path = report.main(["--figures-dir", str(out), "--out", str(tmp_path / "reports" / "tiny_gpt2" / "report.md")])
    text = report_path.read_text()
    assert "../../figures/tiny_gpt2/severed.png" in text and "inconclusive" in text  # 2 facts, 2 cases: no verdicts


def test_figure_commands_name_the_missing_job(tmp_path):
    from pipeline import figures

    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="fig-trace-entity"):
        figures.main(["trace", "--perspective", "entity", "--sweep-dir", str(tmp_path / "empty"), "--out", str(tmp_path / "o")])
    with pytest.raises(DataError, match="table-editing"):
        figures.main(["table", "--sweep-dir", str(tmp_path / "empty"), "--out", str(tmp_path / "o")])


def test_editing_figure_draws_each_editor_perspective_and_side(sweep):
    from pipeline.stages.summarize import collect
    from metrics.plots import plot_editing

    frame = collect(sweep / "sweep")
    fig = plot_editing(frame)
    titles = [ax.get_title() for ax in fig.axes]
    assert len(fig.axes) == 8  # memit, rome: 2 x 2 panels each
    assert sum("not run" in t for t in titles) == 4  # rome ran the entity edit only, memit the relation edit only
    rome_entity = next(ax for ax in fig.axes if ax.get_title().startswith("entity edit -> entity side") and "not run" not in ax.get_title())
    bars = [p.get_height() for p in rome_entity.patches]  # pre bars, then post bars: Rel., Gen., Loc.
    expected = frame[(frame.editor == "rome") & (frame.perspective == "entity") & (frame.side == "entity")]
    post = expected[expected.stage == "post"].set_index("metric")["mean"]
    assert bars[3] == pytest.approx(100 * post["reliability"]) and bars[5] == pytest.approx(100 * post["locality"])
    relation_side = [ax for ax in fig.axes if "-> relation side" in ax.get_title()]
    assert all([t.get_text() for t in ax.get_xticklabels()][-1] == "top-1" for ax in relation_side)
    with pytest.raises(ValueError, match="one model"):
        plot_editing(pd.concat([frame, frame.assign(model="other")]))

