"""The tracing claims decided per fact: paired differences with bootstrap intervals, not overlapping
marginal intervals.

Input: the ``trace_<variant>_per_fact.{safetensors,json}`` files that ``pipeline.figures trace``
copies from trace jobs (each fact's AIE by layer at the last corrupted token, per score name).
Variants: ``entity``, ``relation`` (relation_span=template) and ``relation_phrase``.

Per fact, with bands of ``n`` layers (lower ``l < n/3``, middle ``n/3 <= l < 2n/3``, upper ``l >= 2n/3``):

- band contrast of a kind (mlp, attn): the fact's mean AIE over the claimed bands minus its mean
  over the compared bands (e.g. upper - middle MLP);
- severing: the hidden-state AIE ``h`` and what severing removes, ``r_s = h - h_severed_s``, each
  averaged over the lower and middle layers (where ROME's severed traces drop). The share removed is
  ``mean(r_s) / mean(h)`` over facts (a ratio of means: a per-fact ratio explodes where ``h ~ 0``);
- entity vs relation: for facts traced from both perspectives, the relation statistic minus the
  entity one, fact by fact;
- knockout (when the traces include it): each fact's relative drop of p with the last token's
  attention to the relation tokens blocked, averaged over the middle and upper layers (claimed < 0),
  next to the subject and last-token drops and the relation - subject difference.

Every interval is a paired percentile bootstrap over facts (``metrics.paired``). Verdicts: with fewer
than ``MIN_PAIRED_FACTS`` paired facts, "too few facts (n=..)"; else supported when the interval lies
on the claimed side of 0, not supported when it lies on the other side, and inconclusive only when it
covers 0. Each claim also states its minimum detectable effect, ``2.80 x SE`` (80% power, two-sided
alpha 0.05; ``metrics.paired``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

from core.errors import DataError
from core.io import load_tensors, read_json
from metrics.paired import MDE_FACTOR, PairedEstimate, mean_difference, paired_bootstrap
from tracing.settings import KNOCKOUT_SOURCES, knockout_key

log = logging.getLogger(__name__)

SUPPORTED, NOT_SUPPORTED, INCONCLUSIVE = "supported", "not supported", "inconclusive"
MIDDLE_START, UPPER_START = 1 / 3, 2 / 3
BANDS = ("lower", "middle", "upper")
MIN_PAIRED_FACTS = 100  # below this, no verdict: "too few facts (n=..)"
N_RESAMPLES = 1000
SEED = 0


def trace_stem(perspective: str, relation_span: str = "template") -> str:
    """File stem of a trace job's figures: ``trace_entity``, ``trace_relation`` (template tokens) or
    ``trace_relation_phrase`` (``pipeline.figures trace --relation-span phrase``)."""
    return f"trace_{perspective}" + ("_phrase" if perspective == "relation" and relation_span == "phrase" else "")


VARIANTS = {"entity": trace_stem("entity"), "relation": trace_stem("relation"),
            "relation_phrase": trace_stem("relation", "phrase")}
VARIANT_LABELS = {"entity": "entity", "relation": "relation (template tokens)",
                  "relation_phrase": "relation (phrase tokens)"}


@dataclass(frozen=True)
class Claim:
    key: str
    verdict: str
    sentence: str


def band(layer: int, n_layers: int) -> str:
    if layer < MIDDLE_START * n_layers:
        return "lower"
    return "middle" if layer < UPPER_START * n_layers else "upper"


def too_few(n: int) -> str:
    return f"too few facts (n={n})"


def decide(estimate: PairedEstimate, expect: int = 1) -> str:
    """The verdict on a claim that the statistic has the sign ``expect`` (+1 or -1)."""
    if estimate.n < MIN_PAIRED_FACTS:
        return too_few(estimate.n)
    if estimate.low > 0:
        return SUPPORTED if expect > 0 else NOT_SUPPORTED
    if estimate.high < 0:
        return NOT_SUPPORTED if expect > 0 else SUPPORTED
    return INCONCLUSIVE


@dataclass
class PerFact:
    """One trace job's per-fact curves: ``curves[name]`` is [fact layer] AIE at the last corrupted token."""

    case_ids: list
    curves: dict[str, np.ndarray]

    @property
    def n_layers(self) -> int:
        return next(iter(self.curves.values())).shape[1]

    def band_mean(self, name: str, bands: Sequence[str]) -> np.ndarray:  # [fact]
        layers = [l for l in range(self.n_layers) if band(l, self.n_layers) in bands]
        return self.curves[name][:, layers].mean(axis=1)

    def lower_middle(self, name: str) -> np.ndarray:  # [fact]
        return self.band_mean(name, ("lower", "middle"))

    def aligned(self, case_ids: Sequence) -> "PerFact":
        """Rows of ``case_ids``, in that order."""
        index = {case_id: i for i, case_id in enumerate(self.case_ids)}
        rows = [index[case_id] for case_id in case_ids]
        return PerFact(list(case_ids), {name: curve[rows] for name, curve in self.curves.items()})


def load_per_fact(directory: Path, stem: str) -> Optional[PerFact]:
    """``<stem>_per_fact.{safetensors,json}`` from ``directory``, or None if absent (an older trace)."""
    tensors_path, meta_path = directory / f"{stem}_per_fact.safetensors", directory / f"{stem}_per_fact.json"
    if not tensors_path.exists() or not meta_path.exists():
        return None
    meta, tensors = read_json(meta_path), load_tensors(tensors_path)
    curves = {name: tensors[name].double().numpy() for name in meta["names"] if name in tensors}
    if not curves or any(len(c) != len(meta["case_ids"]) for c in curves.values()):
        raise DataError("per_fact", str(tensors_path), f"tensors and the {len(meta['case_ids'])} case ids disagree",
                        hint="redraw it with python -m pipeline.figures trace (make study does)")
    return PerFact(list(meta["case_ids"]), curves)


def load_variants(directory: Path) -> dict[str, PerFact]:
    found = {variant: load_per_fact(directory, stem) for variant, stem in VARIANTS.items()}
    return {variant: data for variant, data in found.items() if data is not None}


def has_per_fact(directory: Path) -> bool:
    return directory.is_dir() and any(directory.glob("trace_*_per_fact.safetensors"))


# -- statistics -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Statistic:
    """A paired statistic of one variant (or a contrast of two): what it is and its estimate."""

    variant: str
    label: str
    estimate: PairedEstimate


def shift(data: PerFact, name: str, claimed: Sequence[str], versus: Sequence[str]) -> np.ndarray:  # [fact]
    return data.band_mean(name, claimed) - data.band_mean(name, versus)


def severed_columns(data: PerFact) -> Optional[np.ndarray]:
    """[fact 3]: lower/middle mean of hidden AIE, of what severing MLP removes, of what severing attention removes."""
    names = ("hidden", "hidden_severed_mlp", "hidden_severed_attn")
    if any(name not in data.curves for name in names):
        return None
    hidden = data.lower_middle("hidden")
    return np.stack([hidden, hidden - data.lower_middle(names[1]), hidden - data.lower_middle(names[2])], axis=1)


def share(column: int) -> Callable[[np.ndarray], np.ndarray]:
    """Statistic: the share of the hidden effect removed by the severing in ``column`` (1: MLP, 2: attention)."""
    return lambda m: m[..., column] / m[..., 0]


def share_difference(m: np.ndarray) -> np.ndarray:
    """Share removed by severing MLP minus share removed by severing attention."""
    return (m[..., 1] - m[..., 2]) / m[..., 0]


def paired_claims(variants: dict[str, PerFact], n_resamples: int = N_RESAMPLES, seed: int = SEED,
                  confidence: float = 0.95) -> tuple[list[Claim], list[Statistic]]:
    """The tracing claims decided per fact, and every paired statistic behind them (for the table)."""
    options = dict(n_resamples=n_resamples, confidence=confidence, seed=seed)
    claims: list[Claim] = []
    stats: list[Statistic] = []

    def claim(key: str, what: str, variant: str, label: str, estimate: PairedEstimate, expect: int = 1) -> None:
        stats.append(Statistic(variant, label, estimate))
        verdict = decide(estimate, expect)
        sign = ">" if expect > 0 else "<"
        claims.append(Claim(key, verdict, (
            f"{what}: {label} = {estimate.value:.3g} [{estimate.low:.3g}, {estimate.high:.3g}] over {estimate.n} "
            f"paired facts (claimed {sign} 0; minimum detectable effect {estimate.mde:.3g})")))

    def note(key: str, what: str, why: str) -> None:
        claims.append(Claim(key, INCONCLUSIVE, f"{what}: {why}."))

    # Band claims, one perspective each; the relation ones once per relation span.
    specs = [("entity", "entity_mlp", "mlp", ("lower", "middle"), ("upper",),
              "Entity perspective: the MLP effect sits in lower/middle layers"),
             ("relation", "relation_mlp", "mlp", ("upper",), ("middle",),
              "Relation perspective: the MLP effect sits in upper layers"),
             ("relation", "relation_attn", "attn", ("middle", "upper"), ("lower",),
              "Relation perspective: attention has its effect in middle-to-upper layers")]
    relation_variants = [v for v in ("relation", "relation_phrase") if v in variants] or ["relation"]
    for perspective, key, name, claimed, versus, what in specs:
        for variant in ([perspective] if perspective == "entity" else relation_variants):
            k, w = (f"{key}_phrase", f"{what} (phrase tokens)") if variant == "relation_phrase" else (key, what)
            data = variants.get(variant)
            if data is None or name not in data.curves:
                note(k, w, f"no per-fact {name} trace for {VARIANT_LABELS[variant]} (run `make study`)")
                continue
            label = f"{name} AIE {'/'.join(claimed)} − {'/'.join(versus)}, per fact"
            claim(k, w, variant, label, mean_difference(shift(data, name, claimed, versus), **options))
    # Severing, per perspective: the share of the hidden effect that each severing removes.
    for variant in ["entity", *relation_variants]:
        data = variants.get(variant)
        columns = severed_columns(data) if data is not None else None
        suffix = "_phrase" if variant == "relation_phrase" else ""
        if columns is None:
            note(f"{variant.split('_')[0]}_severed{suffix}", f"Severing, {VARIANT_LABELS[variant]}",
                 "no per-fact severed traces (run `make study`)")
            continue
        removed_mlp = paired_bootstrap(columns, share(1), **options)
        removed_attn = paired_bootstrap(columns, share(2), **options)
        difference = paired_bootstrap(columns, share_difference, **options)
        stats.append(Statistic(variant, "share of the hidden effect removed by severing mlp", removed_mlp))
        if variant == "entity":
            stats.append(Statistic(variant, "share of the hidden effect removed by severing attn", removed_attn))
            claim("entity_severed_mlp", "Entity perspective: severing the MLPs removes more of the hidden-state effect "
                  "than severing attention (ROME)", variant, "share removed, MLP − attention severed", difference)
        else:
            stats.append(Statistic(variant, "share removed, MLP − attention severed", difference))
            claim(f"relation_severed_attn{suffix}", "Relation perspective: severing attention removes part of the "
                  f"hidden-state effect{' (phrase tokens)' if suffix else ''}", variant,
                  "share of the hidden effect removed by severing attn", removed_attn)
    # Attention knockout (Geva et al. 2023), a second, independent test of the attention claim: blocking
    # the last token's attention to the relation tokens in the middle-to-upper layers lowers p(answer).
    # The source sets come from the fact, so any job of the relation span with the knockout kind serves.
    for variant in relation_variants:
        data = variants.get(variant)
        suffix, span = ("_phrase", " (phrase tokens)") if variant == "relation_phrase" else ("", "")
        what = f"Knockout: blocking the last token's attention to the relation tokens{span} in middle-to-upper layers lowers p"
        names = [knockout_key(source) for source in KNOCKOUT_SOURCES]
        if data is None or any(name not in data.curves for name in names):
            note(f"knockout_relation{suffix}", what, f"no per-fact knockout for {VARIANT_LABELS[variant]} "
                 "(the study's kinds include knockout; rerun `make study`)")
            continue
        bands = ("middle", "upper")
        claim(f"knockout_relation{suffix}", what, variant, "relative drop of p, relation tokens blocked, middle/upper mean",
              mean_difference(data.band_mean(knockout_key("relation"), bands), **options), expect=-1)
        for source in ("subject", "last"):
            stats.append(Statistic(variant, f"relative drop of p, {source} tokens blocked, middle/upper mean",
                                   mean_difference(data.band_mean(knockout_key(source), bands), **options)))
        stats.append(Statistic(variant, "relative drop, relation − subject tokens blocked, middle/upper, per fact",
                               mean_difference(data.band_mean(knockout_key("relation"), bands)
                                               - data.band_mean(knockout_key("subject"), bands), **options)))
    # Entity vs relation on the facts traced from both perspectives.
    entity = variants.get("entity")
    for variant in relation_variants:
        relation = variants.get(variant)
        suffix = "_phrase" if variant == "relation_phrase" else ""
        if entity is None or relation is None:
            note(f"contrast{suffix}", f"Entity vs {VARIANT_LABELS[variant]}", "needs per-fact traces of both (run `make study`)")
            continue
        common = [case_id for case_id in relation.case_ids if case_id in set(entity.case_ids)]
        if not common:
            note(f"contrast{suffix}", f"Entity vs {VARIANT_LABELS[variant]}", "no fact was traced from both perspectives")
            continue
        ent, rel = entity.aligned(common), relation.aligned(common)
        for name, what in (("mlp", "The MLP effect sits higher (upper − middle) from the relation perspective than "
                                   "from the entity perspective"),
                           ("attn", "Attention's effect sits higher (upper − middle) from the relation perspective "
                                    "than from the entity perspective")):
            if name in ent.curves and name in rel.curves:
                difference = shift(rel, name, ("upper",), ("middle",)) - shift(ent, name, ("upper",), ("middle",))
                claim(f"contrast_{name}_shift{suffix}", what + (" (phrase tokens)" if suffix else ""), variant,
                      f"{name} upper − middle, relation − entity, per fact", mean_difference(difference, **options))
        ent_cols, rel_cols = severed_columns(ent), severed_columns(rel)
        if ent_cols is not None and rel_cols is not None:
            columns = np.concatenate([rel_cols, ent_cols], axis=1)  # [fact 6]
            difference = paired_bootstrap(columns, lambda m: share(2)(m[..., :3]) - share(2)(m[..., 3:]), **options)
            claim(f"contrast_severed_attn{suffix}", "Severing attention removes a larger share of the hidden-state "
                  f"effect from the relation perspective than from the entity perspective{' (phrase tokens)' if suffix else ''}",
                  variant, "share removed by severing attention, relation − entity", difference)
    return claims, stats


def method_note(n_resamples: int, seed: int) -> str:
    return (f"Paired, per-fact statistics at the last corrupted token (last subject / last relation token): per fact, "
            f"the mean AIE over the claimed layer bands minus the compared bands; for severing, the share "
            f"mean(h − h_severed) / mean(h) of the hidden-state AIE h over the lower and middle layers; for entity vs "
            f"relation, the relation value minus the entity value of the same fact. Intervals: 95% paired percentile "
            f"bootstrap over facts ({n_resamples} resamples, seed {seed}). A verdict needs at least {MIN_PAIRED_FACTS} "
            f"paired facts (else 'too few facts (n=..)'); it is inconclusive only when the interval covers 0. The "
            f"minimum detectable effect is MDE = (z_0.975 + z_0.80) × SE = {MDE_FACTOR:.2f} × SE, SE the bootstrap "
            f"standard error of the statistic: the true effect the data would detect with 80% power at alpha 0.05.")


def statistics_table(stats: Sequence[Statistic]) -> list[str]:
    lines = ["| traced | statistic | estimate [95% CI] | n | SE | MDE |", "|---|---|---|---|---|---|"]
    for stat in stats:
        e = stat.estimate
        lines.append(f"| {VARIANT_LABELS.get(stat.variant, stat.variant)} | {stat.label} | {e.value:.3g} "
                     f"[{e.low:.3g}, {e.high:.3g}] | {e.n} | {e.se:.3g} | {e.mde:.3g} |")
    return lines
