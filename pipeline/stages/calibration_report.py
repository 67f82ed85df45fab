"""What ``stage=calibrate`` writes: the table, the figure, and the winner's ``conf/editor_model`` yaml.

- ``calibration.csv``: one row per grid point (knob values, post-edit means, the locality drop
  against the unedited model, fluency drop, collapse rate, harmonic mean, eligibility, rank, the
  MLP AIE at the point's layer).
- ``calibration.md``: the same, readable, with the winner, the runner-up and whether the layer
  where the MLP's causal effect peaks is the layer where editing works best (Hase et al., 2023,
  found that it is not a predictor: here the numbers say so for this model).
- ``calibration.{png,pdf}``: each metric against the knob (one panel per value of the other
  knobs), the MLP AIE by layer on a twin axis when the knob is the layer.
- ``<editor>_<model>.yaml``: the per-model file in the format of ``conf/editor_model/*.yaml``,
  the existing file's other keys kept, a comment citing this evidence. Never installed here.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional, Sequence

import pandas as pd
import yaml
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from core.io import atomic_write_text
from metrics.calibration import peak, ranking, spearman
from pipeline.stages.config import CalibrateStageConfig
from pipeline.stages.grid import GridPoint, format_value
from tracing.plots import save_figure

RATES = ("reliability", "generality", "locality")
LINES = {"reliability": "tab:blue", "generality": "tab:orange", "locality": "tab:green", "score": "black"}


def write_report(job_dir: Path, records: list[dict[str, Any]], points: list[GridPoint], aie: Optional[list[float]],
                 trace_info: dict[str, Any], settings: CalibrateStageConfig, editor: str, model: str,
                 base_config: Optional[Path]) -> dict[str, Any]:
    """Write every file of the job (but ``points.jsonl``); returns the job summary for ``results.json``."""
    order = ranking([r["score"] for r in records], [r["eligible"] for r in records])
    knob = x_knob(points)
    for rank, index in enumerate(order, start=1):
        records[index]["rank"] = rank
    for record in records:
        record.setdefault("rank", None)
        record["x"] = x_value(record["values"], knob)
        record["mlp_aie"] = aie[record["x"]] if aie is not None and knob == "layers" else math.nan
    winner = records[order[0]] if order else None
    runner_up = records[order[1]] if len(order) > 1 else None
    layers = _tracing_vs_editing(records, aie, knob)
    frame = table(records, points)
    files = ["calibration.csv", "calibration.md", "calibration.png", "calibration.pdf", "points.jsonl"]
    atomic_write_text(job_dir / "calibration.csv", frame.to_csv(index=False))
    title = f"{editor} on {model}: {len(records)} grid points x {records[0]['n_cases'] if records else 0} train cases"
    atomic_write_text(job_dir / "calibration.md", markdown(frame, title, winner, runner_up, layers, trace_info, settings))
    save_figure(figure(records, points, knob, aie, trace_info, winner, title), job_dir / "calibration")
    if winner is not None:
        name = f"{editor}_{model}.yaml"
        atomic_write_text(job_dir / name, editor_model_yaml(winner, runner_up, base_config, job_dir, len(records), settings))
        files.append(name)
    if (job_dir / "trace").is_dir():
        files.append("trace/")
    brief = ("point", "label", "values", "score", *RATES, "locality_drop", "fluency_drop", "collapse_rate")
    return {"editor": editor, "model": model, "n_points": len(records), "n_eligible": len(order),
            "n_cases": records[0]["n_cases"] if records else 0, "knob": knob,
            "winner": {k: winner[k] for k in brief} if winner else None,
            "runner_up": {k: runner_up[k] for k in brief} if runner_up else None,
            "yaml": f"{editor}_{model}.yaml" if winner else None, "trace": trace_info, **layers, "files": files}


# -- the knob on the x axis -----------------------------------------------------------------------------
def x_knob(points: Sequence[GridPoint]) -> str:
    """``layers`` if it varies, else the first knob that varies (else the first knob)."""
    keys = list(points[0].values) if points else []
    varying = [k for k in keys if len({format_value(p.values[k]) for p in points}) > 1]
    if "layers" in varying:
        return "layers"
    return (varying or keys or [""])[0]


def x_value(values: dict[str, Any], knob: str) -> Any:
    """A point's position on the knob's axis: the last layer of a layer list (a MEMIT window's end)."""
    value = values.get(knob)
    return max(value) if knob == "layers" and isinstance(value, list) and value else value


def _others(values: dict[str, Any], knob: str) -> str:
    return " ".join(f"{k}={format_value(v)}" for k, v in values.items() if k != knob)


def _tracing_vs_editing(records: list[dict[str, Any]], aie: Optional[list[float]], knob: str) -> dict[str, Any]:
    """Where the MLP AIE peaks, where editing scores best, and how well the one ranks the other."""
    out: dict[str, Any] = {"aie_peak_layer": None, "best_layer": None, "best_eligible_layer": None, "spearman_aie_score": None}
    if knob != "layers":
        return out
    if aie is not None:
        out["aie_peak_layer"] = peak(dict(enumerate(aie)))
        rho = spearman([r["mlp_aie"] for r in records], [r["score"] for r in records])
        out["spearman_aie_score"] = None if math.isnan(rho) else round(rho, 4)
    best = [r for r in records if not math.isnan(r["score"])]
    if best:
        out["best_layer"] = max(best, key=lambda r: r["score"])["x"]
    eligible = [r for r in records if r["rank"] is not None]
    if eligible:
        out["best_eligible_layer"] = min(eligible, key=lambda r: r["rank"])["x"]
    return out


# -- table ----------------------------------------------------------------------------------------------
COLUMNS = ("reliability", "generality", "locality", "score", "locality_pre", "locality_drop", "fluency_pre", "fluency",
           "fluency_drop", "nll_pre", "nll", "collapse_rate", "eligible", "ineligible", "rank", "mlp_aie", "n_cases",
           "seconds_per_edit", "seconds")


def table(records: list[dict[str, Any]], points: Sequence[GridPoint]) -> pd.DataFrame:
    knobs = list(points[0].values) if points else []
    rows = [{"point": r["point"], "label": r["label"], **{k: format_value(r["values"][k]) for k in knobs},
             **{c: r.get(c) for c in COLUMNS}} for r in records]
    frame = pd.DataFrame(rows)
    frame["rank"] = frame["rank"].astype("Int64")  # eligible points only: an integer column with gaps
    return frame


def _num(value: Any, fmt: str = ".3f") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return format(value, fmt)


def _summary_line(record: dict[str, Any]) -> str:
    return (f"`{record['label']}`: harmonic mean {_num(record['score'])} (reliability {_num(record['reliability'])}, "
            f"generality {_num(record['generality'])}, locality {_num(record['locality'])}; fluency "
            f"{_num(-record['fluency_drop'], '+.1%')}, collapsed {_num(record['collapse_rate'], '.0%')})")


def markdown(frame: pd.DataFrame, title: str, winner: Optional[dict], runner_up: Optional[dict], layers: dict[str, Any],
             trace_info: dict[str, Any], settings: CalibrateStageConfig) -> str:
    lines = [f"# Calibration: {title}", "",
             f"Entity edits of CounterFact's `{settings.dataset.split}` split (never the evaluation cases), scored as "
             "`stage=edit` scores them: reliability (efficacy), generality (paraphrase), locality (neighbourhood, "
             "post-edit; *drop* = unedited minus edited). HM = their harmonic mean. A point is eligible when its mean "
             f"fluency fell by at most {settings.max_fluency_drop:.0%} and at most {settings.max_collapse_rate:.0%} of "
             "its edits collapsed; the winner is the eligible point with the largest HM (ties: grid order).", "",
             "| point | rel | gen | loc | loc drop | HM | fluency Δ | collapsed | MLP AIE | rank | eligible |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in frame.to_dict("records"):
        lines.append(f"| `{row['label']}` | {_num(row['reliability'])} | {_num(row['generality'])} | {_num(row['locality'])} "
                     f"| {_num(row['locality_drop'], '+.3f')} | **{_num(row['score'])}** | {_num(-row['fluency_drop'], '+.1%')} "
                     f"| {_num(row['collapse_rate'], '.0%')} | {_num(row['mlp_aie'], '.4f')} | {'—' if pd.isna(row['rank']) else row['rank']} "
                     f"| {'yes' if row['eligible'] else 'no: ' + row['ineligible']} |")
    lines += ["", f"**Winner:** {_summary_line(winner)}" if winner else
              "**No eligible point:** every point failed the fluency floor; widen the grid or lower the clamp / step size.",
              ""]
    if runner_up:
        lines += [f"**Runner-up:** {_summary_line(runner_up)}", ""]
    lines += _tracing_lines(layers, trace_info)
    return "\n".join(lines) + "\n"


def _tracing_lines(layers: dict[str, Any], trace_info: dict[str, Any]) -> list[str]:
    lines = ["## Does the tracing peak predict the best edit layer?", ""]
    if trace_info.get("source") is None:
        return lines + [f"No MLP trace: {trace_info.get('why_none', 'the layer is not a searched knob')}.", ""]
    if layers["aie_peak_layer"] is None:
        return lines + ["The layer is not a searched knob here; see the trace job for the AIE.", ""]
    peak_layer, best = layers["aie_peak_layer"], layers["best_eligible_layer"]
    verdict = ("no eligible point to compare" if best is None else
               "yes: the best eligible edit layer is the AIE peak" if best == peak_layer else
               f"no: the best eligible edit layer is {best}, {abs(best - peak_layer)} layer(s) from the peak")
    rho = layers["spearman_aie_score"]
    return lines + [
        f"MLP AIE ({role_label(trace_info['role'])}, from {trace_info['source']}) peaks at layer "
        f"{peak_layer}; the best HM of any point is at layer {layers['best_layer']}. Verdict: {verdict}. Spearman "
        f"rank correlation of AIE (at each point's last edited layer) with HM over the points: "
        f"{'—' if rho is None else f'{rho:+.2f}'} (Hase et al. 2023 found tracing does not predict where editing works).", ""]


def role_label(role: str) -> str:
    from tracing.spans import ROLE_LABELS

    return ROLE_LABELS["entity"].get(role, role.replace("_", " "))


# -- figure ---------------------------------------------------------------------------------------------
def figure(records: list[dict[str, Any]], points: Sequence[GridPoint], knob: str, aie: Optional[list[float]],
           trace_info: dict[str, Any], winner: Optional[dict], title: str) -> Figure:
    groups: dict[str, list[dict[str, Any]]] = {}
    for record in records:
        groups.setdefault(_others(record["values"], knob), []).append(record)
    fig = Figure(figsize=(max(6.0, 4.6 * len(groups)), 4.2), layout="constrained")
    numeric = knob == "layers"
    legend: dict[str, Any] = {}
    for i, (others, group) in enumerate(groups.items()):
        ax = fig.add_subplot(1, len(groups), i + 1)
        xs = [r["x"] for r in group] if numeric else list(range(len(group)))
        for metric, colour in LINES.items():
            ax.plot(xs, [r[metric] for r in group], marker="o", color=colour, label="harmonic mean" if metric == "score" else metric,
                    linewidth=2.2 if metric == "score" else 1.2)
        ax.plot(xs, [1 - r["fluency_drop"] for r in group], linestyle="--", color="grey", label="fluency post/pre")
        bad = [(x, r["score"]) for x, r in zip(xs, group) if not r["eligible"]]
        if bad:
            ax.scatter(*zip(*bad), marker="x", s=80, color="red", zorder=5, label="ineligible")
        if winner is not None and winner in group:
            ax.axvline(xs[group.index(winner)], color="black", linestyle=":", label="winner")
        ax.set_ylim(-0.02, max(1.1, *(1.05 - r["fluency_drop"] for r in group if math.isfinite(r["fluency_drop"]))))
        ax.set_xlabel("last edited layer" if numeric else knob)
        if not numeric:
            ax.set_xticks(xs, [format_value(r["x"]) for r in group])
        ax.set_title(others or title, fontsize=9)
        if numeric:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if numeric and aie is not None:
            twin = ax.twinx()
            twin.plot(range(len(aie)), aie, color="tab:purple", alpha=0.7, label="MLP AIE (right axis)")
            twin.fill_between(range(len(aie)), 0, aie, color="tab:purple", alpha=0.12)
            top = peak(dict(enumerate(aie)))
            if top is not None:
                twin.axvline(top, color="tab:purple", linestyle="--", linewidth=1, label="AIE peak")
            twin.set_ylabel(f"MLP AIE ({role_label(trace_info['role'])})", color="tab:purple")
        for axis in fig.axes[-2:] if numeric and aie is not None else [ax]:
            for handle, label in zip(*axis.get_legend_handles_labels()):
                legend.setdefault(label, handle)
    fig.legend(list(legend.values()), list(legend), fontsize=7, loc="outside lower center", ncol=5)
    fig.suptitle(title, fontsize=10)
    return fig


# -- the winner's editor_model yaml -----------------------------------------------------------------------
def editor_model_yaml(winner: dict[str, Any], runner_up: Optional[dict[str, Any]], base_config: Optional[Path], job_dir: Path,
                      n_points: int, settings: CalibrateStageConfig) -> str:
    """``conf/editor_model/<editor>_<model>.yaml``: the existing file's keys with the winning values, a comment citing the evidence."""
    values = yaml.safe_load(base_config.read_text()) if base_config is not None else {}
    values = values or {}
    values.pop("defaults", None)
    for key, value in winner["values"].items():
        node = values
        *parents, leaf = key.split(".")
        for parent in parents:
            node = node.setdefault(parent, {})
        node[leaf] = value
    comment = [
        "# @package editor",
        f"# Calibrated by stage=calibrate in {job_dir} (calibration.md, calibration.png there):",
        f"# N={winner['n_cases']} CounterFact {settings.dataset.split} cases (not the evaluation split), entity edits, "
        f"{n_points} grid points; winner = the largest",
        "# harmonic mean (HM) of reliability, generality and locality among points whose mean fluency fell by at most "
        f"{settings.max_fluency_drop:.0%}",
        f"# and with at most {settings.max_collapse_rate:.0%} of edits collapsed.",
        "# Winner:    " + _summary_line(winner).replace("`", ""),
    ]
    comment.append("# Runner-up: " + (_summary_line(runner_up).replace("`", "") if runner_up is not None else
                                      "none eligible (calibration.md lists why each point failed)"))
    if base_config is not None:
        comment.append(f"# Other keys as in conf/editor_model/{base_config.name} when it was calibrated "
                       "(the calibration's own editor settings: config.yaml there).")
    return "\n".join(comment) + "\n" + yaml.dump(values, Dumper=_ConfDumper, sort_keys=False, default_flow_style=False)


class _ConfDumper(yaml.SafeDumper):
    """The hand-written files' style: lists inline (``layers: [6]``), mappings as blocks."""


_ConfDumper.add_representer(list, lambda dumper, data: dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=True))
