"""make study, in-process on a tiny model: the paired bootstrap against plain numpy, the verdict rules
at their boundaries, the study's three jobs on a seeded sample (paired facts, per-fact files) resuming
after a kill mid-job, and the figures and report drawn from them."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from core.io import load_tensors, read_json
from helpers import write_known_user_facts
from metrics.paired import MDE_FACTOR, PairedEstimate, mean_difference, paired_bootstrap, ratio_of_means
from pipeline.jobs import run_job
from pipeline.paired import (INCONCLUSIVE, MIN_PAIRED_FACTS, NOT_SUPPORTED, SUPPORTED, PerFact, decide, paired_claims)

STUDY = ["experiment=study", "model=tiny_gpt2", "logger=none", "stage.samples=2", "stage.window=2",
         "stage.n_bootstrap=20", "stage.plot_facts=0", "stage.progress=false", "stage.sample=3"]
CONVERTED = Path(os.environ["KLOC_CACHE_DIR"]) / "models"  # conftest sets it
JOBS = {"entity": ["perspective=entity"], "relation": ["perspective=relation"],
        "relation_phrase": ["perspective=relation", "perspective.relation_span=phrase"]}


# -- the paired bootstrap and the verdicts -------------------------------------------------------
def _reference(columns: np.ndarray, statistic, n_resamples: int, seed: int) -> tuple[float, float, float, float]:
    """The same bootstrap written out plainly: one loop over resamples of whole facts."""
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(columns), size=(n_resamples, len(columns)))
    values = np.array([statistic(columns[draw].mean(axis=0)) for draw in draws])
    low, high = np.quantile(values, [0.025, 0.975])
    return statistic(columns.mean(axis=0)), low, high, values.std(ddof=1)


def test_paired_bootstrap_matches_a_plain_numpy_loop():
    rng = np.random.default_rng(1)
    columns = rng.normal(size=(40, 3)) + np.array([1.0, 0.5, 2.0])
    statistic = lambda m: (m[..., 0] - m[..., 1]) / m[..., 2]  # noqa: E731 (a share difference, as severing uses)
    ours = paired_bootstrap(columns, statistic, n_resamples=300, seed=7)
    assert (ours.value, ours.low, ours.high, ours.se) == pytest.approx(_reference(columns, statistic, 300, 7), rel=1e-12)
    assert ours.n == 40 and ours.mde == pytest.approx(2.8016 * ours.se, rel=1e-4)
    # a mean difference: bootstrap SE close to sd / sqrt(n), pairing kept (the shared per-fact offset cancels)
    offset = rng.normal(scale=5.0, size=200)
    upper, middle = offset + rng.normal(0.3, 0.2, 200), offset + rng.normal(0.0, 0.2, 200)
    paired = mean_difference(upper - middle, n_resamples=2000, seed=0)
    assert paired.low > 0 and paired.se == pytest.approx((upper - middle).std(ddof=1) / math.sqrt(200), rel=0.1)
    ratio = ratio_of_means(np.array([1.0, 2.0, np.nan]), np.array([2.0, 2.0, 1.0]), n_resamples=50)
    assert ratio.n == 2 and ratio.value == pytest.approx(0.75)  # the fact with a NaN is left out


def _estimate(low: float, high: float, n: int) -> PairedEstimate:
    return PairedEstimate((low + high) / 2, low, high, (high - low) / 4, n, 0.95)


@pytest.mark.parametrize("low, high, n, expect, verdict", [
    (0.1, 0.3, MIN_PAIRED_FACTS - 1, 1, f"too few facts (n={MIN_PAIRED_FACTS - 1})"),  # a clear effect, but n < 100
    (0.1, 0.3, MIN_PAIRED_FACTS, 1, SUPPORTED),
    (-0.3, -0.1, MIN_PAIRED_FACTS, 1, NOT_SUPPORTED),
    (-0.3, -0.1, MIN_PAIRED_FACTS, -1, SUPPORTED),
    (-0.1, 0.2, MIN_PAIRED_FACTS, 1, INCONCLUSIVE),  # covers 0 at n = 100
    (0.0, 0.2, 500, 1, INCONCLUSIVE),  # touching 0 is covering it
    (1e-9, 0.2, 500, 1, SUPPORTED),
])
def test_verdict_rules_at_the_boundaries(low, high, n, expect, verdict):
    assert decide(_estimate(low, high, n), expect) == verdict


def _per_fact(n_facts: int, mlp_peak: int, seed: int, n_layers: int = 12, severed_attn: float = 1.0) -> PerFact:
    rng = np.random.default_rng(seed)
    layers = np.arange(n_layers)
    bump = lambda peak: 0.3 * np.exp(-((layers - peak) / 1.5) ** 2)  # noqa: E731
    noise = lambda: rng.normal(0, 0.05, size=(n_facts, n_layers))  # noqa: E731
    hidden = bump(3) + noise()
    return PerFact(list(range(n_facts)), {"mlp": bump(mlp_peak) + noise(), "attn": bump(6) + noise(), "hidden": hidden,
                                          "hidden_severed_mlp": 0.2 * hidden, "hidden_severed_attn": severed_attn * hidden})


def test_paired_claims_on_synthetic_facts():
    variants = {"entity": _per_fact(120, mlp_peak=2, seed=0), "relation": _per_fact(120, mlp_peak=10, seed=1, severed_attn=0.5)}
    claims, stats = paired_claims(variants, n_resamples=200)
    verdicts = {c.key: c.verdict for c in claims}
    assert verdicts["entity_mlp"] == SUPPORTED and verdicts["relation_mlp"] == SUPPORTED
    assert verdicts["entity_severed_mlp"] == SUPPORTED and verdicts["relation_severed_attn"] == SUPPORTED
    assert verdicts["contrast_mlp_shift"] == SUPPORTED and verdicts["contrast_severed_attn"] == SUPPORTED
    assert "minimum detectable effect" in next(c.sentence for c in claims if c.key == "relation_mlp")
    few = {c.key: c.verdict for c in paired_claims({k: v.aligned(v.case_ids[:10]) for k, v in variants.items()},
                                                   n_resamples=50)[0]}
    assert few["relation_mlp"] == "too few facts (n=10)"
    assert all(s.estimate.n == 120 for s in stats)
    assert verdicts["knockout_relation"] == INCONCLUSIVE and "knockout" in next(c.sentence for c in claims
                                                                                if c.key == "knockout_relation")


def test_knockout_claim_from_per_fact_knockout_rows():
    """The knockout claim reads each fact's relative drop with the relation tokens blocked (middle/upper mean)."""
    rng = np.random.default_rng(3)
    n_facts, n_layers = 120, 12
    data = _per_fact(n_facts, mlp_peak=10, seed=1)
    upper = (np.arange(n_layers) >= n_layers / 3).astype(float)
    data.curves["knockout_relation"] = -0.4 * upper + rng.normal(0, 0.05, (n_facts, n_layers))
    data.curves["knockout_subject"] = rng.normal(0, 0.05, (n_facts, n_layers))
    data.curves["knockout_last"] = rng.normal(0, 0.05, (n_facts, n_layers))
    data.curves["knockout_relation"][7] = np.nan  # a fact without relation tokens is left out
    claims, stats = paired_claims({"relation": data}, n_resamples=200)
    claim = next(c for c in claims if c.key == "knockout_relation")
    assert claim.verdict == SUPPORTED and "over 119 paired facts" in claim.sentence
    drop = next(s for s in stats if s.label.startswith("relative drop of p, relation"))
    assert drop.estimate.value == pytest.approx(-0.4, abs=0.02)
    flipped = {**data.curves, "knockout_relation": -data.curves["knockout_relation"]}
    assert next(c for c in paired_claims({"relation": PerFact(data.case_ids, flipped)}, n_resamples=200)[0]
                if c.key == "knockout_relation").verdict == NOT_SUPPORTED


# -- the study's jobs, figures and report ----------------------------------------------------------
def test_study_options_compose(compose_config):
    cfg = compose_config(*STUDY, "perspective=relation", "perspective.relation_span=phrase")
    assert cfg.stage.name == "trace" and cfg.dataset.name == "known" and cfg.stage.sample == 3
    assert cfg.stage.n_facts is None and list(cfg.stage.kinds) == ["hidden", "mlp", "attn", "knockout"] and cfg.stage.severed
    paper = compose_config("experiment=study")
    assert (paper.stage.samples, paper.stage.window, paper.stage.sample, paper.stage.sample_seed) == (10, 10, 100, 0)
    assert compose_config("stage=trace").stage.sample is None  # plain trace jobs: the first known facts, as before


class Killed(BaseException):
    """What a kill looks like to the job: it stops mid-stage (run_job records it and re-raises)."""


def _no_drawing(monkeypatch_module) -> None:
    """Figures are test_figures.py's business; here they cost most of the time (matplotlib on 1 thread)."""
    from matplotlib.figure import Figure

    import pipeline.figures
    import pipeline.stages.trace

    def placeholder(figure, stem):
        paths = [Path(f"{stem}.{ext}") for ext in ("png", "pdf")]
        for path in paths:
            path.write_bytes(b"figure")
        return paths

    monkeypatch_module.setattr(pipeline.stages.trace, "_figures", lambda *args, **kwargs: [])
    for name in ("plot_role_heatmaps", "plot_aie_curves"):
        monkeypatch_module.setattr(pipeline.figures, name, lambda *args, **kwargs: Figure())
    monkeypatch_module.setattr(pipeline.figures, "plot_severed", lambda *args, **kwargs: None)
    monkeypatch_module.setattr(pipeline.figures, "save_figure", placeholder)


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


@pytest.fixture(scope="module")
def study(tmp_path_factory, tiny_gpt2, monkeypatch_module):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    import tracing.api
    from core.conf import CONF_DIR
    from pipeline.config import register_configs

    _no_drawing(monkeypatch_module)
    import pipeline.stages.trace  # the session's tiny model, not a fresh build per job (the same config)

    monkeypatch_module.setattr(pipeline.stages.trace, "load_configured_model", lambda cfg: tiny_gpt2)
    root = tmp_path_factory.mktemp("study")
    # A fresh trace cache (what resuming reads), sharing the converted embedded checkpoint (the tokenizer)
    (root / "cache").mkdir()
    (root / "cache" / "models").symlink_to(CONVERTED)
    facts = root / "facts.jsonl"
    write_known_user_facts(tiny_gpt2, facts, n=5)
    register_configs()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    computed: list = []
    original = tracing.api._compute

    def counting(*args, **kwargs):
        computed.append(args[1])  # the prompt
        if kill_after is not None and len(computed) > kill_after:
            raise Killed()
        return original(*args, **kwargs)

    def job(variant: str) -> dict:
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose(config_name="config", overrides=[
                f"paths.output_dir={root / 'outputs'}", f"paths.cache_dir={root / 'cache'}", *STUDY, "dataset=user",
                f"dataset.path={facts}", *JOBS[variant]])
        return run_job(cfg, root / "sweep" / variant)

    monkeypatch_module.setattr(tracing.api, "_compute", counting)
    try:
        kill_after = 1  # the entity job dies while tracing its second fact
        with pytest.raises(Killed):
            job("entity")
        killed = list(computed), read_json(root / "sweep" / "entity" / "status.json")["status"]
        kill_after = None
        results = {variant: job(variant)["results"] for variant in JOBS}
    finally:
        monkeypatch_module.setattr(tracing.api, "_compute", original)
        GlobalHydra.instance().clear()
        torch.set_num_threads(threads)
    return root, results, killed, computed


def test_study_resumes_fact_by_fact_after_a_kill(study):
    root, results, killed, computed = study
    killed, status = killed
    assert len(killed) == 2 and status == "failed"
    entity = results["entity"]
    assert entity["n_traced"] == 3 and entity["n_from_cache"] == 1  # the fact finished before the kill
    assert computed[len(killed)] == killed[1]  # resumed at the fact the kill interrupted
    assert computed.count(killed[0]) <= 3  # the first fact: once for entity, at most once per relation job
    assert read_json(root / "sweep" / "entity" / "status.json")["status"] == "done"


def test_study_jobs_trace_the_same_seeded_sample_and_keep_per_fact_curves(study):
    root, results, _, _ = study
    samples = [read_json(root / "sweep" / variant / "sample.json") for variant in JOBS]
    assert len(samples[0]["case_ids"]) == 3 and samples[0]["n_known"] == 5
    assert all(sample == samples[0] for sample in samples)
    for variant in JOBS:
        per_fact = load_tensors(root / "sweep" / variant / "per_fact.safetensors")
        meta = read_json(root / "sweep" / variant / "per_fact.json")
        assert meta["case_ids"] == samples[0]["case_ids"] and meta["role"] == "last_corrupted"
        assert set(meta["names"]) == {"hidden", "mlp", "attn", "hidden_severed_mlp", "hidden_severed_attn",
                                      "knockout_subject", "knockout_relation", "knockout_last"}
        assert per_fact["mlp"].shape == (3, 4) and per_fact["p_corrupted"].shape == (3,)
        assert results[variant]["sample"]["size"] == 3
    # The per-fact curves average to the job's aggregate at the last corrupted token.
    aggregate = load_tensors(root / "sweep" / "relation" / "aie.safetensors")["mlp.mean"][2]
    per_fact = load_tensors(root / "sweep" / "relation" / "per_fact.safetensors")["mlp"]
    torch.testing.assert_close(per_fact.mean(0), aggregate, rtol=1e-5, atol=1e-6)


def test_study_figures_and_report(study, tmp_path):
    from pipeline import figures, report

    root, _, _, _ = study
    out = tmp_path / "figures" / "tiny" / "study"
    for args in (["--perspective", "entity"], ["--perspective", "relation"],
                 ["--perspective", "relation", "--relation-span", "phrase"]):
        figures.main(["trace", "--sweep-dir", str(root / "sweep"), "--out", str(out), *args])
    figures.main(["severed", "--sweep-dir", str(root / "sweep"), "--out", str(out)])
    figures.main(["knockout", "--sweep-dir", str(root / "sweep"), "--out", str(out)])
    assert (out / "knockout.png").exists()
    for stem in ("trace_entity", "trace_relation", "trace_relation_phrase"):
        assert (out / f"{stem}_roles.png").exists() and (out / f"{stem}_per_fact.safetensors").exists()
    assert read_json(out / "trace_relation_phrase.json")["relation_span"] == "phrase"
    path = report.main(["--figures-dir", str(out.parent), "--out", str(tmp_path / "report.md"), "--n-resamples", "50"])
    text = path.read_text()
    assert "**too few facts (n=3)**: Relation perspective: the MLP effect sits in upper layers" in text
    assert "(phrase tokens)" in text and "## Paired tracing statistics" in text and "2.80 × SE" in text
    assert "**too few facts (n=3)**: Knockout: blocking the last token's attention to the relation tokens" in text
    assert "marginal fallback" not in text and "`study`: run `make study`" not in text


def test_report_without_per_fact_data_falls_back_with_a_note(tmp_path):
    from test_report import N_LAYERS, trace_frame  # the marginal report's synthetic frames
    from pipeline.report import render_report

    trace_frame("entity", {"mlp": 15}).to_csv(tmp_path / "trace_entity_aie.csv", index=False)
    (tmp_path / "trace_entity.json").write_text(f'{{"n_layers": {N_LAYERS}}}')
    text = render_report(tmp_path, "old")
    assert "marginal fallback" in text and f"**{SUPPORTED}**: Entity perspective" in text
    assert "`study`: run `make study`" in text


def test_seeded_sample_is_a_fixed_draw_in_dataset_order():
    from pipeline.stages.trace import seeded_sample

    facts = list(range(50))
    draw = seeded_sample(facts, 10, seed=3)
    assert draw == sorted(draw) and len(set(draw)) == 10 and draw == seeded_sample(facts, 10, seed=3)
    assert draw != seeded_sample(facts, 10, seed=4) and seeded_sample(facts, 80, seed=0) == facts
    assert MDE_FACTOR == pytest.approx(2.80, abs=0.01)
