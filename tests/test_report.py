"""Claim verdicts on synthetic frames where a claim clearly holds / fails, and the report CLI on partial inputs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest

from metrics.paper import PAPER_GENERALITY, PAPER_RELIABILITY
from pipeline.report import (INCONCLUSIVE, NOT_SUPPORTED, SUPPORTED, band, evaluate_claims, main, peak_claim,
                             render_report, severed_claim, transfer_claim)

ROLES = ("first_corrupted", "middle_corrupted", "last_corrupted", "first_subsequent", "further", "last")
N_LAYERS = 48


def trace_frame(perspective: str, peaks: dict[str, int], n_facts: int = 100, half_width: float = 0.01,
                severed_scale: float | None = None) -> pd.DataFrame:
    """Gaussian AIE bumps (height 0.5, sd 3 layers) per kind; ``severed_scale`` adds severed hidden curves."""
    rows = []
    names = dict(peaks)
    for name, peak in list(names.items()):
        for role in ROLES:
            empty = perspective == "relation" and role == "middle_corrupted"
            for layer in range(N_LAYERS):
                aie = math.nan if empty else 0.5 * math.exp(-((layer - peak) / 3) ** 2 / 2)
                scales = {name: 1.0}
                if name == "hidden" and severed_scale is not None:
                    scales.update({"hidden_severed_mlp": severed_scale, "hidden_severed_attn": severed_scale})
                for out_name, scale in scales.items():
                    rows.append({"name": out_name, "perspective": perspective, "role": role, "layer": layer,
                                 "aie": aie * scale, "low": aie * scale - half_width, "high": aie * scale + half_width,
                                 "tokens": 0 if empty else 100, "n_facts": n_facts})
    return pd.DataFrame(rows)


def editing_frame(editor: str, perspective: str, own: tuple[float, float], other: tuple[float, float],
                  n: int = 100, half_width: float = 0.05) -> pd.DataFrame:
    """Reliability pre/post means per side; post intervals ``mean ± half_width`` clipped to [0, 1]."""
    other_side = "relation" if perspective == "entity" else "entity"
    rows = []
    for side, (pre, post) in ((perspective, own), (other_side, other)):
        for stage, mean in (("pre", pre), ("post", post)):
            rows.append({"job": f"{editor}-{perspective}", "model": "m", "editor": editor, "perspective": perspective,
                         "n_cases": n, "side": side, "metric": "reliability", "stage": stage, "mean": mean,
                         "low": max(0.0, mean - half_width), "high": min(1.0, mean + half_width), "n": n})
    return pd.DataFrame(rows)


def test_bands_are_thirds():
    assert [band(l, 48) for l in (0, 15, 16, 31, 32, 47)] == ["lower", "lower", "middle", "middle", "upper", "upper"]


@pytest.mark.parametrize("mlp_peak, expected", [(15, SUPPORTED), (25, SUPPORTED), (40, NOT_SUPPORTED)])
def test_entity_mlp_band(mlp_peak, expected):
    frame = trace_frame("entity", {"mlp": mlp_peak})
    claim = peak_claim("entity_mlp", frame, N_LAYERS, "mlp", ("lower", "middle"), "entity MLP")
    assert claim.verdict == expected
    assert f"layer {mlp_peak} of 48" in claim.sentence


def test_peak_inconclusive_with_few_facts_or_wide_intervals():
    few = peak_claim("k", trace_frame("entity", {"mlp": 15}, n_facts=3), N_LAYERS, "mlp", ("lower", "middle"), "x")
    wide = peak_claim("k", trace_frame("entity", {"mlp": 15}, half_width=0.6), N_LAYERS, "mlp", ("lower", "middle"), "x")
    assert few.verdict == INCONCLUSIVE and "only 3 facts" in few.sentence
    assert wide.verdict == INCONCLUSIVE


def test_relation_mlp_and_attention():
    holds = trace_frame("relation", {"mlp": 40, "attn": 30, "hidden": 20})
    fails = trace_frame("relation", {"mlp": 10, "attn": 5, "hidden": 20})
    verdicts = {c.key: c.verdict for c in evaluate_claims({"relation": (holds, N_LAYERS)}, None)}
    assert verdicts["relation_mlp"] == SUPPORTED and verdicts["relation_attn"] == SUPPORTED
    verdicts = {c.key: c.verdict for c in evaluate_claims({"relation": (fails, N_LAYERS)}, None)}
    assert verdicts["relation_mlp"] == NOT_SUPPORTED and verdicts["relation_attn"] == NOT_SUPPORTED
    assert verdicts["entity_mlp"] == INCONCLUSIVE  # no entity trace given


def test_severed():
    drop = severed_claim("s", trace_frame("relation", {"hidden": 20}, severed_scale=0.3), N_LAYERS, "attn", "x")
    same = severed_claim("s", trace_frame("relation", {"hidden": 20}, severed_scale=1.0), N_LAYERS, "attn", "x")
    none = severed_claim("s", trace_frame("relation", {"hidden": 20}), N_LAYERS, "attn", "x")
    assert (drop.verdict, same.verdict, none.verdict) == (SUPPORTED, NOT_SUPPORTED, INCONCLUSIVE)
    assert "layer 20" in drop.sentence and "fig-severed" in none.sentence


def test_transfer_claim():
    no_transfer = editing_frame("rome", "entity", own=(0.37, 0.99), other=(0.75, 0.70))
    transfer = editing_frame("rome", "entity", own=(0.30, 0.99), other=(0.30, 0.95))
    failed_edit = editing_frame("rome", "relation", own=(0.36, 0.38), other=(0.75, 0.70))
    few = editing_frame("rome", "entity", own=(0.37, 0.99), other=(0.75, 0.70), n=3)
    claim = transfer_claim(no_transfer, "rome", "entity")
    assert claim.verdict == SUPPORTED and "entity side 99.93, relation side 96.12" in claim.sentence
    assert transfer_claim(transfer, "rome", "entity").verdict == NOT_SUPPORTED
    assert transfer_claim(failed_edit, "rome", "relation").verdict == INCONCLUSIVE
    assert transfer_claim(few, "rome", "entity").verdict == INCONCLUSIVE


def test_paper_constants_keep_the_reported_values():
    original = {("rome", "entity", "entity"): 99.93, ("rome", "entity", "relation"): 96.12,
                ("memit", "entity", "entity"): 93.88, ("memit", "entity", "relation"): 97.28,
                ("rome", "relation", "entity"): 27.92, ("rome", "relation", "relation"): 99.99,
                ("memit", "relation", "entity"): 24.15, ("memit", "relation", "relation"): 91.36}
    assert all(PAPER_RELIABILITY[key] == value for key, value in original.items())
    editors = {"ft", "kn", "mend", "rome", "memit"}
    keys = {(e, p, s) for e in editors for p in ("entity", "relation") for s in ("entity", "relation")}
    assert set(PAPER_RELIABILITY) == keys == set(PAPER_GENERALITY)


def test_cli_partial_inputs(tmp_path: Path):
    figures = tmp_path / "figures" / "m"
    figures.mkdir(parents=True)
    trace_frame("entity", {"mlp": 15, "attn": 10, "hidden": 12}).to_csv(figures / "trace_entity_aie.csv", index=False)
    (figures / "trace_entity.json").write_text(json.dumps(
        {"model": "m", "n_layers": N_LAYERS, "n_facts": 100, "p_clean": 0.4, "p_corrupted": 0.05, "settings": {}}))
    (figures / "trace_entity_roles.png").write_bytes(b"png")
    out = tmp_path / "reports" / "m" / "report.md"
    assert main(["--figures-dir", str(figures), "--out", str(out)]) == out
    text = out.read_text()
    assert "# Knowledge localization report: m" in text
    for target in ("fig-trace-relation", "fig-severed", "table-editing"):
        assert f"`make {target}`" in text
    assert "`trace_entity_aie.csv`" not in text  # present, so not listed as missing
    assert "![entity perspective: AIE by token role and layer](../../figures/m/trace_entity_roles.png)" in text
    assert f"**{SUPPORTED}**: Entity perspective" in text


def test_render_with_nothing_names_every_target(tmp_path: Path):
    text = render_report(tmp_path, "empty")
    for target in ("fig-trace-entity", "fig-trace-relation", "fig-severed", "table-editing"):
        assert f"`make {target}`" in text
    assert SUPPORTED + "**" not in text
