"""One markdown report per model: our traces and edits next to the paper's GPT-2 XL numbers, and a
verdict per claim of the paper.

Inputs are the files under ``outputs/figures/<model>/`` (see ``INPUTS``); any may be missing, and the
report then names the make target that produces it instead of failing. Claims are pure functions of
the frames, so tests can hand them synthetic data.

Layer bands, as fractions of ``n_layers``: lower ``l < n/3``, middle ``n/3 <= l < 2n/3``, upper
``l >= 2n/3``. The tracing claims are decided per fact (``pipeline.paired``: paired differences with
bootstrap intervals and the minimum detectable effect) from the per-fact files of ``make study``
(``<figures-dir>/study/``) or, failing those, of ``make fig-trace-*``. Traces without per-fact data
(older jobs) fall back, with a note, to marginal 95% intervals: a band claim is ``supported`` when
the peak layer lies in the claimed bands, its interval excludes 0, and it lies above the interval of
the best layer outside those bands (``not supported``: the same, with the peak outside); anything
in between, or fewer than ``MIN_FACTS`` facts, is ``inconclusive``. Edit claims: see ``transfer_claim``.

    python -m pipeline.report --figures-dir outputs/figures/<model> --out outputs/reports/<model>/report.md
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path
from typing import Optional, Sequence

import pandas as pd

from core.errors import ConfigError, DataError
from core.io import atomic_write_text, read_json
from metrics.paper import PAPER_CLAIMS, PAPER_EDITING, PAPER_MODEL, PAPER_SOURCE
from pipeline.paired import (INCONCLUSIVE, N_RESAMPLES, NOT_SUPPORTED, SEED, SUPPORTED, UPPER_START, VARIANT_LABELS,
                             VARIANTS, Claim, band, has_per_fact, load_variants, method_note, paired_claims,
                             statistics_table)

log = logging.getLogger(__name__)

MIN_FACTS = 10  # marginal fallback: fewer traced facts than this are not worth a verdict
MIN_CASES = 10  # likewise for edit cases
STUDY = "study"  # make study's figures: <figures-dir>/study/
TRANSFER_SHARE = 0.5  # "comparable" transfer: the other side closes at least half the share of its headroom
PERSPECTIVES = ("entity", "relation")
ROLE = "last_corrupted"  # last subject token (entity) / last relation token (relation)
EDIT_METRICS = ("reliability", "generality", "locality", "removal", "top1", "score")

# file -> make target that writes it
INPUTS: dict[str, str] = {
    **{f"trace_{p}{suffix}": f"fig-trace-{p}" for p in PERSPECTIVES
       for suffix in ("_aie.csv", ".json", "_roles.png", "_curves.png")},
    "severed.png": "fig-severed",
    "table_editing.csv": "table-editing",
}
TRACE_COLUMNS = {"name", "perspective", "role", "layer", "aie", "low", "high", "tokens", "n_facts"}
EDIT_COLUMNS = {"job", "editor", "perspective", "n_cases", "side", "metric", "stage", "mean", "low", "high", "n"}


def curve(trace: pd.DataFrame, name: str, role: str = ROLE) -> pd.DataFrame:
    """One AIE curve over layers; empty roles (``tokens == 0``) and NaN rows dropped."""
    rows = trace[(trace["name"] == name) & (trace["role"] == role) & (trace["tokens"] > 0)]
    return rows.dropna(subset=["aie"]).sort_values("layer")


def _ci(row: pd.Series) -> str:
    return f"{row['aie']:.3g} [{row['low']:.3g}, {row['high']:.3g}]"


def peak_claim(key: str, trace: pd.DataFrame, n_layers: int, name: str, bands: Sequence[str], what: str,
               role: str = ROLE) -> Claim:
    """Does the peak of ``name``'s AIE at ``role`` lie in ``bands``, separated from the best layer elsewhere?"""
    c = curve(trace, name, role)
    if c.empty:
        return Claim(key, INCONCLUSIVE, f"{what}: no {name} trace at the {role} role.")
    peak = c.loc[c["aie"].idxmax()]
    layer, n_facts = int(peak["layer"]), int(c["n_facts"].max())
    inside = c["layer"].map(lambda l: band(int(l), n_layers) in bands)
    peak_in = band(layer, n_layers) in bands
    rivals = c[~inside] if peak_in else c[inside]
    rival = rivals.loc[rivals["aie"].idxmax()] if not rivals.empty else None
    where = "/".join(bands)
    text = (f"peak {name} AIE at the {role.replace('_', ' ')} role is {_ci(peak)} at layer {layer} of {n_layers} "
            f"({band(layer, n_layers)})")
    if rival is not None:
        text += f"; best layer {'outside' if peak_in else 'inside'} {where}: {int(rival['layer'])}, {_ci(rival)}"
    if n_facts < MIN_FACTS:
        verdict, why = INCONCLUSIVE, f"only {n_facts} facts, fewer than {MIN_FACTS}"
    elif not peak["low"] > 0:
        verdict, why = INCONCLUSIVE, "the peak's interval includes 0"
    elif rival is not None and rival["high"] >= peak["low"]:
        verdict, why = INCONCLUSIVE, "the two intervals overlap"
    else:
        verdict, why = (SUPPORTED if peak_in else NOT_SUPPORTED), f"{n_facts} facts"
    return Claim(key, verdict, f"{what}: {text} ({why}).")


def severed_claim(key: str, trace: pd.DataFrame, n_layers: int, severed: str, what: str, role: str = ROLE) -> Claim:
    """Does severing ``severed`` (mlp/attn) lower the hidden-state AIE at its peak below the upper band?

    ROME's severed analysis: the drop shows where the hidden state is restored before the module's
    contribution is complete, so the comparison is at the hidden peak among lower/middle layers.
    """
    hidden, cut = curve(trace, "hidden", role), curve(trace, f"hidden_severed_{severed}", role)
    if cut.empty:
        return Claim(key, INCONCLUSIVE, f"{what}: no severed trace (run `make fig-severed`).")
    region = hidden[hidden["layer"] < UPPER_START * n_layers]
    if region.empty:
        return Claim(key, INCONCLUSIVE, f"{what}: no hidden-state trace below the upper layers.")
    at = region.loc[region["aie"].idxmax()]
    cut_rows = cut[cut["layer"] == at["layer"]]
    if cut_rows.empty:
        return Claim(key, INCONCLUSIVE, f"{what}: no severed value at layer {int(at['layer'])}.")
    cut_at, n_facts = cut_rows.iloc[0], int(hidden["n_facts"].max())
    text = (f"at layer {int(at['layer'])} the hidden-state AIE is {_ci(at)} and {_ci(cut_at)} with {severed} severed")
    if n_facts < MIN_FACTS:
        verdict, why = INCONCLUSIVE, f"only {n_facts} facts, fewer than {MIN_FACTS}"
    elif cut_at["high"] < at["low"]:
        verdict, why = SUPPORTED, f"{n_facts} facts"
    elif cut_at["aie"] >= at["aie"]:
        verdict, why = NOT_SUPPORTED, "no drop"
    else:
        verdict, why = INCONCLUSIVE, "the intervals overlap"
    return Claim(key, verdict, f"{what}: {text} ({why}).")


def select_jobs(editing: pd.DataFrame) -> pd.DataFrame:
    """Per (editor, perspective), the rows of the job with the most cases (reruns with more cases win)."""
    best = editing.sort_values("n_cases").groupby(["editor", "perspective"])["job"].last()
    return editing[editing["job"].isin(set(best))]


def _estimate(editing: pd.DataFrame, editor: str, perspective: str, side: str, metric: str,
              stage: str) -> Optional[pd.Series]:
    rows = editing[(editing["editor"] == editor) & (editing["perspective"] == perspective) & (editing["side"] == side)
                   & (editing["metric"] == metric) & (editing["stage"] == stage)]
    return None if rows.empty else rows.iloc[0]


def _pct(row: Optional[pd.Series], ci: bool = True) -> str:
    if row is None or pd.isna(row["mean"]):
        return "—"
    text = f"{100 * row['mean']:.1f}"
    return text + (f" [{100 * row['low']:.1f}, {100 * row['high']:.1f}]" if ci and not pd.isna(row["low"]) else "")


def transfer_claim(editing: pd.DataFrame, editor: str, perspective: str, metric: str = "reliability") -> Claim:
    """An edit from ``perspective`` raises its own side, and the other side closes (at its 95% upper bound)
    less than ``TRANSFER_SHARE`` of the headroom share the own side closed."""
    other = "relation" if perspective == "entity" else "entity"
    key, what = f"transfer_{editor}_{perspective}", f"{editor.upper()} {perspective} edits do not carry over to the {other} side"
    pre_own, post_own, pre_other, post_other = (_estimate(editing, editor, perspective, side, metric, stage)
                                                for side in (perspective, other) for stage in ("pre", "post"))
    if any(row is None for row in (pre_own, post_own, pre_other, post_other)):
        return Claim(key, INCONCLUSIVE, f"{what}: the {metric} rows of one side are missing.")
    # Normalised gain: the share of its headroom (1 - pre) that a side closes, so a side that starts near
    # 100% is not read as "not carried over" merely because it cannot rise much.
    closed = (post_own["mean"] - pre_own["mean"]) / max(1e-9, 1 - pre_own["mean"])
    bar = pre_other["mean"] + TRANSFER_SHARE * closed * (1 - pre_other["mean"])
    paper = [PAPER_EDITING.get(metric, {}).get((editor, perspective, side)) for side in (perspective, other)]
    text = (f"{metric} {perspective} side {_pct(pre_own, False)} → {_pct(post_own)}, {other} side "
            f"{_pct(pre_other, False)} → {_pct(post_other)} (bar: {100 * bar:.1f})")
    if None not in paper:
        text += f"; paper, {PAPER_MODEL}, post-edit: {perspective} side {paper[0]:g}, {other} side {paper[1]:g}"
    n = int(min(post_own["n"], post_other["n"]))
    if n < MIN_CASES:
        verdict, why = INCONCLUSIVE, f"only {n} cases, fewer than {MIN_CASES}"
    elif not post_own["low"] > pre_own["mean"]:
        verdict, why = INCONCLUSIVE, "the edit did not take on its own side"
    elif post_other["high"] < bar:
        verdict, why = SUPPORTED, f"{n} cases"
    elif post_other["low"] >= bar:
        verdict, why = NOT_SUPPORTED, f"{n} cases"
    else:
        verdict, why = INCONCLUSIVE, "the interval straddles the bar"
    return Claim(key, verdict, f"{what}: {text} ({why}).")


def evaluate_claims(traces: dict[str, tuple[pd.DataFrame, int]], editing: Optional[pd.DataFrame],
                    paired: Optional[list[Claim]] = None) -> list[Claim]:
    """All claims; ``traces`` maps perspective -> (AIE frame, n_layers) for the perspectives present.

    ``paired``: the tracing claims decided per fact (``pipeline.paired.paired_claims``); without them
    the tracing claims fall back to the marginal intervals of ``traces``.
    """
    claims: list[Claim] = list(paired) if paired is not None else marginal_claims(traces)
    if editing is not None:
        for editor, perspective in sorted(set(zip(editing["editor"], editing["perspective"]))):
            claims.append(transfer_claim(editing, editor, perspective))
    return claims


def marginal_claims(traces: dict[str, tuple[pd.DataFrame, int]]) -> list[Claim]:
    """The tracing claims from marginal intervals (traces without per-fact data)."""
    claims: list[Claim] = []
    specs = [("entity", "entity_mlp", "mlp", ("lower", "middle"), "Entity perspective: the MLP effect sits in lower/middle layers"),
             ("relation", "relation_mlp", "mlp", ("upper",), "Relation perspective: the MLP effect sits in upper layers"),
             ("relation", "relation_attn", "attn", ("middle", "upper"), "Relation perspective: attention has its effect in middle-to-upper layers")]
    for perspective, key, name, bands, what in specs:
        if perspective in traces:
            claims.append(peak_claim(key, *traces[perspective], name, bands, what))
        else:
            claims.append(Claim(key, INCONCLUSIVE, f"{what}: no trace (run `make fig-trace-{perspective}`)."))
    for perspective, severed, what in [("entity", "mlp", "Entity perspective: severing the MLPs lowers the hidden-state effect (ROME)"),
                                       ("relation", "attn", "Relation perspective: severing attention lowers the hidden-state effect")]:
        if perspective in traces:
            claims.append(severed_claim(f"{perspective}_severed_{severed}", *traces[perspective], severed, what))
    return claims


def _read_csv(path: Path, columns: set[str]) -> pd.DataFrame:
    frame = pd.read_csv(path)
    missing = sorted(columns - set(frame.columns))
    if missing:
        raise DataError(str(path), missing, "columns missing", f"regenerate it with `make {INPUTS[path.name]}`")
    return frame


def _trace_section(perspective: str, frame: pd.DataFrame, meta: dict, n_layers: int) -> list[str]:
    lines = [f"### {perspective} perspective", ""]
    if meta:
        lines.append(f"{meta.get('n_facts', '?')} facts, {n_layers} layers; p(clean) {meta.get('p_clean', float('nan')):.3g}, "
                     f"p(corrupted) {meta.get('p_corrupted', float('nan')):.3g}; settings `{json.dumps(meta.get('settings', {}))}`.")
        lines.append("")
    lines += ["| kind | role | peak layer | peak AIE [95% CI] | mean AIE over layers |", "|---|---|---|---|---|"]
    for name, role in frame[["name", "role"]].drop_duplicates().itertuples(index=False):
        c = curve(frame, name, role)
        if c.empty or role not in (ROLE, "last"):
            continue
        peak = c.loc[c["aie"].idxmax()]
        lines.append(f"| {name} | {role} | {int(peak['layer'])} ({band(int(peak['layer']), n_layers)}) | {_ci(peak)} | "
                     f"{c['aie'].mean():.3g} |")
    return lines + [""]


def _editing_section(editing: pd.DataFrame) -> list[str]:
    lines = ["| editor | edit perspective | side | metric | ours pre | ours post [95% CI] | n | paper GPT-2 XL |",
             "|---|---|---|---|---|---|---|---|"]
    for (editor, perspective), _ in editing.groupby(["editor", "perspective"]):
        for side in PERSPECTIVES:
            for metric in EDIT_METRICS:
                pre = _estimate(editing, editor, perspective, side, metric, "pre")
                post = _estimate(editing, editor, perspective, side, metric, "post")
                if pre is None and post is None:
                    continue
                paper = PAPER_EDITING.get(metric, {}).get((editor, perspective, side))
                n = int((post if post is not None else pre)["n"])
                lines.append(f"| {editor} | {perspective} | {side} | {metric} | {_pct(pre)} | {_pct(post)} | {n} | "
                             f"{'' if paper is None else f'{paper:g}'} |")
    return lines + ["", "Ours: % of cases, 95% bootstrap intervals. Paper: post-edit % only (no pre-edit baselines), "
                    f"reliability and generality; no locality was found. Source: {PAPER_SOURCE}.", ""]


def render_report(figures_dir: str | os.PathLike, model: str, relative_to: str | os.PathLike | None = None,
                  n_resamples: int = N_RESAMPLES, seed: int = SEED) -> str:
    """The report's markdown; figure links are relative to ``relative_to`` (default: ``figures_dir``).

    The tracing verdicts are paired (``pipeline.paired``) from ``<figures_dir>/study/`` when ``make
    study`` wrote it, else from ``figures_dir``'s per-fact files; without any, marginal (with a note).
    """
    figures_dir = Path(figures_dir)
    base = Path(relative_to) if relative_to is not None else figures_dir
    present = {name for name in INPUTS if (figures_dir / name).exists()}
    traces: dict[str, tuple[pd.DataFrame, int]] = {}
    metas: dict[str, dict] = {}
    for p in PERSPECTIVES:
        if f"trace_{p}_aie.csv" in present:
            frame = _read_csv(figures_dir / f"trace_{p}_aie.csv", TRACE_COLUMNS)
            metas[p] = read_json(figures_dir / f"trace_{p}.json") if f"trace_{p}.json" in present else {}
            traces[p] = (frame, int(metas[p].get("n_layers", frame["layer"].max() + 1)))
    editing = select_jobs(_read_csv(figures_dir / "table_editing.csv", EDIT_COLUMNS)) if "table_editing.csv" in present else None
    study = figures_dir / STUDY
    paired_dir = next((d for d in (study, figures_dir) if has_per_fact(d)), None)
    paired, stats = paired_claims(load_variants(paired_dir), n_resamples, seed) if paired_dir else (None, [])
    claims = evaluate_claims(traces, editing, paired)

    def figure(name: str, caption: str, directory: Path = figures_dir) -> list[str]:
        if not (directory / name).exists():
            return []
        rel = Path(os.path.relpath(directory / name, base)).as_posix()
        pdf = rel[:-4] + ".pdf"
        return [f"![{caption}]({rel})", f"{caption} ([pdf]({pdf}))", ""]

    lines = [f"# Knowledge localization report: {model}", "",
             "Paper: Wei et al., *Does Knowledge Localization Hold True? Surprising Differences Between Entity and "
             "Relation Perspectives in Language Models*, CIKM 2024, arXiv 2409.00617.", ""]
    missing = [name for name in INPUTS if name not in present]
    if paired_dir != study:
        missing.append(STUDY)
    if missing:
        lines += ["## Missing inputs", ""] + [f"- `{name}`: run `make {INPUTS.get(name, 'study')}`" for name in missing] + [""]
    lines += ["## Claims", "",
              f"Bands: lower `l < n/3`, middle `n/3 <= l < 2n/3`, upper `l >= 2n/3` of n layers; curves at the "
              f"{ROLE.replace('_', ' ')} role (last subject / last relation token)."]
    if paired is not None:
        lines += [f"Tracing claims: from `{Path(os.path.relpath(paired_dir, base)).as_posix()}/`. " + method_note(n_resamples, seed)]
    else:
        lines += ["Tracing claims: **marginal fallback.** These traces have no per-fact data (made by an older version), "
                  "so the verdicts compare overlapping marginal intervals, which cannot decide a difference; run "
                  "`make study` (or rerun the trace jobs) for paired verdicts. A band claim needs the peak's 95% interval "
                  f"above 0 and above the best layer outside the bands; fewer than {MIN_FACTS} facts: inconclusive."]
    lines += [f"An edit claim needs the own side's post-edit lower bound above its pre-edit mean, and the other side's "
              f"post-edit interval below the bar pre + {TRANSFER_SHARE:g} × g × (1 − pre), g being the share of its "
              f"headroom (1 − pre) the own side closed; fewer than {MIN_CASES} cases: inconclusive.", ""]
    lines += [f"- **{claim.verdict}**: {claim.sentence}" for claim in claims] + [""]
    lines += ["What the paper states (abstract read; band-level wording from the project's summary, not verified "
              "against the paper text):", ""]
    lines += [f"- {c.text} ({c.source})" for c in PAPER_CLAIMS] + [""]
    if paired is not None:
        lines += _study_section(paired_dir, stats, figure)
    lines += ["## Causal tracing", "",
              "The paper's AIE values were not available as numbers; compare the figures with its causal-tracing figures.", ""]
    for p in PERSPECTIVES:
        if p in traces:
            lines += _trace_section(p, traces[p][0], metas[p], traces[p][1])
        lines += figure(f"trace_{p}_roles.png", f"{p} perspective: AIE by token role and layer")
        lines += figure(f"trace_{p}_curves.png", f"{p} perspective: AIE curves with 95% intervals")
    lines += figure("severed.png", "Severed traces: hidden-state AIE with MLP or attention severed")
    if editing is not None:
        lines += ["## Editing, both perspectives, both sides", ""] + _editing_section(editing)
    return "\n".join(lines).rstrip() + "\n"


def _study_section(directory: Path, stats: list, figure) -> list[str]:
    """The paired statistics behind the tracing verdicts, what was traced, and the study's figures."""
    lines = ["## Paired tracing statistics", ""]
    for variant, stem in VARIANTS.items():
        meta_path = directory / f"{stem}.json"
        if meta_path.exists():
            meta = read_json(meta_path)
            settings, sample = meta.get("settings", {}), meta.get("sample")
            drawn = (f"a seeded random sample of {sample['size']} known facts (seed {sample['seed']})" if sample
                     else "the first known facts")
            lines.append(f"- {VARIANT_LABELS[variant]}: {meta.get('n_facts', '?')} facts of {meta.get('model', '?')} "
                         f"({drawn}), {meta.get('n_layers', '?')} layers; {settings.get('samples', '?')} noise samples, "
                         f"window {settings.get('window', '?')}, kinds {', '.join(settings.get('kinds', []))}, severed "
                         f"{', '.join(settings.get('severed', [])) or 'none'}.")
    lines += [""] + statistics_table(stats) + [""]
    for variant, stem in VARIANTS.items():
        lines += figure(f"{stem}_roles.png", f"{VARIANT_LABELS[variant]}: AIE by token role and layer", directory)
    return lines + figure("severed.png", "Severed traces (entity; relation with template tokens)", directory)


def main(argv: Optional[Sequence[str]] = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--figures-dir", required=True, type=Path, help="outputs/figures/<model>")
    parser.add_argument("--out", required=True, type=Path, help="outputs/reports/<model>/report.md")
    parser.add_argument("--model", default=None, help="title; default: the figures dir's name")
    parser.add_argument("--n-resamples", type=int, default=N_RESAMPLES, help="paired bootstrap resamples")
    parser.add_argument("--seed", type=int, default=SEED, help="paired bootstrap seed")
    args = parser.parse_args(argv)
    if args.n_resamples < 1:
        raise ConfigError("--n-resamples", args.n_resamples, "must be >= 1", hint=f"e.g. {N_RESAMPLES}")
    if not 0 <= args.seed < 2**32:
        raise ConfigError("--seed", args.seed, "must be in [0, 2**32)", hint="e.g. 0")
    if not args.figures_dir.is_dir():
        log.warning("%s does not exist: every input is reported missing", args.figures_dir)
    text = render_report(args.figures_dir, args.model or args.figures_dir.name, relative_to=args.out.parent,
                         n_resamples=args.n_resamples, seed=args.seed)
    atomic_write_text(args.out, text)
    log.info("wrote %s", args.out)
    return args.out


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    main()
