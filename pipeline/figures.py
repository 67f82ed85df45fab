"""The paper's artefacts from finished pipeline jobs: trace figures, the severed figure, the editing table.

Reads job dirs of a sweep (``results.json`` done-markers, never half-finished jobs) and writes into
one folder per model (``outputs/figures/<model>/``), atomically:

- ``trace_<perspective>_{roles,curves}.{png,pdf}``, ``trace_<perspective>_aie.csv`` (AIE by role and
  layer with bootstrap bounds, every score name), ``trace_<perspective>.json`` (model, layers,
  facts, p_clean / p_corrupted, settings) and, from jobs that keep it, ``trace_<perspective>_per_fact.
  {safetensors,json}`` (each fact's AIE by layer at the last corrupted token: ``pipeline.paired``).
  ``--relation-span phrase`` picks the relation job traced with ``perspective.relation_span=phrase``
  and writes ``trace_relation_phrase_*``;
- ``severed.{png,pdf}``: hidden-state AIE at the last corrupted token with nothing / MLP / attention
  severed, one panel per perspective;
- ``knockout.{png,pdf}``, ``knockout.csv``, ``knockout.json``: attention knockout (Geva et al. 2023),
  the relative drop in p(answer) when the last token cannot attend to the subject / relation / last
  token over a window of layers, one panel per source set, a curve per perspective with bootstrap
  bands (the source sets do not depend on the perspective, so the curves differ only if the jobs
  traced different facts or relation spans);
- ``table_editing.{md,csv}``: editor x edit perspective x side x metric, pre -> post with intervals;
- ``editing.{png,pdf}``: per editor, edit perspective x evaluated side, pre -> post bars with
  intervals and the relation side's strict top-1 (``metrics.plots``).

    python -m pipeline.figures trace --sweep-dir outputs/sweeps/<s> --perspective entity --out outputs/figures/<m>
    python -m pipeline.figures trace --sweep-dir outputs/sweeps/<s> --perspective relation --relation-span phrase --out ...
    python -m pipeline.figures severed --sweep-dir outputs/sweeps/<s> --out outputs/figures/<m>
    python -m pipeline.figures knockout --sweep-dir outputs/sweeps/<s> --out outputs/figures/<m>
    python -m pipeline.figures table --sweep-dir outputs/sweeps/<s> --out outputs/figures/<m>

The Makefile's ``fig-*`` / ``table-editing`` targets run the pipeline jobs and then these commands.
"""

from __future__ import annotations

import argparse
import logging
import shutil
from pathlib import Path
from typing import Optional, Sequence

import pandas as pd
from matplotlib.figure import Figure

from core.errors import ConfigError, DataError
from core.io import atomic_path, atomic_write_json, atomic_write_text, load_tensors, read_json
from metrics.plots import plot_editing
from pipeline.jobs import finished_steps
from pipeline.paired import trace_stem
from pipeline.stages.trace import PER_FACT
from tracing import severed_key
from tracing.aggregate import KNOCKOUT, RoleAIE
from tracing.plots import plot_aie_curves, plot_knockout, plot_role_heatmaps, plot_severed, save_figure, titled

log = logging.getLogger(__name__)

KINDS = ("hidden", "mlp", "attn")
SEVERED = ("hidden", severed_key("mlp"), severed_key("attn"))
RELATION_SPANS = ("template", "phrase")


def trace_job(sweep_dir: Path, perspective: str, relation_span: str = "template", kinds: Sequence[str] | None = None) -> Path:
    """The finished ``stage=trace`` job of ``perspective`` (relation: of ``relation_span``) in the sweep that
    traced any of ``kinds`` (if given), with the most traced facts, the newest among equals (a quick check
    never hides the full run)."""
    jobs = [(job_dir, results) for job_dir, _, results in finished_steps(sweep_dir, "trace", include_full=False)
            if results.get("perspective") == perspective
            and (perspective != "relation" or results.get("relation_span", "template") == relation_span)
            and (kinds is None or set(kinds) & set(results.get("settings", {}).get("kinds", [])))]
    if not jobs:
        knockout = kinds is not None and KNOCKOUT in kinds
        span = f" perspective.relation_span={relation_span}" if perspective == "relation" else ""
        target = "fig-knockout" if knockout else f"fig-trace-{perspective}"
        command = f"python -m pipeline.run stage=trace perspective={perspective}{span}"
        command += " 'stage.kinds=[knockout]'" if knockout else ""
        raise DataError("sweep_dir", str(sweep_dir), f"holds no finished trace job for perspective={perspective}{span}"
                        + (f" tracing any of {', '.join(kinds)}" if kinds else ""), hint=f"run: make {target} (or {command})")
    jobs.sort(key=lambda job: (job[1].get("n_traced", 0), (job[0] / "results.json").stat().st_mtime), reverse=True)
    if len(jobs) > 1:
        log.warning("%d trace jobs for %s in %s; using the one with the most facts, %s", len(jobs), perspective,
                    sweep_dir, jobs[0][0].name)
    return jobs[0][0]


def job_aggregates(job_dir: Path) -> tuple[dict[str, RoleAIE], dict]:
    """A trace job's AIE aggregates, as the job stored them (``aie.safetensors``), and its summary."""
    import yaml

    path = job_dir / "aie.safetensors"
    if not path.exists():
        raise DataError("job_dir", str(job_dir), "has no aie.safetensors", hint="rerun the trace job with force=true")
    tensors = load_tensors(path)
    summary = read_json(job_dir / "results.json")["results"]
    confidence = float(yaml.safe_load((job_dir / "config.yaml").read_text())["stage"]["confidence"])
    names = sorted({key.rsplit(".", 1)[0] for key in tensors})
    aggregates = {name: RoleAIE.from_tensors(tensors, name, summary["perspective"], summary["n_traced"], summary["p_clean"],
                                             summary["p_corrupted"], confidence) for name in names}
    meta = {"model": summary["model"], "n_layers": int(tensors[f"{names[0]}.mean"].shape[1]),
            "n_facts": summary["n_traced"], "p_clean": summary["p_clean"], "p_corrupted": summary["p_corrupted"],
            "perspective": summary["perspective"], "relation_span": summary.get("relation_span"),
            "settings": summary["settings"], "sample": summary.get("sample"), "job": str(job_dir)}
    return aggregates, meta


def write_trace(sweep_dir: Path, perspective: str, out: Path, relation_span: str = "template") -> list[Path]:
    job = trace_job(sweep_dir, perspective, relation_span, KINDS)  # not a knockout-only job
    aggregates, meta = job_aggregates(job)
    kinds = [aggregates[name] for name in KINDS if name in aggregates]
    name = trace_stem(perspective, relation_span)
    stem = out / name
    paths = (save_figure(plot_role_heatmaps(kinds, model=meta["model"]), f"{stem}_roles")
             + save_figure(plot_aie_curves(kinds, model=meta["model"]), f"{stem}_curves"))
    rows = [row for agg in aggregates.values() for row in agg.rows()]
    paths.append(atomic_write_text(out / f"{name}_aie.csv", pd.DataFrame(rows).to_csv(index=False)))
    paths.append(atomic_write_json(out / f"{name}.json", meta))
    if (job / f"{PER_FACT}.safetensors").exists():
        paths += [_copy(job / f"{PER_FACT}.{ext}", out / f"{name}_{PER_FACT}.{ext}") for ext in ("safetensors", "json")]
    else:  # an older job: the report falls back to marginal intervals for it
        log.warning("%s has no %s.safetensors (traced by an older version): no paired statistics for it", job, PER_FACT)
        for ext in ("safetensors", "json"):
            (out / f"{name}_{PER_FACT}.{ext}").unlink(missing_ok=True)
    return paths


def _copy(source: Path, target: Path) -> Path:
    with atomic_path(target) as temp:
        shutil.copyfile(source, temp)
    return target


def write_severed(sweep_dir: Path, out: Path, perspectives: Sequence[str] = ("entity", "relation")) -> list[Path]:
    """One panel per perspective; the relation panel is the ``relation_span=template`` job's."""
    panels, models = [], set()
    for perspective in perspectives:
        aggregates, meta = job_aggregates(trace_job(sweep_dir, perspective, kinds=("hidden",)))
        present = {name: aggregates[name] for name in SEVERED if name in aggregates}
        if len(present) < 2:
            raise DataError("stage.severed", False, f"the {perspective} trace job has no severed traces",
                            hint="rerun it with stage.severed=true (make fig-severed does)")
        panels.append(present)
        models.add(meta["model"])
    figure = Figure(figsize=(6.0 * len(panels), 3.8), layout="constrained")
    for i, present in enumerate(panels):
        plot_severed(present, ax=figure.add_subplot(1, len(panels), i + 1))
    figure.suptitle(titled("hidden-state AIE with later MLP / attention severed", " / ".join(sorted(models))), fontsize=10)
    return save_figure(figure, out / "severed")


def write_knockout(sweep_dir: Path, out: Path, perspectives: Sequence[str] = ("entity", "relation")) -> list[Path]:
    """The knockout figure from the newest knockout trace job of each perspective (at least one needed)."""
    found, metas, missing = [], [], []
    for perspective in perspectives:
        try:
            aggregates, meta = job_aggregates(trace_job(sweep_dir, perspective, kinds=(KNOCKOUT,)))
        except DataError as err:
            missing.append(err)
            continue
        found.append(aggregates[KNOCKOUT])
        metas.append(meta)
    if not found:
        raise missing[0]
    for err in missing:
        log.warning("knockout figure without a perspective: %s", err)
    model = " / ".join(sorted({meta["model"] for meta in metas}))
    paths = save_figure(plot_knockout(found, window=metas[0]["settings"]["window"], model=model), out / "knockout")
    rows = [row for agg in found for row in agg.rows()]
    paths.append(atomic_write_text(out / "knockout.csv", pd.DataFrame(rows).to_csv(index=False)))
    paths.append(atomic_write_json(out / "knockout.json", {meta["perspective"]: meta for meta in metas}))
    return paths


def write_table(sweep_dir: Path, out: Path) -> list[Path]:
    from pipeline.stages.summarize import collect, markdown

    frame = collect(sweep_dir)
    if frame.empty:
        raise DataError("sweep_dir", str(sweep_dir), "holds no finished edit jobs", hint="run: make table-editing")
    metrics = [f"{side}.{metric}" for side in ("entity", "relation") for metric in ("reliability", "generality", "locality")]
    metrics += ["relation.top1"]
    paths = [atomic_write_text(out / "table_editing.csv", frame.to_csv(index=False)),
             atomic_write_text(out / "table_editing.md", markdown(frame, metrics))]
    for model, rows in frame.groupby("model"):
        stem = "editing" if frame["model"].nunique() == 1 else f"editing_{model}"
        paths += save_figure(plot_editing(rows), out / stem)
    return paths


def main(argv: Optional[Sequence[str]] = None) -> list[Path]:
    parser = argparse.ArgumentParser(description="Draw the paper's figures and tables from finished pipeline jobs.")
    parser.add_argument("artefact", choices=("trace", "severed", "knockout", "table"))
    parser.add_argument("--sweep-dir", required=True, type=Path)
    parser.add_argument("--out", required=True, type=Path, help="e.g. outputs/figures/<model>")
    parser.add_argument("--perspective", choices=("entity", "relation"), help="for trace")
    parser.add_argument("--relation-span", choices=RELATION_SPANS, default="template",
                        help="for trace --perspective relation: the job traced with this perspective.relation_span")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(name)s][%(levelname)s] - %(message)s")
    if not args.sweep_dir.is_dir():
        raise ConfigError("--sweep-dir", str(args.sweep_dir), "not a directory", hint="run the make target's pipeline jobs first")
    args.out.mkdir(parents=True, exist_ok=True)
    if args.artefact == "trace":
        if args.perspective is None:
            raise ConfigError("--perspective", None, "trace needs a perspective", hint="--perspective entity or relation")
        paths = write_trace(args.sweep_dir, args.perspective, args.out, args.relation_span)
    elif args.artefact == "severed":
        paths = write_severed(args.sweep_dir, args.out)
    elif args.artefact == "knockout":
        paths = write_knockout(args.sweep_dir, args.out)
    else:
        paths = write_table(args.sweep_dir, args.out)
    for path in paths:
        print(path)
    return paths


if __name__ == "__main__":
    main()
