"""seaborn figures (PNG and PDF): per-fact heatmaps like ROME's, role x layer AIE, AIE curves, severed
traces, attention knockout curves.

Figures are built with ``matplotlib.figure.Figure`` (no pyplot state), so plotting is safe in
workers and notebooks alike. Each figure names its model in its (sup)title, so a PNG copied out of its
folder still says whose it is, and a role without tokens is drawn as "n/a" rather than left blank.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import seaborn as sns
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

from tracing.aggregate import RoleAIE
from tracing.result import TraceResult
from tracing.settings import KNOCKOUT_SOURCES, knockout_key, severed_key
from tracing.spans import ROLE_LABELS

CMAPS = {"hidden": "Purples", "mlp": "Greens", "attn": "Reds"}
LABELS = {"hidden": "single restored layer", "mlp": "center of {w} restored MLP layers",
          "attn": "center of {w} restored attention layers", "hidden_severed_mlp": "restored layer, later MLPs severed",
          "hidden_severed_attn": "restored layer, later attention severed"}
SEVERED_LABELS = {"hidden": "no severing", "hidden_severed_mlp": "MLP severed", "hidden_severed_attn": "attention severed"}
SOURCE_LABELS = {"subject": "subject tokens", "relation": "relation tokens", "last": "last token"}
SOURCE_COLORS = {"subject": "tab:blue", "relation": "tab:orange", "last": "tab:gray"}
PERSPECTIVE_COLORS = {"entity": "tab:blue", "relation": "tab:orange"}
PERSPECTIVE_LINES = {"entity": "-", "relation": "--"}  # dashed, so coinciding knockout curves stay visible
NA = "n/a"  # what an empty role (no tokens in any fact) shows instead of a blank row or a missing curve


def save_figure(fig: Figure, path: str | Path) -> list[Path]:
    """Write ``<path>.png`` and ``<path>.pdf`` (the suffix of ``path`` is ignored)."""
    base = Path(path)
    base = base.with_suffix("") if base.suffix in (".png", ".pdf") else base
    base.parent.mkdir(parents=True, exist_ok=True)
    out = []
    for suffix in (".png", ".pdf"):
        target = base.parent / (base.name + suffix)
        tmp = target.with_name(f".tmp-{target.name}")
        fig.savefig(tmp, dpi=150, bbox_inches="tight", format=suffix[1:])
        tmp.replace(target)
        out.append(target)
    return out


def _cmap(name: str) -> str:
    return CMAPS.get(name.split("_")[0], "Purples")


def titled(text: str, model: str | None) -> str:
    """``text`` prefixed with the model's name (unchanged when there is none)."""
    return f"{model}: {text}" if model else text


def _model_of(result: TraceResult) -> str | None:
    return result.model.get("name") if result.model else None


def _legend_below(ax, ncol: int) -> None:
    """The axes' legend under its x label, where it covers no data (constrained layout makes room)."""
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=ncol, frameon=False)


def plot_trace(result: TraceResult, name: str = "hidden", path: str | Path | None = None, ax=None):
    """One fact's [token x layer] table; corrupted tokens are starred; colours start at the corrupted p.
    The title names the model (``result.model``)."""
    fig = None
    if ax is None:
        fig = Figure(figsize=(max(4.0, result.n_layers * 0.16 + 2), max(2.5, result.n_tokens * 0.3 + 1)),
                     layout="constrained")
        ax = fig.add_subplot()
    corrupted = set(result.corrupted)
    labels = [repr(tok)[1:-1] + ("*" if i in corrupted else "") for i, tok in enumerate(result.tokens)]
    data = result.scores[name].float().numpy()
    sns.heatmap(data, ax=ax, cmap=_cmap(name), vmin=min(result.p_corrupted, float(np.nanmin(data))),
                yticklabels=labels, xticklabels=max(1, result.n_layers // 8),
                cbar_kws={"label": f"p({result.answer.strip()})"})
    ax.set_xlabel(LABELS.get(name, name).format(w=result.settings.window))
    ax.set_title(titled(f"{name}: p clean {result.p_clean:.3f}, corrupted {result.p_corrupted:.3f} ({result.perspective})",
                        _model_of(result)), fontsize=9)
    ax.tick_params(axis="y", labelsize=8, rotation=0)
    if fig is not None and path is not None:
        save_figure(fig, path)
    return fig if fig is not None else ax


def plot_trace_grid(result: TraceResult, path: str | Path | None = None) -> Figure:
    """All score tables of one fact side by side (and its knockout curves, if traced); the suptitle names the
    model, the prompt and the probabilities every panel shares, so the panel titles stay short."""
    names = sorted(result.table_names, key=lambda n: (n.startswith("hidden_severed"), n != "hidden", n))
    knocked = knockout_key(KNOCKOUT_SOURCES[0]) in result.scores
    panels = len(names) + knocked
    fig = Figure(figsize=(4.2 * panels, max(2.5, result.n_tokens * 0.3 + 1.2)), layout="constrained")
    for i, name in enumerate(names):
        plot_trace(result, name, ax=fig.add_subplot(1, panels, i + 1)).set_title(name, fontsize=9)
    if knocked:
        plot_fact_knockout(result, ax=fig.add_subplot(1, panels, panels))
    corrupted = "" if np.isnan(result.p_corrupted) else f", corrupted {result.p_corrupted:.3f}"  # NaN: knockout only
    fig.suptitle(titled(f"{result.prompt!r} ({result.perspective}): p clean {result.p_clean:.3f}{corrupted}",
                        _model_of(result)), fontsize=10)
    if path is not None:
        save_figure(fig, path)
    return fig


def plot_role_heatmaps(aggregates: Sequence[RoleAIE], path: str | Path | None = None, model: str | None = None) -> Figure:
    """Role x layer AIE heatmaps, one panel per score name (hidden / MLP / attention); a role without
    tokens reads "n/a" across its row."""
    fig = Figure(figsize=(4.2 * len(aggregates) + 1.5, 3.4), layout="constrained")
    for i, agg in enumerate(aggregates):
        ax = fig.add_subplot(1, len(aggregates), i + 1)
        labels = [ROLE_LABELS[agg.perspective][r] for r in agg.roles] if i == 0 else False  # shared rows
        sns.heatmap(agg.mean.numpy(), ax=ax, cmap=_cmap(agg.name), yticklabels=labels,
                    xticklabels=max(1, agg.mean.shape[1] // 8), cbar_kws={"label": "AIE"})
        for r in range(len(agg.roles)):
            if int(agg.tokens[r]) == 0:
                ax.text(agg.mean.shape[1] / 2, r + 0.5, NA, ha="center", va="center", fontsize=8, color="0.4")
        ax.set_title(agg.name, fontsize=9)
        ax.set_xlabel("layer")
        ax.tick_params(axis="y", labelsize=8, rotation=0)
    agg = aggregates[0]
    fig.suptitle(titled(f"AIE by token role and layer ({agg.perspective}, {agg.n_facts} facts)", model), fontsize=10)
    if path is not None:
        save_figure(fig, path)
    return fig


def plot_aie_curves(aggregates: Sequence[RoleAIE], path: str | Path | None = None, model: str | None = None) -> Figure:
    """Per-layer AIE curves per role with bootstrap bands, one panel per score name; one legend for all
    panels below them (where it covers no data), listing a role without tokens as "n/a"."""
    fig = Figure(figsize=(5.0 * len(aggregates), 3.8), layout="constrained")
    first = aggregates[0]
    palette = sns.color_palette("colorblind", n_colors=len(first.roles))
    for i, agg in enumerate(aggregates):
        ax = fig.add_subplot(1, len(aggregates), i + 1)
        layers = np.arange(agg.mean.shape[1])
        for r, role in enumerate(agg.roles):
            if agg.tokens[r] == 0:
                continue
            ax.plot(layers, agg.mean[r].numpy(), color=palette[r], label=ROLE_LABELS[agg.perspective][role])
            ax.fill_between(layers, agg.low[r].numpy(), agg.high[r].numpy(), color=palette[r], alpha=0.2, linewidth=0)
        ax.set_title(agg.name, fontsize=9)
        ax.set_xlabel("layer")
        ax.set_ylabel("AIE")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    empty = [all(int(agg.tokens[r]) == 0 for agg in aggregates) for r in range(len(first.roles))]
    handles = [Line2D([], [], color=palette[r], linestyle=":" if empty[r] else "-") for r in range(len(first.roles))]
    labels = [ROLE_LABELS[first.perspective][role] + (f": {NA}" if empty[r] else "") for r, role in enumerate(first.roles)]
    fig.legend(handles, labels, fontsize=7, loc="outside lower center", ncol=min(len(labels), 6), frameon=False)
    fig.suptitle(titled(f"AIE by layer per token role ({first.perspective}, {first.n_facts} facts, "
                        f"{int(first.confidence * 100)}% CI)", model), fontsize=10)
    if path is not None:
        save_figure(fig, path)
    return fig


def plot_severed(aggregates: Mapping[str, RoleAIE], role: str = "last_corrupted", path: str | Path | None = None,
                 ax=None, model: str | None = None) -> Figure:
    """AIE of hidden-state restoration with nothing / MLP / attention severed, per layer at one role
    (into ``ax`` when given, e.g. one panel per perspective: the caller's figure then names the model)."""
    if ax is None:
        fig = Figure(figsize=(6.0, 3.8), layout="constrained")
        ax = fig.add_subplot()
        fig.suptitle(titled("hidden-state AIE with later MLP / attention severed", model), fontsize=10)
    fig = ax.figure
    names = [n for n in ("hidden", severed_key("mlp"), severed_key("attn")) if n in aggregates]
    colors = {"hidden": "tab:purple", severed_key("mlp"): "tab:green", severed_key("attn"): "tab:red"}
    r = None
    for name in names:
        agg = aggregates[name]
        r = agg.roles.index(role)
        layers = np.arange(agg.mean.shape[1])
        ax.plot(layers, agg.mean[r].numpy(), color=colors[name], label=SEVERED_LABELS[name])
        ax.fill_between(layers, agg.low[r].numpy(), agg.high[r].numpy(), color=colors[name], alpha=0.2, linewidth=0)
    if names:
        agg = aggregates[names[0]]
        ax.set_title(f"{agg.perspective}: severed traces at the {ROLE_LABELS[agg.perspective][role]} ({agg.n_facts} facts)",
                     fontsize=9)
    ax.set_xlabel("layer")
    ax.set_ylabel("AIE")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    _legend_below(ax, ncol=3)
    if path is not None:
        save_figure(fig, path)
    return fig


def plot_fact_knockout(result: TraceResult, ax) -> None:
    """One fact's relative drop in p(answer) per layer window, a line per source set."""
    drops = result.knockout().numpy()  # [source layer]
    for s, source in enumerate(KNOCKOUT_SOURCES):
        ax.plot(np.arange(drops.shape[1]), drops[s], color=SOURCE_COLORS[source], label=SOURCE_LABELS[source])
    ax.axhline(0.0, color="black", linewidth=0.5)
    ax.set_xlabel(f"center of {result.settings.window} knocked-out layers")
    ax.set_ylabel(f"relative change of p({result.answer.strip()})")
    ax.set_title("attention knockout from the last token", fontsize=9)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), frameon=False)  # beside the data, not on it


def plot_knockout(aggregates: Sequence[RoleAIE], window: int | None = None, path: str | Path | None = None,
                  model: str | None = None) -> Figure:
    """Mean relative drop in p(answer) per layer window with bootstrap bands: one panel per source set,
    one curve per aggregate (e.g. per perspective; "n/a" in the legend where no fact has such tokens)."""
    fig = Figure(figsize=(4.6 * len(KNOCKOUT_SOURCES), 3.8), layout="constrained")
    for s, source in enumerate(KNOCKOUT_SOURCES):
        ax = fig.add_subplot(1, len(KNOCKOUT_SOURCES), s + 1, sharey=fig.axes[0] if s else None)
        for agg in aggregates:
            r = agg.roles.index(source)
            layers = np.arange(agg.mean.shape[1])
            color = PERSPECTIVE_COLORS.get(agg.perspective)
            ax.plot(layers, agg.mean[r].numpy(), color=color, linestyle=PERSPECTIVE_LINES.get(agg.perspective, "-"),
                    label=f"{agg.perspective} ({int(agg.tokens[r])} facts)" if int(agg.tokens[r]) else f"{agg.perspective}: {NA}")
            ax.fill_between(layers, agg.low[r].numpy(), agg.high[r].numpy(), color=color, alpha=0.2, linewidth=0)
        ax.axhline(0.0, color="black", linewidth=0.5)
        ax.set_title(f"last token cannot attend to the {SOURCE_LABELS[source]}", fontsize=9)
        ax.set_xlabel("layer" if window is None else f"center of {window} knocked-out layers")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        _legend_below(ax, ncol=len(aggregates))
    fig.axes[0].set_ylabel(f"relative change of p(answer), {int(aggregates[0].confidence * 100)}% CI")
    fig.suptitle(titled("attention knockout from the last token", model), fontsize=10)
    if path is not None:
        save_figure(fig, path)
    return fig
